"""Tiles of a `geoseg build-dataset` folder as retrieval items: metadata, statistics, RGB.

Captions, relevance grades and index metadata all come from one `TileInfo` per tile, which
carries its build's class set (N3C, or a `geoseg prepare` benchmark's: stats.json). Its
statistics (heights above ground, NDVI, terrain) need the tile's rasters and points, so they are
computed once and cached in the build folder (`retrieval_stats.parquet`, keyed by tile id and
a stats version); later calls read only that file and `index.parquet`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import torch
from scipy import ndimage
from torch import Tensor
from tqdm import tqdm

from geoseg.builder.writers import atomic_path, safe_join
from geoseg.classes import N3C, build_classes
from geoseg.plot import TileLayers, read_tile, stretch

CLASSES: tuple[str, ...] = N3C.real
"""N3C's labelled classes (others, ground, tree, building): a `TileInfo`'s default class set."""

STATS_FILE = "retrieval_stats.parquet"
STATS_VERSION = 4
"""Bump when `tile_stats` changes so stale caches are recomputed."""

GROUND_LEVEL: frozenset[str] = frozenset(
    {
        "ground",  # N3C: ASPRS 2 only
        "impervious_surfaces",  # ISPRS
        "low_vegetation",
        "healthy_grass",  # DFC2018
        "stressed_grass",
        "artificial_turf",
        "bare_earth",
        "roads",
        "sidewalks",
        "crosswalks",
        "major_thoroughfares",
        "paved_parking_lots",
        "unpaved_parking_lots",
    }
)
"""Classes whose points lie on the ground, in the class sets geoseg builds; the ground surface
under a tile is interpolated from their points (a class set naming none: a low DSM quantile)."""
GROUND_CELL_M = 4.0
"""Ground points are binned on cells of this size (median z) before interpolation: coarse
enough that every cell under a canopy usually holds some ground returns."""


@dataclass(frozen=True)
class TileInfo:
    """One tile as the retrieval side sees it (no pixels)."""

    tile_id: str
    split: str
    bbox: tuple[float, float, float, float]
    """lon/lat W, S, E, N."""
    crs: str
    year: int
    class_fractions: dict[str, float] = field(default_factory=dict)
    """Each class's share of the *labelled* pixels (sums to 1, or all 0)."""
    stats: dict[str, float | None] = field(default_factory=dict)
    """See `tile_stats`: heights (m), NDVI, terrain relief (m) and slope (deg); None = unknown."""
    classes: tuple[str, ...] = CLASSES
    """The build's labelled classes (label values 1..K-1), N3C's by default."""

    @property
    def dominant(self) -> str | None:
        """Class with the largest labelled share, None for a tile without labels."""
        if not any(self.class_fractions.values()):
            return None
        return max(self.classes, key=lambda c: self.class_fractions.get(c, 0.0))


def load_tiles(data: Path, split: str | None = None, progress: bool = False) -> list[TileInfo]:
    """Every tile of a build folder (or one split), sorted by tile id, statistics cached."""
    data = Path(data)
    index_path = data / "index.parquet"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found; is {data} a geoseg build-dataset output?")
    index = gpd.read_parquet(index_path).sort_values("tile_id").reset_index(drop=True)
    if index.crs is not None and index.crs.to_epsg() != 4326:
        index = index.to_crs(4326)  # TileInfo.bbox is lon/lat
    if split is not None:
        if split not in set(index["split"]):
            raise ValueError(f"split {split!r} of {data} has no tiles")
        index = index[index["split"] == split].reset_index(drop=True)
    stats = _cached_stats(data, index, progress)
    classes = build_classes(data).real
    return [
        _tile_info(row, stats.get(row["tile_id"], {}), classes) for row in index.to_dict("records")
    ]


def _tile_info(row: dict[str, Any], stats: dict[str, Any], classes: tuple[str, ...]) -> TileInfo:
    # index.parquet's frac_<class> are already shares of the labelled pixels; renormalise only
    # against rounding.
    raw = {c: float(row[f"frac_{c}"]) for c in classes}
    total = sum(raw.values())
    fractions = {c: (v / total if total > 0 else 0.0) for c, v in raw.items()}
    return TileInfo(
        tile_id=row["tile_id"],
        split=row["split"],
        bbox=tuple(float(v) for v in row["geometry"].bounds),
        crs=f"EPSG:{int(row['epsg'])}",
        year=int(row["year"]),
        class_fractions=fractions,
        stats={k: (None if v is None or _isnan(v) else float(v)) for k, v in stats.items()},
        classes=classes,
    )


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _cached_stats(data: Path, index: pd.DataFrame, progress: bool) -> dict[str, dict[str, Any]]:
    """Stats of the index's tiles: read from the cache, compute the missing ones, save."""
    path = data / STATS_FILE
    cached = pd.DataFrame()
    if path.is_file():
        cached = pd.read_parquet(path)
        cached = cached[cached["version"] == STATS_VERSION]
    have = set(cached["tile_id"]) if not cached.empty else set()
    todo = [t for t in index["tile_id"] if t not in have]
    if todo:
        rows = [
            {"tile_id": t, "version": STATS_VERSION, **tile_stats(data, t)}
            for t in tqdm(todo, desc="tile stats", unit="tile", disable=not progress)
        ]
        cached = pd.concat([cached, pd.DataFrame(rows)], ignore_index=True)
        try:
            with atomic_path(path) as tmp:
                cached.to_parquet(tmp, index=False)
        except OSError:
            pass  # a read-only build folder still works, it just recomputes next time
    return cached.drop(columns="version").set_index("tile_id").to_dict("index")


