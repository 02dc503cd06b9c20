#!/usr/bin/env python
"""Dataset-builder throughput and memory: tiles/s and peak RSS per worker, 1 vs 2 dask workers.

Each run is a fresh interpreter building the embedded sample region (`--catalog sample`) into a
fresh folder through the library (`geoseg.builder.runner.build_dataset`), exactly as the CLI does.
Two numbers per run, because a local dask cluster costs seconds to start:

- wall: the whole `build_dataset` call (search, plan, cluster start, tiles, catalog, report);
- tile phase: only `run_jobs` (the dask tasks), timed by wrapping it, with the workers' imports
  done beforehand; tiles/s = built tiles / tile phase.

Per worker process, read through `client.run` after the tile phase: peak RSS (VmHWM, the
high-water mark since the process started) and CPU seconds spent in the tile phase. CPU is
reported in cores (CPU s / tile-phase s) for the workers, for the rest of the build's process
tree ("main": scheduler, client, nannies, STAC server) and for every other process on the
machine ("other"). Workers > 1 core per worker means the task runs threads of its own (lazrs
decodes COPC nodes in parallel); workers + main near the machine's core count means the
speed-up is bounded by the CPUs, not by the builder.

Protocol: per configuration one warm-up run (discarded), then --reps repetitions, alternating
the worker counts. A run starts only once other processes use less than --quiet CORES, and is
repeated (at most TRIES times) when they used more during its tile phase; results are median
[min-max] over the undisturbed runs. --env KEY=VALUE sets variables for the runs (diagnostics,
e.g. RAYON_NUM_THREADS=1 for single-threaded lazrs).

Usage:
    .venv/bin/python benchmarks/build.py [--reps 5] [--workers 1 2] [--config small large]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "build.json"
CONFIGS: dict[str, dict[str, Any]] = {
    # The sample's defaults: 64 px at 0.5 m (32 m tiles), small tasks (~50-100 ms).
    "small": {"gsd": 0.5, "tile_size": 64},
    # More work per task: 256 px at 0.1 m (the NEON plots' native 0.1 m imagery), 25.6 m tiles.
    "large": {"gsd": 0.1, "tile_size": 256},
}


# --- one run (child process) ---------------------------------------------------------------------


def _peak_rss_mib() -> float:
    """This process's RSS high-water mark (VmHWM).

    Not `ru_maxrss`: Linux carries it across exec, so a spawned dask worker would report the
    larger of its own peak and its parent's (the nanny's) RSS at fork time.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def _worker_usage() -> dict[str, float]:
    """Runs inside a dask worker: its CPU seconds so far and peak RSS (MiB)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mib": _peak_rss_mib()}


def _warm_worker() -> None:
    """Import the task's modules before the timer starts (a cost of cluster start-up)."""
    import geoseg.builder.tile  # noqa: F401


