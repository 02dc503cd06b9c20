"""The package's layering: no module-level import cycle anywhere in geoseg/ or retrieval/, and the
CLI stays below the JSON-lines engine that the QGIS plugin starts (the engine imports the CLI, never
the reverse), so each module can be read and tested on its own."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("geoseg", "retrieval")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported at module level (imports inside functions are deliberate
    late imports and cannot form a cycle at import time)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_module_level_import_cycle() -> None:
    paths = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module(p) for p in paths}
    graph = {_module(p): _top_level_imports(p, modules) for p in paths}
    assert sum(map(len, graph.values())) > len(paths)  # the parser sees the imports
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        raise AssertionError(f"module-level import cycle: {' -> '.join(err.args[1])}") from None


def test_the_cli_does_not_import_the_engine() -> None:
    code = "import sys, geoseg.cli; print('geoseg.engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
