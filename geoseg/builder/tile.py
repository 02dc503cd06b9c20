"""Build one tile: the unit of work that dask schedules.

A tile is finished when its manifest `tile.json` exists (written last, atomically) and the files it
lists are present with the recorded sizes. Its STAC item is written just before the manifest, by
the worker that built the tile. A rerun returns finished tiles without touching them; anything
else is rebuilt from scratch, which is safe because every output is deterministic.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import laspy
import lazrs
import numpy as np
import rasterio

import geoseg
from geoseg.builder.catalog import ITEM_JSON, write_item
from geoseg.builder.errors import TileError, short_reason
from geoseg.builder.grid import TileSpec
from geoseg.builder.imagery import BANDS, IMAGE_NODATA, read_tile_image
from geoseg.builder.points import read_tile_points
from geoseg.builder.rasterize import FLOAT_NODATA, rasterize
from geoseg.builder.writers import (
    IMAGE_COLORINTERP,
    safe_join,
    sha256,
    write_cog,
    write_json,
    write_laz,
)
from geoseg.classes import ASPRS_TO_N3C, N3C, remap_asprs
from geoseg.stac.items import ImageryItem, PointCloudItem
from geoseg.stac.retry import DEFAULT_POLICY, RetryPolicy
from geoseg.stac.signing import Signer

MANIFEST = "tile.json"
RASTERS = ("image", "label", "dsm", "intensity", "num_returns")
FILES = (*[f"{r}.tif" for r in RASTERS], "points.laz")


@dataclass(frozen=True)
class TileJob:
    """Everything one task needs; small and picklable (no open handles, no clients)."""

    tile: TileSpec
    imagery: tuple[ImageryItem, ...]
    lidar: tuple[PointCloudItem, ...]
    signer: Signer
    out_dir: str
    min_coverage: float = 0.25
    policy: RetryPolicy = DEFAULT_POLICY


@dataclass
class TileResult:
    tile_id: str
    status: str  # "built" | "cached" | "skipped" | "failed"
    reason: str = ""
    seconds: float = 0.0
    worker: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    stamp: int = -1
    """tile.json's mtime (ns) for a built or cached tile: the ledger's proof of that manifest."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tile_dir(out_dir: Path, tile_id: str) -> Path:
    return safe_join(out_dir, "tiles", tile_id)


def item_path(folder: Path) -> Path:
    """The tile's STAC item, `tiles/<id>/<id>.json`."""
    return folder / ITEM_JSON.format(id=folder.name)


