"""Dataset statistics, the build report (JSON + Markdown) and a preview picture.

Band mean/std are aggregated from per-tile sums (exact, order-independent); training reads them
from `stats.json` instead of hard-coding ImageNet or NAIP constants. The top-level statistics
cover every finished tile (what the report describes); `splits` repeats them per split, because
training must normalise and weight classes with the train split alone: statistics that include
val and test tiles leak them into the model.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Mapping
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

import geoseg
from geoseg.builder.split import SPLITS
from geoseg.builder.writers import write_bytes_atomic, write_json
from geoseg.classes import N3C, UNLABELED_NAME

STAT_BANDS = {
    "image": ("red", "green", "blue", "nir"),
    "dsm": ("dsm",),
    "intensity": ("intensity",),
}


def _sums(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """bands (mean/std/count), pixels, points and asprs counts of some tiles' manifests."""
    out: dict[str, Any] = {"bands": {}}
    for layer, names in STAT_BANDS.items():
        n = np.zeros(len(names))
        s = np.zeros(len(names))
        ss = np.zeros(len(names))
        for m in manifests:
            st = m["stats"][layer]
            n += st["count"]
            s += st["sum"]
            ss += st["sumsq"]
        mean = np.divide(s, n, out=np.zeros_like(s), where=n > 0)
        var = np.divide(ss, n, out=np.zeros_like(s), where=n > 0) - mean**2
        for i, name in enumerate(names):
            out["bands"][name] = {
                "layer": layer,
                "mean": float(mean[i]),
                "std": float(np.sqrt(max(var[i], 0.0))),
                "count": int(n[i]),
            }
    pixels, points, asprs = Counter(), Counter(), Counter()
    for m in manifests:
        pixels.update(m["pixels"])
        points.update(m["points"]["n3c"])
        asprs.update(m["points"]["asprs"])
    out["pixels"] = {k: pixels.get(k, 0) for k in N3C.names}
    out["points"] = {k: points.get(k, 0) for k in N3C.names}
    out["asprs"] = dict(sorted(asprs.items(), key=lambda kv: int(kv[0])))
    return out


def aggregate_stats(
    manifests: list[dict[str, Any]], splits: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """stats.json: statistics of all tiles, class names/colours and, given the tile id -> split
    map, `splits` = the same statistics per split (train, val, test; an empty split has zero
    counts). Buffer tiles count only in the top level."""
    out = _sums(manifests)
    out |= N3C.stats_keys()
    if splits is not None:
        out["splits"] = {
            name: _sums([m for m in manifests if splits.get(m["tile_id"]) == name])
            for name in SPLITS
        }
    return out


def write_report(out: Path, summary, splits: dict[str, str], search: dict, cfg) -> dict[str, Any]:
    """Write stats.json, splits.json, report.json, report.md and preview.png; return the report."""
    done = [r for r in summary.results if r.status in ("built", "cached")]
    stats = aggregate_stats([r.manifest for r in done], splits)
    write_json(out / "stats.json", stats)
    by_split: dict[str, list[str]] = {}
    for tid, s in sorted(splits.items()):
        by_split.setdefault(s, []).append(tid)
    write_json(out / "splits.json", by_split)
    failed = [
        {"tile_id": r.tile_id, "reason": r.reason} for r in summary.results if r.status == "failed"
    ]
    skipped = [
        {"tile_id": r.tile_id, "reason": r.reason} for r in summary.results if r.status == "skipped"
    ]
    skipped += [{"tile_id": t, "reason": why} for t, why in summary.skipped_at_plan]
    built_secs = [r.seconds for r in summary.results if r.status == "built"]
    report = {
        "geoseg_version": geoseg.__version__,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "search": search,
        "tiles": {
            "built": summary.count("built"),
            "cached": summary.count("cached"),
            "skipped": len(skipped),
            "failed": len(failed),
            "total_ok": len(done),
            "not_attempted": summary.not_attempted,
        },
        "splits": {k: len(v) for k, v in by_split.items()},
        "seconds": round(summary.seconds, 2),
        "seconds_per_built_tile": round(float(np.mean(built_secs)), 3) if built_secs else None,
        "workers": dict(Counter(r.worker for r in summary.results if r.status == "built")),
        "failed": failed,
        "skipped": sorted(skipped, key=lambda d: d["tile_id"]),
        "stats": {"pixels": stats["pixels"], "points": stats["points"]},
    }
    write_json(out / "report.json", report)
    write_bytes_atomic(out / "report.md", lambda p: p.write_text(_markdown(report, stats)))
    write_preview(out, [r.manifest for r in done])
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
    if report["skipped"]:
        reasons = Counter(d["reason"] for d in report["skipped"])
        lines += ["", "## Skipped tiles", ""] + [
            f"- {n} × {why}" for why, n in reasons.most_common()
        ]
    return "\n".join(lines) + "\n"


def write_preview(out: Path, manifests: list[dict[str, Any]], n: int = 4) -> None:
    """A PNG of image / label / DSM for up to `n` tiles showing the most classes, in the
    build's palette (read from the stats.json already written). Shared with `geoseg prepare`."""
    from geoseg.plot import plot_tiles  # matplotlib: only when a preview is drawn

    if not manifests:
        return
    ranked = sorted(manifests, key=_variety, reverse=True)
    # Round-robin over grids (CRS) so every site of a multi-site build shows up.
    by_grid: dict[Any, list[str]] = {}
    for m in ranked:
        by_grid.setdefault(m["tile"]["epsg"], []).append(m["tile_id"])
    picks = [t for group in zip_longest(*by_grid.values()) for t in group if t][:n]
    fig = plot_tiles(out, picks, panels=("rgb", "label", "dsm"))
    write_bytes_atomic(out / "preview.png", lambda p: fig.savefig(p, dpi=80, format="png"))


def _variety(manifest: dict[str, Any]) -> tuple[int, int]:
    """Rank tiles for the preview: more classes present first, then fewer unlabeled pixels
    (any class set: `pixels` maps class names, "unlabeled" included, to counts)."""
    px = manifest["pixels"]
    present = sum(1 for k, n in px.items() if k != UNLABELED_NAME and n > 0)
    return present, -px.get(UNLABELED_NAME, 0)
