#!/usr/bin/env python
"""The QGIS search dock as a user meets it: text searches in real QGIS, cold vs warm engine.

`qgis_engine.py` times the plugin's engine client alone; this one times what the user waits
for in QGIS: from pressing Search in the plugin's dock (`SearchDock.search`, which runs the
Processing algorithm `geoseg:search` as a background task) until the hits and their thumbnails
are listed. Two settings of the plugin, in one QGIS session (fresh profile, offscreen):

- "Keep the engine running" off: every search starts a fresh engine (how the plugin worked
  before issue 15: imports, model and index loaded each time);
- on (the default): the first search starts the warm engine, the next ones reuse it with the
  embedder and index kept loaded.

Wall seconds, and CPU seconds of QGIS plus its engines (user + sys: QGIS's own from
RUSAGE_SELF, fresh engines from RUSAGE_CHILDREN, the warm one from /proc deltas), because the
machine is shared. Target (issue 15): a second search <= 1 s on the sample index.

Run with QGIS's Python (the repo's .qgis-venv; no torch in it), the engine from the repo's .venv:
    GEOSEG_ENGINE_PYTHON=.venv/bin/python QT_QPA_PLATFORM=offscreen \\
        .qgis-venv/bin/python benchmarks/qgis_dock.py [--reps 3] [--index runs/demo/index]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qgis_engine import children_cpu, process_cpu, summary, write_report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "qgis_dock.json"
QUERIES = ("coniferous forest", "buildings next to roads", "bare ground", "tall trees")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--index", type=Path, default=REPO / "runs/demo/index")
    args = parser.parse_args()
    if not (args.index / "index.yaml").exists():
        sys.exit(f"benchmarks/qgis_dock.py: {args.index} has no index: run `make demo` first")
    profile = tempfile.mkdtemp(prefix="geoseg-qgis-bench-")
    from qgis.core import Qgis, QgsApplication, QgsSettings
    from qgis.gui import QgsMapCanvas
    from qgis.PyQt.QtWidgets import QMainWindow

    app = QgsApplication([], True, profile)
    app.initQgis()
    sys.path.append(str(Path(app.pkgDataPath()) / "python" / "plugins"))  # QGIS's Processing
    sys.path.insert(0, str(REPO / "qgis_plugin"))
    from processing.core.Processing import Processing

    Processing.initialize()
    from geoseg_qgis import settings
    from geoseg_qgis.engine_client import WARM
    from geoseg_qgis.provider import GeosegProvider
    from geoseg_qgis.search_dock import SearchDock

    provider = GeosegProvider()
    QgsApplication.processingRegistry().addProvider(provider)
    QgsSettings().setValue("geoseg/output_folder", str(Path(profile) / "outputs"))
    window = QMainWindow()
    canvas = QgsMapCanvas(window)

    class Iface:  # what the dock asks of QGIS's iface: the map canvas
        def mapCanvas(self) -> QgsMapCanvas:
            return canvas

    dock = SearchDock(Iface())
    dock.index.setFilePath(str(args.index))
    load_before = os.getloadavg()

    def cpu(engine: int | None) -> float:
        return own_cpu() + children_cpu() + (process_cpu(engine) if engine else 0.0)

    def search(query: str) -> tuple[float, float, str]:
        """(wall s, CPU s, status line) from Search pressed to the hits listed. A warm engine
        started by this search counts whole (its CPU since it started)."""
        dock.query.setText(query)
        cpu0, t0 = cpu(WARM.pid), time.perf_counter()
        dock.search()
        while dock.job is not None:
            app.processEvents()
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        assert dock.results.count() > 0, dock.status.text()
        return wall, cpu(WARM.pid) - cpu0, dock.status.text()

    rows: dict[str, dict[str, Any]] = {}

    def record(name: str, samples: list[tuple[float, float, str]]) -> None:
        rows[name] = {
            "wall_s": summary([w for w, _, _ in samples]),
            "cpu_s": summary([c for _, c, _ in samples]),
            "n": len(samples),
            "note": samples[-1][2],
        }

    queries = [QUERIES[i % len(QUERIES)] for i in range(args.reps + 1)]
    QgsSettings().setValue(settings.KEY + "keep_engine", False)
    record("dock text search: fresh engine each search", [search(q) for q in queries[1:]])
    QgsSettings().setValue(settings.KEY + "keep_engine", True)
    record("dock text search: warm engine, first (starts it)", [search(queries[0])])
    record("dock text search: warm engine, next", [search(q) for q in queries[1:]])
    WARM.close()
    write_report(
        RESULTS,
        rows,
        {"qgis": Qgis.QGIS_VERSION},
        load_before,
        index=str(args.index),
        reps=args.reps,
    )
    QgsApplication.processingRegistry().removeProvider(provider)
    app.exitQgis()


if __name__ == "__main__":
    main()
