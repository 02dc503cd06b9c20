"""`geoseg prepare dfc2018`: the 2018 IEEE GRSS Data Fusion Contest (Houston) as a build.

Inputs (docs/datasets.md has the layout and every assumption): the 5 cm VHR RGB tiles, the
multispectral LiDAR (point-cloud tiles per channel C1 1550 nm, C2 1064 nm, C3 532 nm, and the
0.5 m rasters: DSM, per-channel intensity), optionally the 48-band hyperspectral cube, and the
0.5 m training ground truth (20 classes). Tiles are cut on the ground truth's 0.5 m grid (labels
are never resampled): the imagery is averaged down to it, the hyperspectral cube repeated up.

Protocol: the contest's split is spatial. The training ground truth covers the central part of
the scene and the contest scored the rest, so cells meeting the training ground truth make
`train` tiles (its easternmost columns `val`, `--val-fraction`), and cells reaching outside it
make `test` tiles whose labels come from `--test-labels` (the contest's test reference is not
in the release) with the training area's pixels set to 0. A cell straddling the border gives
one tile of each, with disjoint labels, so every test pixel is scored once. Metrics: OA, AA and
kappa.

Points: the three channels' clouds are merged (extra dim `channel`); each point carries the
three channel intensities as features `intensity_c1..3`: its own channel's from the point, the
other two from those channels' intensity rasters at its pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import rasterio
from pyproj import CRS
from rasterio.warp import Resampling, reproject

from geoseg.builder.rasterize import FLOAT_NODATA
from geoseg.classes import ClassSet
from geoseg.prepare.catalog import DatasetInfo
from geoseg.prepare.run import Block, Plan, PrepareError
from geoseg.prepare.sources import (
    Grid,
    find_files,
    label_points,
    las_items,
    raster_grid,
    read_points,
    read_raster,
    sample_at,
    tile_points,
)
from geoseg.prepare.tiles import GridTile, Layer, TileData, grid_tiles

_NAMES = (
    "healthy_grass",
    "stressed_grass",
    "artificial_turf",
    "evergreen_trees",
    "deciduous_trees",
    "bare_earth",
    "water",
    "residential_buildings",
    "non_residential_buildings",
    "roads",
    "sidewalks",
    "crosswalks",
    "major_thoroughfares",
    "highways",
    "railways",
    "paved_parking_lots",
    "unpaved_parking_lots",
    "cars",
    "trains",
    "stadium_seats",
)
_COLORS = (
    (0, 208, 0),
    (128, 255, 0),
    (50, 160, 100),
    (0, 100, 0),
    (0, 150, 60),
    (160, 82, 45),
    (0, 120, 255),
    (255, 255, 160),
    (255, 170, 0),
    (170, 170, 170),
    (255, 220, 220),
    (255, 255, 255),
    (120, 60, 160),
    (255, 0, 150),
    (140, 100, 60),
    (80, 80, 80),
    (200, 170, 120),
    (255, 255, 0),
    (255, 0, 0),
    (0, 255, 255),
)
DFC2018 = ClassSet(
    "dfc2018",
    ("unlabeled", *_NAMES),
    ((0, 0, 0, 0), *((*c, 255) for c in _COLORS)),
    ("undefined (0 in the ground truth)", *(n.replace("_", " ") for n in _NAMES)),
)
"""The contest's 20 classes (ground-truth values 1..20). The colours are geoseg's: the release
defines values and names only."""

LAYOUT: dict[str, tuple[str, ...]] = {
    "vhr": ("Final RGB HR Imagery/UH_NAD83_*.tif", "Final RGB HR Imagery/*.tif"),
    "label": ("TrainingGT/2018_IEEE_GRSS_DFC_GT_TR.tif", "TrainingGT/*GT_TR*.tif"),
    "dsm": (
        "Lidar GeoTiff Rasters/DSM_C12/UH17c_GEF051.tif",
        "Lidar GeoTiff Rasters/DSM_C12/*.tif",
    ),
    **{f"intensity_c{c}": (f"Lidar GeoTiff Rasters/Intensity_C{c}/*.tif",) for c in (1, 2, 3)},
    **{
        f"points_c{c}": tuple(f"Lidar Point Cloud Tiles/C{c}/*.{e}" for e in ("las", "laz", "LAS"))
        for c in (1, 2, 3)
    },
    "hsi": (
        "FullHSIDataset/20170218_UH_CASI_S4_NAD83.pix",
        "FullHSIDataset/*.pix",
        "FullHSIDataset/*.tif",
    ),
}
"""Where each input is looked for under the release folder (`Phase2/`), first match wins;
`--layout KEY=GLOB` replaces a key's list."""