def _tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a process and all its descendants (the build: main, nannies, workers)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _busy_cpu() -> float:
    """Machine-wide busy CPU seconds (all processes)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def run_once(gsd: float, tile_size: int, workers: int) -> dict[str, Any]:
    """Build the sample once into a fresh folder; the measurements of that build."""
    import geoseg.builder.runner as runner

    phase: dict[str, Any] = {}
    run_jobs = runner.run_jobs
    me = psutil.Process()

    def timed_run_jobs(client: Any, jobs: list, progress: bool, **kwargs: Any) -> list:
        client.run(_warm_worker)
        before = client.run(_worker_usage)
        busy0, ours0 = _busy_cpu(), _tree_cpu(me)
        t0 = time.perf_counter()
        results = list(run_jobs(client, jobs, progress, **kwargs))
        phase["seconds"] = time.perf_counter() - t0
        busy1, ours1 = _busy_cpu(), _tree_cpu(me)
        after = client.run(_worker_usage)
        phase["workers"] = [
            {
                "peak_rss_mib": after[w]["peak_rss_mib"],
                "tile_phase_cpu_s": after[w]["cpu_s"] - before[w]["cpu_s"],
            }
            for w in sorted(after)
        ]
        workers_cpu = sum(w["tile_phase_cpu_s"] for w in phase["workers"])
        phase["worker_cores"] = workers_cpu / phase["seconds"]
        phase["main_cores"] = ((ours1 - ours0) - workers_cpu) / phase["seconds"]
        phase["other_load_cores"] = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / phase["seconds"]
        return results

    runner.run_jobs = timed_run_jobs
    out = Path(tempfile.mkdtemp(prefix="geoseg-bench-build-"))
    try:
        cfg = runner.BuildConfig(
            out=str(out / "out"), catalog="sample", gsd=gsd, tile_size=tile_size, workers=workers
        )
        t0 = time.perf_counter()
        summary = runner.build_dataset(cfg, echo=lambda _: None, progress=False)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    built = summary.count("built")
    return {
        "workers": workers,
        "wall_s": wall,
        "tile_phase_s": phase["seconds"],
        "tasks": summary.tasks,
        "built": built,
        "failed": summary.count("failed"),
        "tiles_per_s": built / phase["seconds"],
        "task_s_sum": summary.task_seconds,
        "workers_detail": phase["workers"],
        "worker_cores": phase["worker_cores"],
        "main_cores": phase["main_cores"],
        "other_load_cores": phase["other_load_cores"],
        "main_peak_rss_mib": _peak_rss_mib(),
    }


# --- driver --------------------------------------------------------------------------------------


def wait_for_quiet(threshold: float, max_wait_s: float) -> float:
    """Wait until other processes use less than `threshold` cores (1 s windows); the last load.

    On a shared machine another job's CPU use halves a 2-worker build's speed-up; runs are
    only started when the machine is quiet, and their "other load" is recorded anyway.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, ours0, t0 = _busy_cpu(), _tree_cpu(psutil.Process()), time.perf_counter()
        time.sleep(1.0)
        load = (_busy_cpu() - busy0 - (_tree_cpu(psutil.Process()) - ours0)) / (
            time.perf_counter() - t0
        )
        if load < threshold or time.monotonic() > deadline:
            return load


