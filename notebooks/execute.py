#!/usr/bin/env python
"""Run the notebooks headless, as the test suite does, and optionally save their key figures.

Each notebook runs in a working folder of its own with a kernel of *this* Python (a kernel spec
in a temporary folder: the user's Jupyter kernels are neither used nor touched). Parameters are
injected papermill-style: a cell of assignments right after the cell tagged `parameters`.

Usage:
    .venv/bin/python notebooks/execute.py                 # all notebooks, full size
    .venv/bin/python notebooks/execute.py --fast 01       # tiny sizes (what CI runs), one notebook
    .venv/bin/python notebooks/execute.py --figures docs/img   # refresh docs/img/notebook_0N.png
    .venv/bin/python notebooks/execute.py --executed /tmp/out  # keep the executed copies to read
    .venv/bin/python notebooks/execute.py -p DATA=runs/demo/data 02   # reuse an existing build
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
KERNEL = "geoseg-notebooks"

FAST: dict[str, dict[str, Any]] = {
    "01": {"THROUGHPUT_TILES": 12},
    "02": {"MAX_STEPS": 4, "VAL_EVERY": 2, "SCENE_PX": 96},
    "03": {"TRAIN_STEPS": 0, "K": 6},
}
"""Tiny sizes per notebook (by number): each runs in about a minute on 2 cores."""


def notebooks() -> dict[str, Path]:
    """Notebook number ("01") -> path, for every `NN_*.ipynb` beside this script."""
    return {p.name[:2]: p for p in sorted(HERE.glob("[0-9][0-9]_*.ipynb"))}


def inject(nb: nbformat.NotebookNode, parameters: dict[str, Any]) -> None:
    """Insert a cell assigning `parameters` after the cell tagged `parameters`."""
    if not parameters:
        return
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if not tagged:
        raise ValueError("notebook has no cell tagged 'parameters'")
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, cell)


def _kernel_manager(spec_dir: Path) -> KernelManager:
    """A kernel manager whose only kernel spec runs this interpreter's ipykernel."""
    kernel_dir = spec_dir / "kernels" / KERNEL
    kernel_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"geoseg ({sys.executable})",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def run_notebook(
    path: Path, workdir: Path, parameters: dict[str, Any] | None = None, timeout: int = 600
) -> nbformat.NotebookNode:
    """Execute `path` in `workdir`; raises `nbclient.exceptions.CellExecutionError` on any error."""
    nb = nbformat.read(path, as_version=4)
    inject(nb, parameters or {})
    with tempfile.TemporaryDirectory(prefix="geoseg-kernel-") as spec_dir:
        client = NotebookClient(
            nb,
            km=_kernel_manager(Path(spec_dir)),
            timeout=timeout,
            resources={"metadata": {"path": str(workdir)}},
        )
        client.execute()
    return nb


def has_outputs(nb: nbformat.NotebookNode) -> bool:
    """True if any code cell carries outputs or an execution count (commit notebooks stripped)."""
    return any(
        c.get("outputs") or c.get("execution_count") is not None
        for c in nb.cells
        if c.cell_type == "code"
    )


def _parameter(text: str) -> tuple[str, Any]:
    """`NAME=VALUE` -> (name, value): a Python literal (60, None, [..]) or else the text."""
    name, _, value = text.partition("=")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("numbers", nargs="*", help="notebook numbers (01 02 ...); default: all")
    parser.add_argument("--fast", action="store_true", help="tiny sizes, as in the test suite")
    parser.add_argument("--figures", type=Path, help="save each key figure as notebook_NN.png")
    parser.add_argument("--executed", type=Path, help="also write the executed notebooks here")
    parser.add_argument(
        "-p", "--param", action="append", default=[], metavar="NAME=VALUE",
        help="set a parameter: a Python literal or else text, e.g. -p DATA=runs/demo/data",
    )  # fmt: skip
    args = parser.parse_args()
    found = notebooks()
    for number in args.numbers or list(found):
        params = dict(FAST.get(number, {})) if args.fast else {}
        params.update(_parameter(p) for p in args.param)
        if args.figures:
            params["SAVE_FIGURE"] = str((args.figures / f"notebook_{number}.png").resolve())
        with tempfile.TemporaryDirectory(prefix=f"geoseg-nb{number}-") as work:
            t0 = time.perf_counter()
            nb = run_notebook(found[number], Path(work), params)
            if args.executed:
                args.executed.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, args.executed / found[number].name)
            print(f"{found[number].name}: ok in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
