"""Finding and checking a benchmark release's files: raster grids, LAS headers, point selection.

Releases are unpacked by hand, so file locations are patterns (relative to `--src`, `{area}` for
an ISPRS area number) tried in order; what cannot be found or read is a `PrepareError` naming
the file, raised while planning. LiDAR files are read through the builder's own point reader
(`read_tile_points`: COPC or chunked LAS/LAZ, reprojection, z in metres), so a prepared tile's
points go through exactly what a `build-dataset` tile's do.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np
import rasterio
import shapely
from affine import Affine
from pyproj import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError

from geoseg.builder.errors import TileError, short_reason
from geoseg.builder.grid import Area, horizontal_crs, reproject_geometry
from geoseg.builder.points import read_tile_points
from geoseg.prepare.run import PrepareError
from geoseg.stac.items import PointCloudItem
from geoseg.stac.signing import NoSigner


def find_files(src: Path, patterns: Sequence[str]) -> tuple[str, list[Path]]:
    """(pattern, files) of the first pattern (a glob relative to `src`) that matches files."""
    for pattern in patterns:
        files = sorted(p for p in src.glob(pattern) if p.is_file())
        if files:
            return pattern, files
    return patterns[0], []


def area_files(src: Path, patterns: Sequence[str]) -> tuple[str, dict[int, Path]]:
    """{area number: file} of the first `{area}` pattern that matches (`top/..._area{area}.tif`)."""
    for pattern in patterns:
        regex = re.compile(re.escape(pattern).replace(re.escape("{area}"), r"(\d+)") + "$")
        found = {}
        for path in src.glob(pattern.replace("{area}", "*")):
            match = regex.search(path.relative_to(src).as_posix())
            if match and path.is_file():
                found[int(match.group(1))] = path
        if found:
            return pattern, dict(sorted(found.items()))
    return patterns[0], {}


@dataclass(frozen=True)
class Grid:
    """A raster's pixel grid and layout, from its header."""

    path: Path
    crs: CRS | None
    transform: Affine
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None

    @property
    def georeferenced(self) -> bool:
        return not self.transform.almost_equals(Affine.identity())

    @property
    def gsd(self) -> float:
        return abs(self.transform.a)

    def describe(self) -> str:
        where = (
            f"origin ({self.transform.c:.2f}, {self.transform.f:.2f}), {self.gsd:g} m px"
            if self.georeferenced
            else "no georeferencing"
        )
        return f"{self.width} x {self.height} px, {where}"

    def same_grid(self, other: Grid) -> bool:
        """Same size and, when both are georeferenced, the same pixel corners (1 % of a pixel)."""
        if (self.width, self.height) != (other.width, other.height):
            return False
        if self.georeferenced and other.georeferenced:
            return self.transform.almost_equals(other.transform, precision=0.01 * self.gsd)
        return True