ROOTS = (".", "Phase2", "2018IEEE_Contest/Phase2")
"""--src may be the release folder itself or a folder above it."""

DEFAULT_CRS = "EPSG:26915"
"""NAD83 / UTM 15N, the release's CRS (file names say UH_NAD83); for files without one."""

ACQUIRED = datetime(2017, 2, 16)
"""The flight of the hyperspectral, LiDAR and VHR data (16 Feb 2017)."""

NUM_HSI_BANDS = 48
BLOCK_CELLS = 2
"""Cells per side of a block whose points are read together (each LAS tile is scanned once per
block it meets, instead of once per tile)."""
INVALID_ABOVE = 1e9
"""LiDAR raster values above this are fill values (the release uses huge floats), not data."""


@dataclass(frozen=True)
class DFC2018Config:
    src: Path
    tile_size: int = 512
    hsi: bool = False
    test_labels: Path | None = None
    val_fraction: float = 0.15
    crs: str = DEFAULT_CRS
    layout: tuple[tuple[str, str], ...] = ()

    def patterns(self, key: str) -> tuple[str, ...]:
        given = [glob for k, glob in self.layout if k == key]
        return tuple(given) or LAYOUT[key]


def _root(src: Path, cfg: DFC2018Config) -> Path:
    if not src.is_dir():
        raise PrepareError(f"--src {src} is not a folder")
    for sub in ROOTS:
        if find_files(src / sub, cfg.patterns("label"))[1]:
            return (src / sub).resolve()
    raise PrepareError(f"no training ground truth ({cfg.patterns('label')[0]}) under {src}")


def _one(root: Path, cfg: DFC2018Config, key: str) -> Path:
    pattern, files = find_files(root, cfg.patterns(key))
    if not files:
        raise PrepareError(f"no {key} raster ({pattern}) under {root}")
    if len(files) > 1:
        raise PrepareError(f"{len(files)} files match {pattern} under {root}; expected one")
    return files[0]


def _check_labels(values: np.ndarray, path: Path) -> np.ndarray:
    bad = np.unique(values[values >= len(DFC2018)])
    if len(bad):
        raise PrepareError(f"{path.name} has class values {bad[:5].tolist()} outside 0..20")
    return values.astype(np.uint8)


def _aligned(grid: Grid, reference: Grid) -> bool:
    """Same pixel size, pixel corners on the reference's lattice (within 1 % of a pixel)."""
    if not grid.georeferenced or abs(grid.gsd - reference.gsd) > 1e-6 * reference.gsd:
        return False
    dx = (grid.transform.c - reference.transform.c) / reference.gsd
    dy = (grid.transform.f - reference.transform.f) / reference.gsd
    return abs(dx - round(dx)) < 0.01 and abs(dy - round(dy)) < 0.01


@dataclass(frozen=True)
class Sources:
    """The release's files, checked."""

    crs: CRS
    gt: Grid
    labels: np.ndarray
    test: tuple[Grid, np.ndarray] | None
    vhr: tuple[Path, ...]
    dsm: Path
    intensity: tuple[Path, Path, Path]
    points: tuple[tuple, tuple, tuple]
    hsi: Path | None


