"""`geoseg prepare vaihingen`: the ISPRS 2D semantic labelling benchmark, Vaihingen, as a build.

Inputs (docs/datasets.md has the layout and every assumption): per area the IR-R-G true
orthophoto `top_mosaic_09cm_area{N}.tif`, the matching DSM `dsm_09cm_matching_area{N}.tif`,
the colour-coded reference and its eroded ("noBoundary") variant, and airborne LiDAR: the ALS
strips (`Vaihingen_Strip_*.LAS`, all areas) or the 3D-labelling `.pts` files (a few areas).

Protocol: the benchmark's 16 training / 17 test areas; validation areas are carved out of the
training areas (`--val-areas`). Training tiles are labelled with the full reference; validation
and test tiles with the eroded one (boundary pixels = 0, ignored), which is how the benchmark
scores, and keep the full one as `label_full.tif`. Tiles are cut from each area on its own pixel
grid (no resampling), the last row and column padded with nodata, so every labelled test pixel
is counted exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from pyproj import CRS

from geoseg.builder.rasterize import FLOAT_NODATA
from geoseg.classes import ClassSet
from geoseg.prepare.catalog import DatasetInfo
from geoseg.prepare.run import Block, Plan, PrepareError
from geoseg.prepare.sources import (
    Grid,
    area_files,
    check_same_grid,
    clip_points,
    find_files,
    label_points,
    las_items,
    raster_grid,
    read_points,
    read_raster,
    tile_points,
)
from geoseg.prepare.tiles import GridTile, TileData, grid_tiles

VAIHINGEN = ClassSet(
    "isprs-vaihingen",
    ("unlabeled", "impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter"),
    (
        (0, 0, 0, 0),
        (255, 255, 255, 255),
        (0, 0, 255, 255),
        (0, 255, 255, 255),
        (0, 255, 0, 255),
        (255, 255, 0, 255),
        (255, 0, 0, 255),
    ),
    (
        "eroded boundary (no-boundary reference) or outside the area",
        "impervious surfaces",
        "building",
        "low vegetation",
        "tree",
        "car",
        "clutter / background",
    ),
)
"""The 6 ISPRS classes; colours are the reference's colour codes (value 0: black boundary)."""

TRAIN_AREAS = (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)
TEST_AREAS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)
VAL_AREAS = (5, 15, 21, 30)
"""Held out of the training areas for validation, as in the DeepNetsForEO code lineage that much
Vaihingen work reuses; not part of the benchmark (it has no validation split)."""

LAYOUT: dict[str, tuple[str, ...]] = {
    "image": ("top/top_mosaic_09cm_area{area}.tif",),
    "dsm": ("dsm/dsm_09cm_matching_area{area}.tif",),
    "label": (
        "gts_for_participants/top_mosaic_09cm_area{area}.tif",
        "ground_truth/top_mosaic_09cm_area{area}.tif",
        "top_mosaic_09cm_area{area}.tif",
    ),
    "label_eroded": (
        "gts_eroded_for_participants/top_mosaic_09cm_area{area}_noBoundary.tif",
        "ground_truth_eroded/top_mosaic_09cm_area{area}_noBoundary.tif",
        "top_mosaic_09cm_area{area}_noBoundary.tif",
    ),
    "las": ("ALS/Vaihingen_Strip_*.LAS", "ALS/*.las", "ALS/*.laz", "**/Vaihingen_Strip_*.LAS"),
    "pts": ("**/Vaihingen3D_*.pts",),
}
"""Where each input is looked for under --src, first matching pattern wins (`--layout KEY=GLOB`
replaces a key's list). The 2D release unpacks into top/, dsm/, gts_for_participants/ and
gts_eroded_for_participants/ (the COMPLETE reference zips may unpack at the top level)."""

DEFAULT_CRS = "EPSG:32632"
"""WGS 84 / UTM 32N, the CRS the ISPRS Vaihingen coordinates are given in; assigned to files that
carry a geotransform but no CRS (the 2D TOPs and the LAS strips)."""

ACQUIRED = datetime(2008, 8, 1)
"""Summer 2008 (DGPF camera test flights and ALS50 strips); the exact days are not used."""