def _child(
    gsd: float, tile_size: int, workers: int, quiet: tuple[float, float, int], env: dict[str, str]
) -> dict[str, Any]:
    """One run in a fresh interpreter; rerun (up to `tries` times) if other load disturbed it."""
    threshold, max_wait_s, tries = quiet
    cmd = [sys.executable, __file__, "--one", json.dumps([gsd, tile_size, workers])]
    env = {**os.environ, **env}
    for attempt in range(1, int(tries) + 1):
        wait_for_quiet(threshold, max_wait_s)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"benchmark run failed ({res.returncode}): {res.stderr[-2000:]}")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["process_wall_s"] = time.perf_counter() - t0  # incl. interpreter start + imports
        row["attempt"] = attempt
        row["clean"] = row["other_load_cores"] < threshold
        if row["clean"]:
            break
    return row


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median [min-max] of each measure over the undisturbed repetitions of one configuration.

    Runs that other processes disturbed even after the retries only count when no run is clean.
    """
    clean = [r for r in runs if r["clean"]]
    runs = clean or runs
    return {
        "n": len(runs),
        "n_disturbed_excluded": len(runs) - len(clean) if clean else 0,
        "tasks": runs[0]["tasks"],
        "built": runs[0]["built"],
        "wall_s": _stat([r["wall_s"] for r in runs]),
        "process_wall_s": _stat([r["process_wall_s"] for r in runs]),
        "tile_phase_s": _stat([r["tile_phase_s"] for r in runs]),
        "tiles_per_s": _stat([r["tiles_per_s"] for r in runs]),
        "mean_task_s": _stat([r["task_s_sum"] / r["tasks"] for r in runs]),
        "worker_peak_rss_mib": _stat(
            [max(w["peak_rss_mib"] for w in r["workers_detail"]) for r in runs]
        ),
        "worker_cores_used": _stat([r["worker_cores"] for r in runs]),
        "main_cores": _stat([r["main_cores"] for r in runs]),
        "other_load_cores": _stat([r["other_load_cores"] for r in runs]),
    }


PACKAGES = ("geoseg", "dask", "distributed", "laspy", "lazrs", "copclib", "rasterio", "numpy",
            "pyproj", "psutil")  # fmt: skip


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, versions, code revision."""
    import rasterio

    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "geoseg"], capture_output=True,
                           text=True)  # fmt: skip
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: metadata.version(name) for name in PACKAGES}
        | {"gdal": rasterio.__gdal_version__},
        "git_commit": commit.stdout.strip(),
        "geoseg_uncommitted_changes": bool(dirty.stdout.strip()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--json", type=Path, default=RESULTS, help="results file")
    ap.add_argument(
        "--quiet",
        type=float,
        nargs=3,
        default=(0.25, 600.0, 3),
        metavar=("CORES", "WAIT_S", "TRIES"),
        help="start runs when other processes use < CORES (wait at most WAIT_S); rerun a run "
        "disturbed by more, at most TRIES times",
    )
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="run environment")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, JSON on stdout
    args = ap.parse_args(argv)
    if args.one:
        gsd, size, workers = json.loads(args.one)
        print(json.dumps(run_once(gsd, size, workers)))
        return 0

    env = dict(kv.split("=", 1) for kv in args.env)
    results: dict[str, Any] = {
        "machine": machine(),
        "env": env,
        "reps": args.reps,
        "quiet": dict(zip(("cores", "wait_s", "tries"), args.quiet, strict=True)),
        "configs": {},
    }
    lines = [
        "| config | workers | n | tiles (tasks) | wall s | tile phase s | tiles/s | speed-up | "
        "peak RSS/worker MiB | cores: workers | cores: main | cores: other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.config:
        c = CONFIGS[name]
        print(f"[{name}] warm-up ...", file=sys.stderr)
        _child(c["gsd"], c["tile_size"], args.workers[0], args.quiet, env)
        runs: dict[int, list[dict[str, Any]]] = {w: [] for w in args.workers}
        for rep in range(args.reps):
            for w in args.workers:
                row = _child(c["gsd"], c["tile_size"], w, args.quiet, env)
                runs[w].append(row)
                print(
                    f"[{name}] rep {rep + 1}/{args.reps} workers={w}: "
                    f"{row['tiles_per_s']:.2f} tiles/s, tile phase {row['tile_phase_s']:.2f} s, "
                    f"cores: workers {row['worker_cores']:.2f}, "
                    f"main {row['main_cores']:.2f}, other load {row['other_load_cores']:.2f} cores",
                    file=sys.stderr,
                )
        summary = {w: summarize(rs) for w, rs in runs.items()}
        base = summary[args.workers[0]]["tiles_per_s"]["median"]
        for w, s in summary.items():
            s["speedup_vs_first"] = s["tiles_per_s"]["median"] / base
            lines.append(
                f"| {name} ({c['gsd']} m, {c['tile_size']} px) | {w} | {s['n']} "
                f"| {s['built']} ({s['tasks']}) | {_fmt(s['wall_s'])} | {_fmt(s['tile_phase_s'])} "
                f"| {_fmt(s['tiles_per_s'])} | {s['speedup_vs_first']:.2f}x "
                f"| {_fmt(s['worker_peak_rss_mib'], 0)} | {_fmt(s['worker_cores_used'])} "
                f"| {_fmt(s['main_cores'])} | {_fmt(s['other_load_cores'])} |"
            )
        results["configs"][name] = {
            **c,
            "summary": {str(w): s for w, s in summary.items()},
            "runs": {str(w): rs for w, rs in runs.items()},
        }
    table = "\n".join(lines)
    results["table_markdown"] = table
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
