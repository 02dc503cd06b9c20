"""The build-level outputs of a prepared benchmark, in the formats `build-dataset` writes.

stats.json (top level over all tiles, plus the per-split section of contract #1, the class set,
per-band `layer` and `band` so the datasets find layers other than N3C's), splits.json,
index.parquet + tiles.geojson, a STAC Collection with one Item per tile, protocol.json (which
evaluation the benchmark prescribes) and report.json / report.md.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pystac
import shapely
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.file import FileExtension

import geoseg
from geoseg.builder.catalog import COG, LAZ, add_file_info, new_item, save_collection
from geoseg.builder.report import write_preview
from geoseg.builder.split import SPLITS
from geoseg.builder.writers import atomic_path, write_bytes_atomic, write_json
from geoseg.classes import ClassSet
from geoseg.prepare.tiles import IMAGE_BANDS, GridTile


@dataclass(frozen=True)
class DatasetInfo:
    """What the collection, protocol.json and the report say about the benchmark."""

    id: str
    title: str
    description: str
    license: str
    url: str
    protocol: dict[str, Any]


def aggregate_stats(manifests: list[dict[str, Any]], classes: ClassSet) -> dict[str, Any]:
    """Band mean/std (exact, from per-tile sums), class counts of pixels and points, ASPRS codes."""
    sums: dict[str, dict[str, Any]] = {}
    pixels: Counter[str] = Counter()
    points: Counter[str] = Counter()
    asprs: Counter[str] = Counter()
    for m in manifests:
        for layer, st in m["stats"].items():
            for i, name in enumerate(m["layers"][layer]):
                entry = sums.setdefault(name, {"layer": layer, "band": i + 1, "sums": np.zeros(3)})
                entry["sums"] += (st["count"][i], st["sum"][i], st["sumsq"][i])
        pixels.update(m["pixels"])
        points.update(m["points"]["classes"])
        asprs.update(m["points"]["asprs"])
    bands = {}
    for name, entry in sums.items():
        n, s, ss = entry["sums"]
        mean = s / n if n else 0.0
        std = float(np.sqrt(max(ss / n - mean**2, 0.0))) if n else 0.0
        bands[name] = {
            "layer": entry["layer"],
            "band": entry["band"],
            "mean": float(mean),
            "std": std,
            "count": int(n),
        }
    return {
        "bands": bands,
        "pixels": {k: pixels.get(k, 0) for k in classes.names},
        "points": {k: points.get(k, 0) for k in classes.names},
        "asprs": dict(sorted(asprs.items(), key=lambda kv: int(kv[0]))),
    }


def write_stats(out: Path, manifests: list[dict[str, Any]], classes: ClassSet) -> dict[str, Any]:
    """stats.json: all tiles at the top level, each split under `splits` (contract #1)."""
    stats = aggregate_stats(manifests, classes)
    stats["splits"] = {
        split: aggregate_stats([m for m in manifests if m["split"] == split], classes)
        for split in SPLITS
    }
    stats |= classes.stats_keys()
    write_json(out / "stats.json", stats)
    return stats


def _classification(classes: ClassSet) -> list[Classification]:
    return [
        Classification.create(
            value=v,
            name=name,
            description=classes.descriptions[v] or name,
            color_hint="{:02X}{:02X}{:02X}".format(*classes.colors[v][:3]),
        )
        for v, name in enumerate(classes.names)
    ]


def tile_item(manifest: dict[str, Any], info: DatasetInfo, classes: ClassSet) -> pystac.Item:
    properties = {
        "geoseg:dataset": info.id,
        "geoseg:split": manifest["split"],
        "geoseg:missing_bands": manifest["missing_bands"],
        # class order (tile.json is written with sorted keys)
        "geoseg:pixel_counts": {k: manifest["pixels"][k] for k in classes.names},
        "geoseg:point_counts": {k: manifest["points"]["classes"][k] for k in classes.names},
    }
    tile = GridTile.from_dict(manifest["tile"])
    item = new_item(tile, manifest["datetime"], properties, info.id)
    FileExtension.add_to(item)
    ClassificationExtension.add_to(item)
    for name, meta in manifest["files"].items():
        key = name.rsplit(".", 1)[0]
        bands = manifest["layers"].get(key, IMAGE_BANDS if key == "image" else [key])
        asset = pystac.Asset(
            f"./{name}",
            title=f"{key}: {', '.join(bands[:4])}{' ...' if len(bands) > 4 else ''}",
            media_type=LAZ if name.endswith(".laz") else COG,
            roles=["data"],
        )
        item.add_asset(key, asset)
        if key.startswith("label"):
            ClassificationExtension.ext(asset).classes = _classification(classes)
        add_file_info(asset, meta)
    return item


def write_index(out: Path, manifests: list[dict[str, Any]], classes: ClassSet) -> None:
    """index.parquet (the datasets' split reader) and tiles.geojson (the same rows, for GIS)."""
    rows = []
    for m in manifests:
        t = m["tile"]
        labelled = sum(m["pixels"][k] for k in classes.real) or 1
        rows.append(
            {
                "tile_id": m["tile_id"],
                "split": m["split"],
                "epsg": t["epsg"],
                "crs_wkt": t["crs_wkt"],
                "gsd": t["gsd"],
                "size": t["size"],
                "xmin": t["bounds"][0],
                "ymin": t["bounds"][1],
                "xmax": t["bounds"][2],
                "ymax": t["bounds"][3],
                "year": m["year"],
                "datetime": m["datetime"],
                "points": m["points"]["count"],
                **{f"frac_{k}": m["pixels"][k] / labelled for k in classes.real},
                "frac_unlabeled": m["pixels"][classes.names[0]] / (t["size"] * t["size"]),
                "path": f"tiles/{m['tile_id']}",
                "geometry": GridTile.from_dict(t).footprint_lonlat(),
            }
        )
    gdf = gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")
    with atomic_path(out / "index.parquet") as tmp:
        gdf.to_parquet(tmp, index=False)
    with atomic_path(out / "tiles.geojson") as tmp:
        gdf.to_file(tmp, driver="GeoJSON", layer="tiles")


def write_collection(
    out: Path, manifests: list[dict[str, Any]], info: DatasetInfo, classes: ClassSet
) -> None:
    """collection.json and one item per tile beside its files (tiles/<id>/<id>.json)."""
    items = [tile_item(m, info, classes) for m in manifests]
    extent = pystac.Extent(
        pystac.SpatialExtent(
            [list(shapely.union_all([shapely.box(*i.bbox) for i in items]).bounds)]
        ),
        pystac.TemporalExtent([[min(i.datetime for i in items), max(i.datetime for i in items)]]),
    )
    collection = pystac.Collection(
        id=info.id,
        description=info.description,
        extent=extent,
        title=info.title,
        license=info.license,
        summaries=pystac.Summaries({"geoseg:split": sorted({m["split"] for m in manifests})}),
    )
    collection.add_link(pystac.Link("about", info.url, title=f"{info.title} (release, licence)"))
    protocol = ("protocol", "./protocol.json", pystac.MediaType.JSON, "the benchmark's evaluation")
    report = ("report", "./report.json", pystac.MediaType.JSON, "prepare report")
    preview = ("preview", "./preview.png", pystac.MediaType.PNG, "image / label / DSM preview")
    save_collection(out, collection, items, _classification(classes), [protocol, report, preview])


def write_outputs(
    out: Path,
    manifests: list[dict[str, Any]],
    info: DatasetInfo,
    classes: ClassSet,
    report: dict[str, Any],
) -> dict[str, Any]:
    """Every build-level file, from the finished tiles' manifests; returns the report."""
    manifests = sorted(manifests, key=lambda m: m["tile_id"])
    stats = write_stats(out, manifests, classes)
    by_split: dict[str, list[str]] = {}
    for m in manifests:
        by_split.setdefault(m["split"], []).append(m["tile_id"])
    write_json(out / "splits.json", by_split)
    write_index(out, manifests, classes)
    write_collection(out, manifests, info, classes)
    write_json(out / "protocol.json", info.protocol)
    write_preview(out, manifests)
    report = {
        "geoseg_version": geoseg.__version__,
        "dataset": info.id,
        **report,
        "splits": {k: len(v) for k, v in sorted(by_split.items())},
        "labelled_pixels": {
            s: sum(stats["splits"][s]["pixels"][c] for c in classes.real) for s in SPLITS
        },
        "stats": {"pixels": stats["pixels"], "points": stats["points"]},
    }
    write_json(out / "report.json", report)
    write_bytes_atomic(out / "report.md", lambda p: p.write_text(_markdown(report, stats, info)))
    return report


def _markdown(report: dict[str, Any], stats: dict[str, Any], info: DatasetInfo) -> str:
    lines = [
        f"# geoseg prepare report: {info.title}",
        "",
        f"- source: {report['src']}",
        f"- tiles: {report['tiles']['written']} written, {report['tiles']['cached']} from an "
        f"earlier run, {len(report['skipped'])} skipped",
        "- splits: " + ", ".join(f"{k} {v}" for k, v in report["splits"].items()),
        f"- protocol: {info.protocol['name']} ({', '.join(info.protocol['metrics'])})",
        "",
        "| class | pixels | points |",
        "|---|---:|---:|",
        *(f"| {c} | {n:,} | {stats['points'][c]:,} |" for c, n in stats["pixels"].items()),
    ]
    if report["skipped"]:
        lines += ["", "## Skipped tiles", ""]
        lines += [f"- `{s['tile_id']}`: {s['reason']}" for s in report["skipped"]]
    for note in report.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"