def tile_stats(data: Path, tile_id: str) -> dict[str, float | None]:
    """Heights above ground, NDVI and terrain of one built tile.

    The ground surface is the LiDAR's own ground class binned and interpolated, not the DSM,
    because the canopy and roofs hide the ground in the DSM; tree and building heights are then
    DSM minus that surface over the tile's tree/building pixels (classes named so; None in a
    class set without them).
    """
    tile = read_tile(data, tile_id)
    label, dsm, names = tile.label, tile.dsm, tile.classes.names
    gsd = (tile.bounds[2] - tile.bounds[0]) / label.shape[1]
    ground = _ground_surface(tile, gsd)
    stats: dict[str, float | None] = {}
    if ground is not None:
        hag = np.ma.masked_invalid(dsm - ground)
        for name in ("building", "tree"):
            h = hag[_is(label, names, name) & ~np.ma.getmaskarray(hag)].compressed()
            stats[f"{name}_height_p50"] = float(np.percentile(h, 50)) if h.size else None
            stats[f"{name}_height_p95"] = float(np.percentile(h, 95)) if h.size else None
        gy, gx = np.gradient(ground, gsd)
        stats["slope_deg"] = float(np.degrees(np.arctan(np.nanmean(np.hypot(gx, gy)))))
        lo, mid, hi = np.nanpercentile(ground, [2, 50, 98])
        stats["relief_m"] = float(hi - lo)
        stats["elevation_m"] = float(mid)
    else:
        stats |= dict.fromkeys(
            ("building_height_p50", "building_height_p95", "tree_height_p50", "tree_height_p95"),
            None,
        )
        stats |= {"slope_deg": None, "relief_m": None, "elevation_m": None}
    red, nir = tile.image[0].astype(np.float64), tile.image[3].astype(np.float64)
    valid = (red > 0) & (nir > 0)  # NIR 0 = band missing (3-band scenes) or nodata
    ndvi = (nir[valid] - red[valid]) / (nir[valid] + red[valid])
    stats["ndvi_mean"] = float(ndvi.mean()) if ndvi.size else None
    stats["green_fraction"] = float((ndvi > 0.3).mean()) if ndvi.size else None
    stats |= _asprs_shares(data, tile_id)
    stats |= _layout(label, names)
    stats |= _colour(tile.image[:3])
    return stats


OTHERS_CODES = {"water": 9, "bridge": 17}
"""ASPRS codes that N3C folds into `others` (with 3, low vegetation) but captions must name."""
ROAD_CODE = 11
"""ASPRS road surface (LAS 1.4): unmapped in N3C (unlabelled pixels), named when a survey has it."""


def _asprs_shares(data: Path, tile_id: str) -> dict[str, float | None]:
    """What the N3C labels cannot say: the share of `others` points that are water / bridge
    deck, and the share of all points on road surface, from the tile's raw ASPRS codes."""
    import laspy

    codes = np.asarray(
        laspy.read(safe_join(Path(data), "tiles", tile_id) / "points.laz").classification
    )
    others = np.isin(codes, (3, *OTHERS_CODES.values()))
    out: dict[str, float | None] = {
        f"others_{k}": float((codes[others] == c).mean()) if others.any() else 0.0
        for k, c in OTHERS_CODES.items()
    }
    out["road_points"] = float((codes == ROAD_CODE).mean()) if codes.size else 0.0
    return out


def _is(label: np.ndarray, names: tuple[str, ...], *classes: str) -> np.ndarray:
    """Mask of the label values of the named classes (the ones the class set has)."""
    return np.isin(label, [names.index(c) for c in classes if c in names])