def read_finished(folder: Path | str) -> tuple[dict[str, Any], int] | None:
    """(manifest, tile.json's mtime in ns) of a finished tile, or None if it must be (re)built.

    Plain `os` calls on strings: a resume checks 1.6 M tiles this way, and pathlib's objects
    cost more than the system calls.
    """
    base = os.fspath(folder)
    try:
        with open(os.path.join(base, MANIFEST), "rb") as f:
            stamp = os.fstat(f.fileno()).st_mtime_ns
            manifest = json.loads(f.read())
        for name, meta in manifest["files"].items():
            if os.stat(os.path.join(base, name)).st_size != meta["size"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest, stamp


def load_finished(folder: Path | str) -> dict[str, Any] | None:
    """The manifest of a finished tile, or None if the tile must be (re)built."""
    found = read_finished(folder)
    return None if found is None else found[0]


def _band_stats(
    data: np.ndarray, valid: np.ndarray, missing: tuple[int, ...] = ()
) -> dict[str, list[float]]:
    """Sums for dataset-wide mean/std: exact to aggregate across tiles, unlike per-tile means.

    Bands missing from the source (NIR of 3-band scenes) count zero pixels, so their zeros don't
    drag the dataset's NIR statistics down.
    """
    vals = data[:, valid].astype(np.float64)
    vals[list(missing)] = 0.0
    counts = [0 if b in missing else int(valid.sum()) for b in range(data.shape[0])]
    return {
        "count": counts,
        "sum": vals.sum(axis=1).tolist(),
        "sumsq": (vals * vals).sum(axis=1).tolist(),
    }


def _coverage(mask: np.ndarray, block: int) -> float:
    """Fraction of `block`-px cells holding at least one True (LiDAR gaps vs. sparse sampling)."""
    n = mask.shape[0] // block * block
    if n == 0:
        return float(mask.any())
    cells = mask[:n, :n].reshape(n // block, block, n // block, block).any(axis=(1, 3))
    return float(cells.mean())


def build_tile(job: TileJob) -> TileResult:
    """Build (or find finished) one tile; never raises for per-tile problems."""
    t0 = time.perf_counter()
    tile = job.tile
    folder = tile_dir(Path(job.out_dir), tile.id)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    finished = read_finished(folder)
    if finished is not None:
        manifest, stamp = finished
        return TileResult(tile.id, "cached", manifest=manifest, worker=worker, stamp=stamp)
    try:
        status, reason, manifest = _build(job, folder)
    except TileError as exc:
        status, reason, manifest = "failed", str(exc), {}
    except Exception as exc:  # a bug or an unforeseen input: report it, keep the build going
        status, reason, manifest = "failed", f"{type(exc).__name__}: {short_reason(exc)}", {}
    stamp = os.stat(folder / MANIFEST).st_mtime_ns if status == "built" else -1
    return TileResult(tile.id, status, reason, time.perf_counter() - t0, worker, manifest, stamp)


def _build(job: TileJob, folder: Path) -> tuple[str, str, dict[str, Any]]:
    tile = job.tile
    if not job.imagery:
        return "skipped", "no NAIP coverage", {}
    if not job.lidar:
        return "skipped", "no LiDAR coverage", {}
    image = read_tile_image(tile, list(job.imagery), job.signer, job.policy)
    img_cov = float(image.valid.mean())
    if img_cov < job.min_coverage:
        return "skipped", f"NAIP covers less than {job.min_coverage:.0%} of the tile", {}
    points = read_tile_points(tile, list(job.lidar), job.signer, job.policy)
    if len(points) == 0:
        return "skipped", "no LiDAR points in the tile", {}
    rasters = rasterize(points.arrays, tile)
    occupied = rasters.num_returns > 0
    lidar_cov = _coverage(occupied, max(1, round(4.0 / tile.gsd)))
    if lidar_cov < job.min_coverage:
        return "skipped", f"LiDAR covers less than {job.min_coverage:.0%} of the tile", {}

    label = rasters.label.copy()
    label[~image.valid] = 0  # a label without imagery under it cannot be learned from
    scene = next(i for i in job.imagery if i.id == image.items[0])
    class_tags = {"CLASS_NAMES": ",".join(N3C.names)}
    write_cog(
        folder / "image.tif",
        image.data,
        tile,
        nodata=IMAGE_NODATA,
        descriptions=BANDS,
        colorinterp=IMAGE_COLORINTERP,
        tags={"MISSING_BANDS": ",".join(image.missing_bands)},
    )
    write_cog(
        folder / "label.tif",
        label,
        tile,
        nodata=0,
        descriptions=["label"],
        colormap=N3C.colormap(),
        tags=class_tags,
    )
    write_cog(folder / "dsm.tif", rasters.dsm, tile, nodata=FLOAT_NODATA, descriptions=["dsm_m"])
    write_cog(
        folder / "intensity.tif",
        rasters.intensity,
        tile,
        nodata=FLOAT_NODATA,
        descriptions=["intensity"],
    )
    write_cog(
        folder / "num_returns.tif",
        rasters.num_returns,
        tile,
        nodata=0,
        descriptions=["number_of_returns"],
    )
    write_laz(folder / "points.laz", points.arrays, tile, scene.datetime.date())

    cls = points.arrays["classification"]
    asprs_codes, asprs_counts = np.unique(cls, return_counts=True)
    n3c_points = np.bincount(remap_asprs(cls), minlength=len(N3C))
    dsm_valid = rasters.dsm != FLOAT_NODATA
    manifest = {
        "tile_id": tile.id,
        "tile": asdict(tile) | {"bounds": tile.bounds},
        "geoseg_version": geoseg.__version__,
        "versions": {
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
            "laspy": laspy.__version__,
            "lazrs": getattr(lazrs, "__version__", "unknown"),
        },
        "inputs": {
            "imagery": [_input(i) for i in job.imagery if i.id in image.items],
            "lidar": [_input(i) for i in job.lidar if i.id in points.items],
            "lidar_project": points.project,
            "lidar_source_crs": points.source_crs,
        },
        "datetime": scene.datetime.isoformat(),
        "year": scene.year,
        "missing_bands": image.missing_bands,
        "coverage": {"imagery": img_cov, "lidar": lidar_cov},
        "points": {
            "count": len(points),
            "n3c": {N3C.names[k]: int(v) for k, v in enumerate(n3c_points)},
            "asprs": {str(int(c)): int(n) for c, n in zip(asprs_codes, asprs_counts, strict=True)},
        },
        "pixels": {
            N3C.names[k]: int(v)
            for k, v in enumerate(np.bincount(label.ravel(), minlength=len(N3C)))
        },
        "stats": {
            "image": _band_stats(
                image.data, image.valid, tuple(BANDS.index(b) for b in image.missing_bands)
            ),
            "dsm": _band_stats(rasters.dsm[None], dsm_valid),
            "intensity": _band_stats(rasters.intensity[None], dsm_valid),
        },
        "label_rule": "highest labelled point per pixel; ASPRS->N3C " + str(ASPRS_TO_N3C),
        "files": {
            name: {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
            for name in FILES
        },
    }
    write_item(folder, manifest)
    write_json(folder / MANIFEST, manifest)  # last: the tile is finished
    return "built", "", manifest


def _input(item: ImageryItem | PointCloudItem) -> dict[str, str]:
    return {"id": item.id, "collection": item.collection, "href": item.href}