@contextmanager
def _open(path: Path) -> Iterator[rasterio.DatasetReader]:
    """Open a raster quietly (references often carry no georeferencing at all); an unreadable
    file is a `PrepareError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                yield src
    except (RasterioError, RasterioIOError, OSError) as exc:
        raise PrepareError(f"cannot read {path}: {short_reason(exc)}") from None


def raster_grid(path: Path) -> Grid:
    """The grid of a raster file; an unreadable file is a `PrepareError`."""
    with _open(path) as src:
        crs = CRS.from_wkt(src.crs.to_wkt()) if src.crs else None
        return Grid(path, crs, src.transform, src.width, src.height, src.count, src.dtypes[0],
                    src.nodata)  # fmt: skip


def check_same_grid(grid: Grid, reference: Grid) -> None:
    if not grid.same_grid(reference):
        raise PrepareError(
            f"{grid.path.name} ({grid.describe()}) is not on the grid of {reference.path.name} "
            f"({reference.describe()})"
        )


def read_raster(path: Path, bands: Sequence[int] | None = None) -> np.ndarray:
    """(bands, H, W) of a whole raster; an unreadable file is a `PrepareError`."""
    with _open(path) as src:
        return src.read(list(bands) if bands else None)


def las_items(paths: Sequence[Path], default_crs: CRS, project: str) -> list[PointCloudItem]:
    """PointCloudItems for local LAS/LAZ files, from their headers; a file without a CRS gets
    `default_crs`. A file laspy cannot open is a `PrepareError`."""
    items = []
    for path in paths:
        try:
            with laspy.open(path) as reader:
                header = reader.header
                try:
                    crs = header.parse_crs()
                except Exception:  # malformed GeoTIFF/WKT VLRs: treat as missing
                    crs = None
                crs = CRS.from_user_input(crs) if crs is not None else default_crs
                mins, maxs, count = header.mins, header.maxs, header.point_count
        except Exception as exc:  # laspy raises many kinds for a non-LAS file
            raise PrepareError(f"cannot read LiDAR file {path}: {short_reason(exc)}") from None
        box = shapely.box(mins[0], mins[1], maxs[0], maxs[1])
        lonlat = reproject_geometry(box, horizontal_crs(crs), CRS.from_epsg(4326), 4)
        items.append(
            PointCloudItem(
                path.stem,
                "local",
                str(path),
                crs.to_wkt(),
                tuple(lonlat.bounds),
                lonlat.wkt,
                None,
                None,
                project,
                int(count),
            )
        )
    return items


def covering(items: Sequence[PointCloudItem], area: Area) -> list[PointCloudItem]:
    """The items whose footprint meets the area (a plain LAS file is scanned whole per read)."""
    box = reproject_geometry(shapely.box(*area.bounds), area.crs, CRS.from_epsg(4326), 4)
    return [i for i in items if shapely.intersects(shapely.from_wkt(i.footprint_wkt), box)]


def read_points(items: Sequence[PointCloudItem], area: Area) -> dict[str, np.ndarray]:
    """The points of `items` inside the area, in its CRS with z in metres."""
    try:
        return read_tile_points(area, list(covering(items, area)), NoSigner()).arrays
    except TileError as exc:
        raise PrepareError(str(exc)) from None


def clip_points(arrays: dict[str, np.ndarray], bounds: Sequence[float]) -> dict[str, np.ndarray]:
    """The points inside `bounds`, with the builder's convention (x in [xmin, xmax), y in
    (ymin, ymax]) so a point on a shared edge belongs to exactly one tile."""
    xmin, ymin, xmax, ymax = bounds
    x, y = arrays["x"], arrays["y"]
    inside = (x >= xmin) & (x < xmax) & (y > ymin) & (y <= ymax)
    return {k: v[inside] for k, v in arrays.items()}


MIN_POINTS = 16
"""Fewest points a tile needs (the point models' k); tiles below are skipped and reported."""


def tile_points(
    arrays: dict[str, np.ndarray], bounds: Sequence[float], lidar: str
) -> dict[str, np.ndarray] | str:
    """A tile's points (`clip_points`), or why it is skipped: fewer than `MIN_POINTS` of the
    `lidar` product (named in the reason)."""
    points = clip_points(arrays, bounds)
    if len(points["x"]) < MIN_POINTS:
        return f"{len(points['x'])} {lidar} LiDAR points in the tile, fewer than {MIN_POINTS}"
    return points


def label_points(points: dict[str, np.ndarray], label: np.ndarray, transform: Affine) -> None:
    """Give each point the label of the pixel it falls in (0 outside): the `label` extra
    dimension of points.laz, which training uses instead of ASPRS codes."""
    points["label"] = sample_at(label, transform, points["x"], points["y"], np.uint8(0))


def sample_at(
    raster: np.ndarray, transform: Affine, x: np.ndarray, y: np.ndarray, fill
) -> np.ndarray:
    """Values of a (H, W) raster at map points (the pixel each point falls in); `fill` outside."""
    inv = ~transform
    col = np.floor(inv.a * x + inv.b * y + inv.c).astype(np.int64)
    row = np.floor(inv.d * x + inv.e * y + inv.f).astype(np.int64)
    h, w = raster.shape
    ok = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    out = np.full(len(x), fill, dtype=raster.dtype)
    out[ok] = raster[row[ok], col[ok]]
    return out