def plan(cfg: DFC2018Config) -> Plan:
    """Check the release (headers, every label value) and plan its tiles."""
    if cfg.tile_size < 16 or cfg.tile_size % 16:
        raise PrepareError("--tile-size must be a multiple of 16")
    if not 0 < cfg.val_fraction < 1:
        raise PrepareError("--val-fraction must be between 0 and 1")
    try:
        default_crs = CRS.from_user_input(cfg.crs)
    except Exception:  # pyproj's CRSError and friends
        raise PrepareError(f"--crs {cfg.crs!r} is not a CRS") from None
    root = _root(cfg.src, cfg)
    gt_path = _one(root, cfg, "label")
    gt = raster_grid(gt_path)
    if not gt.georeferenced or gt.count != 1:
        raise PrepareError(f"{gt_path.name}: expected one georeferenced band ({gt.describe()})")
    crs = gt.crs or default_crs
    labels = _check_labels(read_raster(gt_path, [1])[0], gt_path)
    _, vhr = find_files(root, cfg.patterns("vhr"))
    if not vhr:
        raise PrepareError(f"no VHR RGB tiles ({cfg.patterns('vhr')[0]}) under {root}")
    for path in vhr:
        grid = raster_grid(path)
        if grid.count < 3 or grid.dtype != "uint8" or not grid.georeferenced:
            raise PrepareError(f"{path.name}: expected a georeferenced 3-band uint8 RGB tile")
    dsm = _one(root, cfg, "dsm")
    rasters = [dsm] + [_one(root, cfg, f"intensity_c{c}") for c in (1, 2, 3)]
    for path in rasters:
        if not _aligned(raster_grid(path), gt):
            raise PrepareError(
                f"{path.name} ({raster_grid(path).describe()}) is not on the "
                f"0.5 m grid of {gt_path.name} ({gt.describe()})"
            )
    points = []
    for c in (1, 2, 3):
        pattern, files = find_files(root, cfg.patterns(f"points_c{c}"))
        if not files:
            raise PrepareError(f"no C{c} LiDAR tiles ({pattern}) under {root}")
        points.append(tuple(las_items(files, default_crs, f"dfc2018-titan-c{c}")))
    hsi = _one(root, cfg, "hsi") if cfg.hsi else None
    if hsi is not None and raster_grid(hsi).count != NUM_HSI_BANDS:
        raise PrepareError(f"{hsi.name} has {raster_grid(hsi).count} bands, not {NUM_HSI_BANDS}")
    test = _test_labels(cfg.test_labels, gt, raster_grid(dsm)) if cfg.test_labels else None
    sources = Sources(
        crs, gt, labels, test, tuple(vhr), dsm, tuple(rasters[1:]), tuple(points), hsi
    )
    blocks = _blocks(sources, cfg)
    notes = (
        []
        if test
        else [
            "no --test-labels: test tiles have no labels (the contest's test reference is not in "
            "the release); `geoseg evaluate --split test` needs them"
        ]
    )
    config = {
        "dataset": "dfc2018",
        "src": str(root),
        "tile_size": cfg.tile_size,
        "hsi": cfg.hsi,
        "test_labels": str(cfg.test_labels) if cfg.test_labels else None,
        "val_fraction": cfg.val_fraction,
        "crs": cfg.crs,
        "layout": {k: list(cfg.patterns(k)) for k in LAYOUT},
    }
    return Plan(config, INFO, DFC2018, blocks, notes)


def _test_labels(path: Path, gt: Grid, lidar: Grid) -> tuple[Grid, np.ndarray]:
    """The test reference: on the 0.5 m lattice if georeferenced, else the LiDAR rasters' grid."""
    if not path.is_file():
        raise PrepareError(f"--test-labels {path} not found")
    grid = raster_grid(path)
    if not grid.georeferenced:
        if (grid.width, grid.height) != (lidar.width, lidar.height):
            raise PrepareError(
                f"{path.name} has no georeferencing and is {grid.describe()}, not "
                f"the LiDAR rasters' {lidar.width} x {lidar.height} px"
            )
        grid = Grid(
            path,
            lidar.crs,
            lidar.transform,
            grid.width,
            grid.height,
            grid.count,
            grid.dtype,
            grid.nodata,
        )
    elif not _aligned(grid, gt):
        raise PrepareError(
            f"{path.name} ({grid.describe()}) is not on the 0.5 m grid of the "
            f"training ground truth ({gt.describe()})"
        )
    return grid, _check_labels(read_raster(path, [1])[0], path)


def _extent(grid: Grid) -> tuple[float, float, float, float]:
    t = grid.transform
    return (t.c, t.f - grid.height * grid.gsd, t.c + grid.width * grid.gsd, t.f)