def _layout(label: np.ndarray, names: tuple[str, ...] = N3C.names) -> dict[str, float | None]:
    """Shape facts of the tree and building masks (captions say "a line of trees", "scattered
    trees", "buildings among trees"): tree patches of >= 4 px, elongation of the largest tree
    patch (sqrt of its coordinate covariance eigenvalue ratio; 1 = round), and the share of the
    ring around buildings (2 px) that is tree."""
    tree = _is(label, names, "tree")
    parts, n = ndimage.label(tree)
    sizes = np.bincount(parts.ravel())[1:] if n else np.zeros(0, int)
    out: dict[str, float | None] = {"tree_patches": float((sizes >= 4).sum())}
    out["tree_elongation"] = None
    if n and sizes.max() >= 8:
        ys, xs = np.nonzero(parts == int(sizes.argmax()) + 1)
        lo, hi = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
        out["tree_elongation"] = float(np.sqrt(hi / max(lo, 1e-6)))
    building = _is(label, names, "building")
    ring = ndimage.binary_dilation(building, iterations=2) & ~building & (label > 0)
    out["building_tree_contact"] = float(tree[ring].mean()) if ring.any() else None
    return out


def _colour(rgb: np.ndarray) -> dict[str, float | None]:
    """Mean brightness, the RGB chromaticity (share of each band in R+G+B) and texture (mean
    absolute difference of neighbouring luminance, in 0-255 units) over valid pixels."""
    valid = np.all(rgb > 0, axis=0)
    if not valid.any():
        return dict.fromkeys(("brightness", "red_share", "green_share", "blue_share", "texture"))
    px = rgb[:, valid].astype(np.float64)
    total = px.sum(0) + 1e-6
    lum = rgb.astype(np.float64).mean(0)
    both_x, both_y = valid[:, 1:] & valid[:, :-1], valid[1:] & valid[:-1]
    diffs = np.concatenate(
        [np.abs(np.diff(lum, axis=1))[both_x], np.abs(np.diff(lum, axis=0))[both_y]]
    )
    return {
        "brightness": float(px.mean() / 255),
        "red_share": float((px[0] / total).mean()),
        "green_share": float((px[1] / total).mean()),
        "blue_share": float((px[2] / total).mean()),
        "texture": float(diffs.mean()) if diffs.size else None,
    }


def _ground_surface(tile: TileLayers, gsd: float) -> np.ndarray | None:
    """Ground elevation per pixel: median ground-point z on coarse cells, gaps filled by the
    nearest cell, smoothed back to pixels. Falls back to a low DSM quantile (flat) without
    ground points; None when there is neither."""
    shape = tile.label.shape
    cell = max(1, round(GROUND_CELL_M / gsd))
    ny, nx = -(-shape[0] // cell), -(-shape[1] // cell)
    g = _is(tile.point_classes, tile.classes.names, *GROUND_LEVEL)
    if not g.any():
        valid = tile.dsm.compressed()
        return np.full(shape, np.percentile(valid, 5)) if valid.size else None
    xmin, _, _, ymax = tile.bounds
    col = ((tile.xyz[g, 0] - xmin) / gsd).astype(int) // cell
    row = ((ymax - tile.xyz[g, 1]) / gsd).astype(int) // cell
    z = tile.xyz[g, 2]
    keep = (col >= 0) & (col < nx) & (row >= 0) & (row < ny)
    flat = row[keep] * nx + col[keep]
    grid = np.full(ny * nx, np.nan)
    order = np.argsort(flat, kind="stable")
    cells, starts = np.unique(flat[order], return_index=True)
    for c, chunk in zip(cells, np.split(z[keep][order], starts[1:]), strict=True):
        grid[c] = np.median(chunk)
    grid = grid.reshape(ny, nx)
    empty = np.isnan(grid)
    if empty.all():
        return None
    if empty.any():
        nearest = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
        grid = grid[tuple(nearest)]
    full = ndimage.zoom(grid, (shape[0] / ny, shape[1] / nx), order=1, mode="nearest")
    return full[: shape[0], : shape[1]]


def tile_rgb(data: Path, tile_id: str) -> Tensor:
    """(3, H, W) float RGB in [0, 1] of a built tile, stretched like the previews (plot.stretch)."""
    path = safe_join(Path(data), "tiles", tile_id) / "image.tif"
    if not path.is_file():
        raise FileNotFoundError(f"tile {tile_id!r} not found in {data}")
    return read_rgb(path)


def read_rgb(path: Path) -> Tensor:
    """(3, H, W) stretched RGB of any GeoTIFF with R, G, B as its first three bands."""
    with rasterio.open(path) as src:
        if src.count < 3:
            raise ValueError(f"{path} has {src.count} band(s); need R, G, B")
        rgb = src.read([1, 2, 3]).astype(np.float32)
        nodata = src.nodata
    valid = np.ones(rgb.shape[1:], bool) if nodata is None else np.all(rgb != nodata, axis=0)
    return torch.from_numpy(stretch(rgb, valid=valid))
