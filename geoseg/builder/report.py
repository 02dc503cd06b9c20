"""Dataset statistics, splits, the build report (JSON + Markdown) and a preview picture.

Band mean/std are aggregated from per-tile sums (exact, order-independent); training reads them
from `stats.json` instead of hard-coding ImageNet or NAIP constants. The top-level statistics
cover every finished tile (what the report describes); `splits` repeats them per split, because
training must normalise and weight classes with the train split alone: statistics that include
val and test tiles leak them into the model.

Everything is summed over the columns of `TileRows` (one row per tile, sorted by id), never
over manifests or result objects, so a state-wide build's statistics cost seconds.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

import geoseg
from geoseg.builder.ledger import BANDS, TileRows
from geoseg.builder.split import NAMES, SPLITS
from geoseg.builder.writers import write_bytes_atomic, write_json
from geoseg.classes import N3C, UNLABELED_NAME

MAX_LISTED = 10_000
"""Failed tiles listed one by one in report.json (the count is always exact)."""
EXAMPLES = 5
"""Tile ids shown per skip reason."""


@dataclass
class BuildSummary:
    """What happened to the planned tiles, in counts: no per-tile objects are kept."""

    out: Path
    seconds: float = 0.0
    tile_seconds: float = 0.0
    """Wall time of the tile tasks alone: throughput without search, cluster start-up, report."""
    statuses: Counter = field(default_factory=Counter)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    workers: Counter = field(default_factory=Counter)
    built_seconds: float = 0.0
    task_seconds: float = 0.0
    """Summed run time of every tile task (built, skipped or failed)."""
    tasks: int = 0
    """Tiles handed to dask in this run (finished ones found by the resume scan are not)."""
    not_attempted: int = 0
    """Planned tiles left untried because `--max-tiles` tiles were ready."""

    def count(self, status: str) -> int:
        return self.statuses[status]

    def add(self, tile_id: str, status: str, reason: str = "", seconds: float = 0.0,
            worker: str = "") -> None:  # fmt: skip
        self.statuses[status] += 1
        self.task_seconds += seconds
        if status == "failed":
            self.failed.append((tile_id, reason))
        elif status == "skipped":
            self.skipped[reason] += 1
            examples = self.skipped_examples.setdefault(reason, [])
            if len(examples) < EXAMPLES:
                examples.append(tile_id)
        elif status == "built":
            self.workers[worker] += 1
            self.built_seconds += seconds


def _sums(rows: TileRows, sel: np.ndarray | slice) -> dict[str, Any]:
    """bands (mean/std/count), pixels, points and asprs counts of the rows `sel`."""
    n = rows.band_count[sel].sum(axis=0).astype(np.float64)
    s = rows.band_sum[sel].sum(axis=0)
    ss = rows.band_sumsq[sel].sum(axis=0)
    mean = np.divide(s, n, out=np.zeros_like(s), where=n > 0)
    var = np.divide(ss, n, out=np.zeros_like(s), where=n > 0) - mean**2
    bands = {
        name: {
            "layer": layer,
            "mean": float(mean[b]),
            "std": float(np.sqrt(max(var[b], 0.0))),
            "count": int(n[b]),
        }
        for b, (layer, _, name) in enumerate(BANDS)
    }
    pixels, points = rows.pixels[sel].sum(axis=0), rows.class_points[sel].sum(axis=0)
    asprs = rows.asprs[sel].sum(axis=0)
    return {
        "bands": bands,
        "pixels": {k: int(pixels[i]) for i, k in enumerate(N3C.names)},
        "points": {k: int(points[i]) for i, k in enumerate(N3C.names)},
        "asprs": {str(c): int(v) for c, v in zip(rows.asprs_codes, asprs, strict=True) if v},
    }


def aggregate_stats(rows: TileRows, splits: np.ndarray | None = None) -> dict[str, Any]:
    """stats.json: statistics of all tiles, class names/colours and, given each row's split code
    (`geoseg.builder.split.NAMES`), `splits` = the same statistics per split (train, val, test;
    an empty split has zero counts). Buffer tiles count only in the top level."""
    out = _sums(rows, slice(None))
    out |= N3C.stats_keys()
    if splits is not None:
        out["splits"] = {name: _sums(rows, splits == NAMES.index(name)) for name in SPLITS}
    return out


def write_report(
    out: Path, summary: BuildSummary, rows: TileRows, splits: np.ndarray, search: dict
) -> dict[str, Any]:
    """Write stats.json, splits.json, report.json, report.md and preview.png; return the report.

    `rows` are the finished tiles sorted by id, `splits` their split codes.
    """
    stats = aggregate_stats(rows, splits)
    write_json(out / "stats.json", stats)
    ids = rows.tile_id.to_numpy(zero_copy_only=False)
    by_split = {name: ids[splits == k].tolist() for k, name in enumerate(NAMES)}
    write_json(out / "splits.json", {k: v for k, v in by_split.items() if v})
    failed = sorted(summary.failed)
    report = {
        "geoseg_version": geoseg.__version__,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "search": search,
        "tiles": {
            "built": summary.count("built"),
            "cached": summary.count("cached"),
            "skipped": sum(summary.skipped.values()),
            "failed": len(failed),
            "total_ok": len(rows),
            "not_attempted": summary.not_attempted,
        },
        "splits": {k: len(v) for k, v in by_split.items() if v},
        "seconds": round(summary.seconds, 2),
        "seconds_per_built_tile": (
            round(summary.built_seconds / summary.count("built"), 3)
            if summary.count("built")
            else None
        ),
        "workers": dict(summary.workers),
        "failed": [{"tile_id": t, "reason": why} for t, why in failed[:MAX_LISTED]],
        "failed_not_listed": max(0, len(failed) - MAX_LISTED),
        "skipped": [
            {"reason": why, "count": n, "examples": summary.skipped_examples[why]}
            for why, n in sorted(summary.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        "stats": {"pixels": stats["pixels"], "points": stats["points"]},
    }
    write_json(out / "report.json", report)
    write_bytes_atomic(out / "report.md", lambda p: p.write_text(_markdown(report, stats)))
    present = (rows.pixels[:, 1:] > 0).sum(axis=1)
    _draw_preview(out, preview_picks(ids, rows.epsg, present, rows.pixels[:, 0], 4))
    return report


def _markdown(report: dict[str, Any], stats: dict[str, Any]) -> str:
    t = report["tiles"]
    s = report["search"]
    lines = [
        f"# geoseg build report: {s['region']}",
        "",
        f"- catalog: {s['catalog']} ({s['stac_url']}), dates: {s['datetime'] or 'any'}",
        f"- inputs: {s['imagery_items']} NAIP items, {s['lidar_items']} LiDAR items",
        f"- tiles: {t['total_ok']} ready ({t['built']} built, {t['cached']} from earlier runs), "
        f"{t['skipped']} skipped, {t['failed']} failed, in {report['seconds']} s"
        + (f"; {t['not_attempted']} not tried (--max-tiles)" if t["not_attempted"] else ""),
        "- splits: " + ", ".join(f"{k} {v}" for k, v in sorted(report["splits"].items())),
        "",
        "| class | pixels | points |",
        "|---|---:|---:|",
    ]
    lines += [f"| {c} | {stats['pixels'][c]:,} | {stats['points'][c]:,} |" for c in N3C.names]
    lines += ["", "| band | mean | std |", "|---|---:|---:|"]
    lines += [f"| {b} | {v['mean']:.3f} | {v['std']:.3f} |" for b, v in stats["bands"].items()]
    if report["failed"]:
        lines += ["", "## Failed tiles", ""] + [
            f"- `{f['tile_id']}`: {f['reason']}" for f in report["failed"]
        ]
        if report["failed_not_listed"]:
            lines.append(f"- ... and {report['failed_not_listed']} more")
    if report["skipped"]:
        lines += ["", "## Skipped tiles", ""] + [
            f"- {d['count']} × {d['reason']}" for d in report["skipped"]
        ]
    return "\n".join(lines) + "\n"


def write_preview(out: Path, manifests: list[dict[str, Any]], n: int = 4) -> None:
    """A PNG of image / label / DSM for up to `n` tiles showing the most classes, in the
    build's palette (read from the stats.json already written). Shared with `geoseg prepare`,
    whose manifests may use any class set (`pixels` maps class names, "unlabeled" included)."""
    present = [sum(1 for k, v in m["pixels"].items() if k != UNLABELED_NAME and v > 0)
               for m in manifests]  # fmt: skip
    _draw_preview(
        out,
        preview_picks(
            [m["tile_id"] for m in manifests],
            np.array([m["tile"]["epsg"] or -1 for m in manifests], np.int64),
            np.array(present, np.int64),
            np.array([m["pixels"].get(UNLABELED_NAME, 0) for m in manifests], np.int64),
            n,
        ),
    )


def preview_picks(
    tile_ids: Sequence[str], grid: np.ndarray, present: np.ndarray, unlabeled: np.ndarray, n: int
) -> list[str]:
    """The tiles a preview shows: more classes present first, then fewer unlabeled pixels, then
    tile id; taken round-robin over grids (CRS) so every site of a multi-site build shows up."""
    ranked = np.lexsort((np.arange(len(tile_ids)), unlabeled, -present))
    by_grid: dict[int, list[str]] = {}
    for i in ranked:
        group = by_grid.setdefault(int(grid[i]), [])
        if len(group) < n:
            group.append(tile_ids[i])
    return [t for group in zip_longest(*by_grid.values()) for t in group if t][:n]


def _draw_preview(out: Path, picks: list[str]) -> None:
    from geoseg.plot import plot_tiles  # matplotlib: only when a preview is drawn

    if not picks:
        return
    fig = plot_tiles(out, picks, panels=("rgb", "label", "dsm"))
    write_bytes_atomic(out / "preview.png", lambda p: fig.savefig(p, dpi=80, format="png"))