def _blocks(src: Sources, cfg: DFC2018Config) -> list[Block]:
    """Cells on the ground truth's lattice over the whole scene, grouped into blocks."""
    size, gsd = cfg.tile_size, src.gt.gsd
    span = size * gsd
    scene = [_extent(raster_grid(p)) for p in (*src.vhr, src.dsm)]
    west, south = min(e[0] for e in scene), min(e[1] for e in scene)
    east, north = max(e[2] for e in scene), max(e[3] for e in scene)
    gx0, gy1 = src.gt.transform.c, src.gt.transform.f
    x0 = gx0 - math.ceil((gx0 - west) / span - 1e-9) * span
    y0 = gy1 + math.ceil((north - gy1) / span - 1e-9) * span
    cols = math.ceil((east - x0) / span - 1e-9)
    rows = math.ceil((y0 - south) / span - 1e-9)
    cells = grid_tiles("dfc2018", src.crs, (x0, y0), gsd, size, cols, rows)
    gt_box = _extent(src.gt)
    train_cols = sorted({c.col for c in cells if _overlap(c.bounds, gt_box) > 0})
    val_cols = _val_columns(src, cells, train_cols, cfg.val_fraction)
    planned: dict[tuple[int, int], list[tuple[GridTile, str]]] = {}
    for cell in cells:
        key = (cell.col // BLOCK_CELLS, cell.row // BLOCK_CELLS)
        inside = _overlap(cell.bounds, gt_box)
        if inside > 0:
            split = "val" if cell.col in val_cols else "train"
            planned.setdefault(key, []).append((_named(cell, "tr"), split))
        if inside < span * span * (1 - 1e-9):
            planned.setdefault(key, []).append((_named(cell, "te"), "test"))
    return [Block(tiles, _loader(src, tiles, cfg)) for _, tiles in sorted(planned.items())]


def _named(cell: GridTile, part: str) -> GridTile:
    return GridTile(
        f"dfc2018_{part}_c{cell.col:03d}_r{cell.row:03d}",
        cell.crs_wkt,
        cell.x0,
        cell.y0,
        cell.gsd,
        cell.size,
        cell.col,
        cell.row,
    )


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _val_columns(src: Sources, cells, train_cols: list[int], fraction: float) -> set[int]:
    """The easternmost cell columns holding >= `fraction` of the labelled training pixels (at
    least one column, never all)."""
    labelled = src.labels > 0
    x = src.gt.transform.c + (np.arange(src.gt.width) + 0.5) * src.gt.gsd
    span = cells[0].span
    col_of = np.floor((x - cells[0].x0) / span).astype(int)
    per_col = {c: int(labelled[:, col_of == c].sum()) for c in train_cols}
    total, taken, chosen = sum(per_col.values()), 0, set()
    for col in sorted(train_cols, reverse=True)[:-1]:
        if chosen and taken >= fraction * total:
            break
        chosen.add(col)
        taken += per_col[col]
    return chosen


def _window(path: Path, tile: GridTile, resampling: Resampling, dtype, fill) -> np.ndarray:
    """(bands, H, W) of a raster on the tile grid; `fill` where it has no data."""
    with rasterio.open(path) as src:
        out = np.full((src.count, tile.size, tile.size), fill, dtype)
        reproject(
            rasterio.band(src, list(range(1, src.count + 1))),
            out,
            src_crs=src.crs or tile.crs,
            dst_crs=tile.crs,
            dst_transform=tile.transform,
            src_nodata=src.nodata,
            dst_nodata=fill,
            resampling=resampling,
        )
    return out


def _lidar_raster(path: Path, tile: GridTile) -> np.ndarray:
    band = _window(path, tile, Resampling.nearest, np.float32, FLOAT_NODATA)[0]
    band[~np.isfinite(band) | (np.abs(band) > INVALID_ABOVE)] = FLOAT_NODATA
    return band


def _labels_on(grid: Grid, labels: np.ndarray, tile: GridTile) -> np.ndarray:
    """A label raster's window on the tile (both on one lattice: an exact copy, 0 outside)."""
    out = np.zeros((tile.size, tile.size), np.uint8)
    r0 = round((grid.transform.f - tile.y0) / tile.gsd)
    c0 = round((tile.x0 - grid.transform.c) / tile.gsd)
    r_lo, r_hi = max(r0, 0), min(r0 + tile.size, grid.height)
    c_lo, c_hi = max(c0, 0), min(c0 + tile.size, grid.width)
    if r_lo < r_hi and c_lo < c_hi:
        out[r_lo - r0 : r_hi - r0, c_lo - c0 : c_hi - c0] = labels[r_lo:r_hi, c_lo:c_hi]
    return out


def _loader(src: Sources, tiles: list[tuple[GridTile, str]], cfg: DFC2018Config):
    def load():
        cells = [t for t, _ in tiles]
        xs = [t.bounds[0] for t in cells] + [t.bounds[2] for t in cells]
        ys = [t.bounds[1] for t in cells] + [t.bounds[3] for t in cells]
        extent = GridTile(
            "block",
            src.crs.to_wkt(),
            min(xs),
            max(ys),
            cells[0].gsd,
            round(max(max(xs) - min(xs), max(ys) - min(ys)) / cells[0].gsd),
            0,
            0,
        )
        parts = []
        for channel, items in enumerate(src.points, start=1):
            arrays = read_points(items, extent)
            arrays["channel"] = np.full(len(arrays["x"]), channel, np.uint8)
            parts.append(arrays)
        points = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

        def read(tile: GridTile, split: str) -> TileData | str:
            pts = tile_points(points, tile.bounds, "Optech Titan")
            if isinstance(pts, str):
                return pts
            image = np.zeros((4, tile.size, tile.size), np.uint8)
            for path in src.vhr:
                rgb = _window(path, tile, Resampling.average, np.uint8, 0)[:3]
                fill = (image[:3] == 0).all(axis=0)
                image[:3, fill] = rgb[:, fill]
            if not image.any():
                return "no VHR imagery in the tile"
            intensity = np.stack([_lidar_raster(p, tile) for p in src.intensity])
            _point_features(pts, intensity, tile)
            label = _tile_labels(src, tile, split)
            label_points(pts, label, tile.transform)
            extra = {}
            if src.hsi is not None:
                cube = _window(src.hsi, tile, Resampling.nearest, np.float32, np.nan)
                names = tuple(f"hsi_{b:02d}" for b in range(1, NUM_HSI_BANDS + 1))
                extra["hsi"] = Layer(np.nan_to_num(cube, nan=FLOAT_NODATA), FLOAT_NODATA, names)
            return TileData(
                tile=tile,
                split=split,
                image=image,
                missing_bands=["nir"],
                labels={"label": label},
                dsm=_lidar_raster(src.dsm, tile),
                points=pts,
                datetime=ACQUIRED,
                inputs={
                    "vhr": [p.name for p in src.vhr],
                    "dsm": src.dsm.name,
                    "label": "test labels" if split == "test" else "training ground truth",
                    "hsi": src.hsi.name if src.hsi else None,
                },
                intensity=Layer(intensity, FLOAT_NODATA, INTENSITY_BANDS),
                extra=extra,
            )

        return read

    return load


INTENSITY_BANDS = ("intensity_c1", "intensity_c2", "intensity_c3")


def _point_features(pts: dict[str, np.ndarray], rasters: np.ndarray, tile: GridTile) -> None:
    """intensity_c1..3 per point: its own channel's intensity, the others' rasters at its pixel."""
    own = pts["intensity"].astype(np.float32)
    for c, name in enumerate(INTENSITY_BANDS, start=1):
        values = sample_at(rasters[c - 1], tile.transform, pts["x"], pts["y"], np.float32(0))
        values[values == FLOAT_NODATA] = 0.0
        pts[name] = np.where(pts["channel"] == c, own, values).astype(np.float32)


def _tile_labels(src: Sources, tile: GridTile, split: str) -> np.ndarray:
    if split != "test":
        return _labels_on(src.gt, src.labels, tile)
    if src.test is None:
        return np.zeros((tile.size, tile.size), np.uint8)
    label = _labels_on(*src.test, tile)
    label[_labels_on(src.gt, np.ones_like(src.labels), tile) > 0] = 0  # the training area's
    return label


INFO = DatasetInfo(
    id="dfc2018",
    title="2018 IEEE GRSS Data Fusion Contest, Houston (prepared by geoseg)",
    description=(
        "University of Houston 2018 data fusion contest: VHR RGB (averaged to 0.5 m), "
        "multispectral LiDAR (C1/C2/C3 points and rasters), optional 48-band hyperspectral, "
        "20 land-cover classes at 0.5 m; the contest's spatial train/test split."
    ),
    license="proprietary",
    url="https://doi.org/10.1109/JSTARS.2019.2911113",
    protocol={
        "name": "dfc2018",
        "metrics": ["oa", "aa", "kappa"],
        "evaluate_split": "test",
        "reference": "training ground truth for train/val tiles; --test-labels for test tiles, "
        "with the training area's pixels set to 0",
    },
)