@dataclass(frozen=True)
class VaihingenConfig:
    src: Path
    tile_size: int = 512
    lidar: str = "auto"
    """auto (the ALS strips if present, else the .pts files), las or pts."""
    crs: str = DEFAULT_CRS
    val_areas: tuple[int, ...] = VAL_AREAS
    layout: tuple[tuple[str, str], ...] = ()
    """(key, glob) overrides of `LAYOUT`."""

    def patterns(self, key: str) -> tuple[str, ...]:
        given = [glob for k, glob in self.layout if k == key]
        return tuple(given) or LAYOUT[key]


def colour_table(classes: ClassSet) -> dict[tuple[int, int, int], int]:
    """Reference colour -> label value; black is the eroded reference's boundary (0)."""
    return {tuple(c[:3]): v for v, c in enumerate(classes.colors) if v} | {(0, 0, 0): 0}


def decode_labels(rgb: np.ndarray, path: Path, allow_boundary: bool) -> np.ndarray:
    """(3, H, W) colour-coded reference -> (H, W) uint8 labels; unknown colours are an error."""
    table = colour_table(VAIHINGEN)
    if not allow_boundary:
        table.pop((0, 0, 0))
    codes = (rgb[0].astype(np.int64) << 16) | (rgb[1].astype(np.int64) << 8) | rgb[2]
    values, inverse = np.unique(codes, return_inverse=True)
    lut = np.array([table.get(((v >> 16) & 255, (v >> 8) & 255, v & 255), 255) for v in values])
    unknown = values[lut == 255]
    if len(unknown):
        shown = ", ".join(f"({v >> 16 & 255},{v >> 8 & 255},{v & 255})" for v in unknown[:3])
        raise PrepareError(
            f"{path.name} has {len(unknown)} colour code(s) outside the ISPRS palette, e.g. {shown}"
        )
    return lut[inverse].reshape(codes.shape).astype(np.uint8)


def read_pts(path: Path) -> dict[str, np.ndarray]:
    """An ISPRS 3D-labelling `.pts` file: X Y Z Intensity return_number number_of_returns
    [label], whitespace-separated. Its 3D labels (9 other classes) are not used."""
    try:
        table = pd.read_csv(path, sep=r"\s+", header=None, comment="#", dtype=np.float64)
    except (ValueError, OSError) as exc:
        raise PrepareError(f"cannot read {path.name}: {exc}".splitlines()[0]) from None
    if table.shape[1] not in (6, 7) or table.isna().any().any():
        raise PrepareError(f"{path.name}: expected 6 or 7 numeric columns, got {table.shape[1]}")
    v = table.to_numpy()
    return {
        "x": v[:, 0],
        "y": v[:, 1],
        "z": v[:, 2],
        "intensity": np.clip(v[:, 3], 0, 65535).astype(np.uint16),
        "return_number": v[:, 4].astype(np.uint8),
        "number_of_returns": v[:, 5].astype(np.uint8),
        "classification": np.ones(len(v), np.uint8),  # ASPRS 1: unclassified
    }


@dataclass(frozen=True)
class Area:
    """One ISPRS area: its files and grid."""

    number: int
    split: str
    image: Path
    dsm: Path
    label: Path
    label_eroded: Path
    grid: Grid
    crs: CRS

    @property
    def extent(self) -> GridTile:
        """The whole area as one `Area`-like tile (for point reads)."""
        g, t = self.grid, self.grid.transform
        size = max(g.width, g.height)
        return GridTile(f"area{self.number}", self.crs.to_wkt(), t.c, t.f, g.gsd, size, 0, 0)


def _split(area: int, val: Sequence[int]) -> str:
    if area in TEST_AREAS:
        return "test"
    if area in TRAIN_AREAS:
        return "val" if area in val else "train"
    raise PrepareError(
        f"area {area} is not an ISPRS Vaihingen area (train {TRAIN_AREAS}, test {TEST_AREAS})"
    )


