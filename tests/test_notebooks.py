"""The notebooks run end to end at tiny sizes, and are committed without outputs.

Execution goes through `notebooks/execute.py` (the same runner that renders the docs figures):
a kernel of this interpreter from a temporary kernel spec, a fresh working folder, the notebook's
`FAST` parameters injected after its `parameters` cell. Any cell error fails the test. Notebooks
that train or index reuse the session's sample build instead of building it again.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
_spec = importlib.util.spec_from_file_location("notebook_execute", NOTEBOOKS / "execute.py")
assert _spec is not None and _spec.loader is not None
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)

FOUND = execute.notebooks()
USES_SAMPLE_BUILD = {"02", "03"}
CELL_TIMEOUT_S = 600


def test_notebooks_exist_and_are_committed_stripped() -> None:
    assert {"01", "02"} <= set(FOUND)
    for number, path in FOUND.items():
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert not execute.has_outputs(nb), f"{path.name}: strip outputs before committing"
        tags = [c.metadata.get("tags", []) for c in nb.cells]
        assert sum("parameters" in t for t in tags) == 1, f"{path.name}: one parameters cell"
        source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "SAVE_FIGURE" in source, f"{path.name}: the docs figure needs SAVE_FIGURE"
        assert set(execute.FAST[number]) <= set(_parameter_names(nb)), path.name


def _parameter_names(nb: nbformat.NotebookNode) -> list[str]:
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return [line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line]


def test_inject_puts_parameters_after_the_tagged_cell() -> None:
    nb = nbformat.read(FOUND["01"], as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    execute.inject(nb, {"THROUGHPUT_TILES": 3, "OUT": "x"})
    assert nb.cells[at + 1].source == "THROUGHPUT_TILES = 3\nOUT = 'x'"
    untagged = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    with pytest.raises(ValueError, match="parameters"):
        execute.inject(untagged, {"x": 2})


def test_command_line_parameters_are_literals_or_text() -> None:
    assert execute._parameter("MAX_STEPS=20") == ("MAX_STEPS", 20)
    assert execute._parameter("TRAIN_STEPS=None") == ("TRAIN_STEPS", None)
    assert execute._parameter("QUERIES=['a b']") == ("QUERIES", ["a b"])
    assert execute._parameter("DATA=runs/demo/data") == ("DATA", "runs/demo/data")


@pytest.mark.slow
@pytest.mark.parametrize("number", sorted(FOUND))
def test_notebook_runs_without_error(number: str, tmp_path: Path, request) -> None:
    figure = tmp_path / f"notebook_{number}.png"
    params = {**execute.FAST[number], "SAVE_FIGURE": str(figure)}
    if number in USES_SAMPLE_BUILD:
        params["DATA"] = str(request.getfixturevalue("sample_build"))
    work = tmp_path / "work"
    work.mkdir()
    execute.run_notebook(FOUND[number], work, params, timeout=CELL_TIMEOUT_S)
    assert figure.stat().st_size > 10_000  # the key figure was drawn and saved
    assert any(work.rglob("*")), "the notebook writes its outputs under its working folder"
