#!/usr/bin/env python
"""QGIS plugin responsiveness: a fresh engine per job (cold) vs the session's warm engine.

What a QGIS user waits for, measured with the plugin's own client (`qgis_plugin/geoseg_qgis/
engine_client.py`, standard library only: the exact code QGIS runs, minus QGIS) against the real
engine (`python -m geoseg.engine` of this environment):

- bad checkpoint: a Segment with a checkpoint path that does not exist, (a) caught by the plugin
  before any engine starts (`checkpoint_info.read_contract`, what the dialog does), (b) answered by
  a fresh engine, (c) answered by the warm engine;
- text search on the sample index: one fresh engine per search (how the plugin worked before),
  then the warm engine's first (it starts: imports, model, index) and following searches (the
  last model and index kept loaded);
- segment: a 64 m square of the sample scene with the IKD-Net checkpoint and the sample
  catalog's LiDAR, fresh engine vs warm engine's second run.

Each time is wall clock; beside it the CPU seconds of the engine process (user + sys; for fresh
engines from `RUSAGE_CHILDREN`, for the warm engine from /proc/<pid>/stat deltas), because the
machine is shared: CPU seconds do not grow when others load the machine, wall seconds do. The
load average before and after is recorded. Targets (issue 15): a second search <= 1 s; a bad
checkpoint path reported <= 1 s.

Needs the `make demo` outputs (runs/demo: data, run, index) or --index/--checkpoint.

Usage:
    .venv/bin/python benchmarks/qgis_engine.py [--reps 5] [--index runs/demo/index]
        [--checkpoint runs/demo/run/checkpoints/last.ckpt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "qgis_plugin"))
from geoseg_qgis.checkpoint_info import CheckpointError, read_contract  # noqa: E402
from geoseg_qgis.engine_client import EngineError, WarmEngine, run_engine  # noqa: E402
from geoseg_qgis.protocol import request  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "qgis_engine.json"
SCENE = REPO / "data_catalog/sample/assets/naip/fr_lambert93_0484_6633_050_2024.tif"
QUERIES = ("tall trees with some bare ground", "buildings next to roads", "bare ground")
TICK = os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def timed(job: Callable[[], Any], cpu: Callable[[], float]) -> tuple[float, float, Any]:
    """(wall s, CPU s, result) of `job`; an EngineError is the result, not a failure."""
    cpu0, t0 = cpu(), time.perf_counter()
    try:
        result: Any = job()
    except (EngineError, CheckpointError) as exc:
        result = exc
    return time.perf_counter() - t0, cpu() - cpu0, result


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--index", type=Path, default=REPO / "runs/demo/index")
    parser.add_argument(
        "--checkpoint", type=Path, default=REPO / "runs/demo/run/checkpoints/last.ckpt"
    )
    parser.add_argument("--no-segment", action="store_true", help="Skip the segment rows.")
    args = parser.parse_args()
    for path in (args.index, args.checkpoint):
        if not path.exists():
            sys.exit(f"benchmarks/qgis_engine.py: {path} not found: run `make demo` first")
    python = sys.executable
    ignore: Callable[[dict[str, Any]], None] = lambda msg: None  # noqa: E731
    rows: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()

    def record(name: str, samples: list[tuple[float, float, Any]], note: str = "") -> None:
        """One row; a job meant to succeed that failed stops the benchmark (times of errors
        are not times of searches)."""
        kinds = {type(r).__name__ for _, _, r in samples}
        failed = [r for _, _, r in samples if isinstance(r, Exception)]
        if failed and not name.startswith("bad checkpoint"):
            sys.exit(f"benchmarks/qgis_engine.py: {name} failed: {failed[0]}")
        rows[name] = {
            "wall_s": summary([w for w, _, _ in samples]),
            "cpu_s": summary([c for _, c, _ in samples]),
            "n": len(samples),
            "outcome": ", ".join(sorted(kinds)),
            "note": note,
        }

    missing = REPO / "runs" / "no-such-run" / "checkpoints" / "last.ckpt"
    with tempfile.TemporaryDirectory() as tmp:
        bad = request(
            "predict", {"checkpoint": str(missing), "image": str(SCENE), "out": f"{tmp}/c.tif"}
        )
        record(
            "bad checkpoint: plugin pre-check (no engine)",
            [timed(lambda: read_contract(missing), lambda: 0.0) for _ in range(args.reps)],
        )
        fresh_bad = [
            timed(lambda: run_engine(python, bad, ignore), children_cpu) for _ in range(args.reps)
        ]
        record("bad checkpoint: fresh engine", fresh_bad)
        searches = [
            request(
                "search",
                {  # as the dock sends it: no PNG grid (it draws its own thumbnails)
                    "index": str(args.index),
                    "k": 12,
                    "out": f"{tmp}/h{i}.geojson",
                    "no_thumbnails": True,
                },
                positional=[QUERIES[i % len(QUERIES)]],
            )
            for i in range(args.reps + 1)
        ]
        record(
            "text search: fresh engine each time",
            [timed(lambda r=r: run_engine(python, r, ignore), children_cpu) for r in searches[1:]],
        )
        warm = WarmEngine()
        try:
            first = timed(lambda: warm.run(python, searches[0], ignore), children_cpu)
            pid = warm.pid
            assert pid is not None, first
            cpu = lambda: process_cpu(pid)  # noqa: E731
            record("text search: warm engine, first (starts it)", [first], "CPU not counted")
            record(
                "text search: warm engine, next",
                [timed(lambda r=r: warm.run(python, r, ignore), cpu) for r in searches[1:]],
            )
            record(
                "bad checkpoint: warm engine",
                [timed(lambda: warm.run(python, bad, ignore), cpu) for _ in range(args.reps)],
            )
            if not args.no_segment:
                x0, x1, y0, y1 = 484780.0, 484844.0, 6632780.0, 6632844.0
                scene = Path(tmp) / "scene.tif"
                import rasterio  # the engine environment's, only to clip the scene
                from rasterio.windows import from_bounds

                with rasterio.open(SCENE) as src:
                    window = from_bounds(x0, y0, x1, y1, src.transform)
                    profile = dict(src.profile, width=128, height=128)
                    profile["transform"] = src.window_transform(window)
                    with rasterio.open(scene, "w", **profile) as dst:
                        dst.write(src.read(window=window, out_shape=(src.count, 128, 128)))
                args_of = {
                    "checkpoint": str(args.checkpoint),
                    "image": str(scene),
                    "catalog": "sample",
                }
                segment = [
                    request("predict", {**args_of, "out": f"{tmp}/s{i}.tif"}) for i in range(3)
                ]
                record(
                    "segment 64 m (IKD-Net + sample LiDAR): fresh engine",
                    [timed(lambda: run_engine(python, segment[0], ignore), children_cpu)],
                )
                timed(lambda: warm.run(python, segment[1], ignore), cpu)  # loads the model
                record(
                    "segment 64 m (IKD-Net + sample LiDAR): warm engine, next",
                    [timed(lambda: warm.run(python, segment[2], ignore), cpu)],
                )
        finally:
            warm.close()
    write_report(
        RESULTS,
        rows,
        {"torch": metadata.version("torch")},
        load_before,
        index=str(args.index),
        checkpoint=str(args.checkpoint),
        reps=args.reps,
    )


def write_report(
    path: Path,
    rows: dict[str, dict[str, Any]],
    versions: dict[str, str],
    load_before: tuple[float, float, float],
    **inputs: Any,
) -> None:
    """JSON with the machine, the load around the run and the rows; the table on stdout (shared
    with qgis_dock.py)."""
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}
    machine |= versions | {"load_before": load_before, "load_after": os.getloadavg()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine, **inputs, "rows": rows}, indent=2) + "\n")
    print(f"{'job':58} {'wall s median [min-max]':>26} {'CPU s':>8}  outcome")
    for name, row in rows.items():
        w, c = row["wall_s"], row["cpu_s"]
        span = f"{w['median']:.2f} [{w['min']:.2f}-{w['max']:.2f}]"
        print(f"{name:58} {span:>26} {c['median']:8.2f}  {row.get('outcome', '')} {row['note']}")
    print(f"load average before {load_before}, after {machine['load_after']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