def plan(cfg: VaihingenConfig) -> Plan:
    """Check the release under cfg.src (every file read once) and plan its tiles."""
    src = cfg.src
    if not src.is_dir():
        raise PrepareError(f"--src {src} is not a folder")
    if cfg.tile_size < 16 or cfg.tile_size % 16:
        raise PrepareError("--tile-size must be a multiple of 16")
    bad_val = sorted(set(cfg.val_areas) - set(TRAIN_AREAS))
    if bad_val:
        raise PrepareError(f"--val-areas {bad_val} are not training areas {TRAIN_AREAS}")
    try:
        default_crs = CRS.from_user_input(cfg.crs)
    except Exception:  # pyproj's CRSError and friends
        raise PrepareError(f"--crs {cfg.crs!r} is not a CRS") from None
    found = {
        key: area_files(src, cfg.patterns(key)) for key in ("image", "dsm", "label", "label_eroded")
    }
    pattern, images = found["image"]
    if not images:
        raise PrepareError(f"no orthophotos {pattern} under {src}")
    areas = [_area(n, path, found, cfg, default_crs) for n, path in images.items()]
    for split in ("train", "test"):
        if not any(a.split == split for a in areas):
            raise PrepareError(f"no {split} area under {src} (found areas {sorted(images)})")
    lidar = _lidar(cfg, default_crs)
    notes = []
    missing = sorted(set(TRAIN_AREAS + TEST_AREAS) - set(images))
    if missing:
        notes.append(f"areas {missing} are not under {src}: the split is not the full benchmark")
    blocks = [Block(_tiles(a, cfg.tile_size), _loader(a, lidar)) for a in areas]
    config = {
        "dataset": "isprs-vaihingen",
        "src": str(src.resolve()),
        "tile_size": cfg.tile_size,
        "lidar": lidar.kind,
        "lidar_files": [p.name for p in lidar.files],
        "crs": cfg.crs,
        "val_areas": list(cfg.val_areas),
        "layout": {k: list(cfg.patterns(k)) for k in LAYOUT},
        "areas": {a.number: a.split for a in areas},
    }
    return Plan(config, INFO, VAIHINGEN, blocks, notes)


def _area(number: int, image: Path, found, cfg: VaihingenConfig, default_crs: CRS) -> Area:
    split = _split(number, cfg.val_areas)
    grid = raster_grid(image)
    if grid.count != 3 or grid.dtype != "uint8":
        raise PrepareError(
            f"{image.name}: expected 3 uint8 bands (IR, R, G), got {grid.count} {grid.dtype}"
        )
    if not grid.georeferenced:
        raise PrepareError(f"{image.name} has no georeferencing: its LiDAR cannot be placed")
    paths = {}
    for key in ("dsm", "label", "label_eroded"):
        pattern, files = found[key]
        if number not in files:
            raise PrepareError(f"area {number}: no {pattern.format(area=number)} under {cfg.src}")
        paths[key] = files[number]
        check_same_grid(raster_grid(files[number]), grid)
    # Read every reference once now: an unknown colour must stop the run before it writes.
    decode_labels(read_raster(paths["label"]), paths["label"], allow_boundary=False)
    decode_labels(read_raster(paths["label_eroded"]), paths["label_eroded"], allow_boundary=True)
    return Area(
        number,
        split,
        image,
        paths["dsm"],
        paths["label"],
        paths["label_eroded"],
        grid,
        grid.crs or default_crs,
    )


@dataclass(frozen=True)
class Lidar:
    kind: str
    files: tuple[Path, ...]
    crs: CRS

    def area_points(self, area: Area) -> dict[str, np.ndarray]:
        if self.kind == "las":
            return read_points(_las(self.files, self.crs), area.extent)
        merged = [_pts(p) for p in self.files]
        arrays = {k: np.concatenate([m[k] for m in merged]) for k in merged[0]}
        return clip_points(arrays, area.extent.bounds)


@cache
def _las(files: tuple[Path, ...], crs: CRS):
    return las_items(files, crs, "isprs-vaihingen-als50-2008")


@cache
def _pts(path: Path) -> dict[str, np.ndarray]:
    return read_pts(path)


def _lidar(cfg: VaihingenConfig, crs: CRS) -> Lidar:
    if cfg.lidar not in ("auto", "las", "pts"):
        raise PrepareError(f"--lidar must be auto, las or pts, not {cfg.lidar!r}")
    kinds = ("las", "pts") if cfg.lidar == "auto" else (cfg.lidar,)
    for kind in kinds:
        _, files = find_files(cfg.src, cfg.patterns(kind))
        if files:
            if kind == "las":
                _las(tuple(files), crs)  # read every header now: a bad file stops the plan
            else:
                for path in files:
                    _pts(path)
            return Lidar(kind, tuple(files), crs)
    wanted = " or ".join(cfg.patterns(k)[0] for k in kinds)
    raise PrepareError(f"no LiDAR ({wanted}) under {cfg.src}")


def _tiles(area: Area, size: int) -> list[tuple[GridTile, str]]:
    g = area.grid
    cols, rows = -(-g.width // size), -(-g.height // size)
    origin = (g.transform.c, g.transform.f)
    tiles = grid_tiles(
        f"vaihingen_area{area.number:02d}", area.crs, origin, g.gsd, size, cols, rows
    )
    return [(t, area.split) for t in tiles]


def _pad(array: np.ndarray, tile: GridTile, fill) -> np.ndarray:
    """The tile's window of an area array (..., H, W), padded with `fill` past the area."""
    s = tile.size
    window = array[..., tile.row * s : (tile.row + 1) * s, tile.col * s : (tile.col + 1) * s]
    out = np.full((*array.shape[:-2], s, s), fill, dtype=array.dtype)
    out[..., : window.shape[-2], : window.shape[-1]] = window
    return out


def _loader(area: Area, lidar: Lidar):
    def load():
        irrg = read_raster(area.image)
        dsm = read_raster(area.dsm, [1])[0].astype(np.float32)
        dsm[~np.isfinite(dsm)] = FLOAT_NODATA
        full = decode_labels(read_raster(area.label), area.label, allow_boundary=False)
        eroded = decode_labels(read_raster(area.label_eroded), area.label_eroded, True)
        points = lidar.area_points(area)
        scored = full if area.split == "train" else eroded
        image = np.zeros((4, *irrg.shape[1:]), np.uint8)
        image[[3, 0, 1]] = irrg  # IR, R, G -> R, G, B (missing), NIR

        def read(tile: GridTile, split: str) -> TileData | str:
            pts = tile_points(points, tile.bounds, lidar.kind)
            if isinstance(pts, str):
                return pts
            label = _pad(scored, tile, 0)
            label_points(pts, label, tile.transform)
            labels = {"label": label}
            if split != "train":
                labels["label_full"] = _pad(full, tile, 0)
            return TileData(
                tile=tile,
                split=split,
                image=_pad(image, tile, 0),
                missing_bands=["blue"],
                labels=labels,
                dsm=_pad(dsm, tile, FLOAT_NODATA),
                points=pts,
                datetime=ACQUIRED,
                inputs={
                    "area": area.number,
                    "image": area.image.name,
                    "dsm": area.dsm.name,
                    "label": (area.label if split == "train" else area.label_eroded).name,
                    "lidar": lidar.kind,
                },
            )

        return read

    return load


INFO = DatasetInfo(
    id="isprs-vaihingen",
    title="ISPRS 2D semantic labelling, Vaihingen (prepared by geoseg)",
    description=(
        "ISPRS Vaihingen true orthophotos (IR-R-G, 9 cm), matching DSM and airborne LiDAR, tiled "
        "on each area's own grid; 6 classes. Training tiles use the full reference, validation "
        "and test tiles the eroded (no-boundary) reference the benchmark scores with."
    ),
    license="proprietary",
    url="https://www2.isprs.org/commissions/comm2/wg4/benchmark/2d-sem-label-vaihingen/",
    protocol={
        "name": "isprs-2d-labelling",
        "metrics": ["oa", "f1 per class", "mean f1 (5 classes, clutter excluded)", "miou"],
        "evaluate_split": "test",
        "reference": "eroded (no-boundary) reference on val and test tiles; label_full.tif keeps "
        "the full one",
        "train_areas": list(TRAIN_AREAS),
        "test_areas": list(TEST_AREAS),
        "excluded_from_means": ["clutter"],
    },
)
