"""The tile grid: square cells of `size` px at `gsd` m, anchored at the origin of each UTM zone.

Anchoring at multiples of the tile span (not at the AOI corner) makes tile ids stable: the same
ground cell gets the same id whatever region or max-tiles a build asks for, which is what makes
resume, merging of builds and cross-build comparisons safe. A region that straddles UTM zones
(California spans 10N and 11N) is cut at the zone meridian: a cell belongs to the zone that holds
its centre, so no ground is tiled twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Protocol

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer


class Area(Protocol):
    """What the point readers and the rasteriser need of a tile: a `TileSpec` in the build, a
    window or row band of a scene in `geoseg predict`."""

    @property
    def crs(self) -> CRS: ...
    @property
    def bounds(self) -> tuple[float, float, float, float]: ...
    @property
    def gsd(self) -> float: ...
    @property
    def size(self) -> int: ...


@dataclass(frozen=True)
class TileSpec:
    """One cell of the grid, in the projected CRS of the imagery it was planned from."""

    crs_wkt: str
    epsg: int | None
    col: int
    row: int
    gsd: float
    size: int

    @property
    def id(self) -> str:
        """Stable id: `<epsg>_<gsd cm>cm_<col>_<row>` (row counts northwards)."""
        code = self.epsg if self.epsg is not None else "crs"
        return f"{code}_{round(self.gsd * 100)}cm{self.size}_{self.col}_{self.row}"

    @property
    def span(self) -> float:
        return self.gsd * self.size

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) in the tile CRS."""
        s = self.span
        return (self.col * s, self.row * s, (self.col + 1) * s, (self.row + 1) * s)

    @property
    def transform(self) -> Affine:
        xmin, _, _, ymax = self.bounds
        return Affine(self.gsd, 0.0, xmin, 0.0, -self.gsd, ymax)

    @cached_property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    def footprint_lonlat(self) -> shapely.Polygon:
        """Tile outline in lon/lat (the four corners; see `footprints_lonlat`)."""
        xmin, ymin, xmax, ymax = (np.array([v]) for v in self.bounds)
        return footprints_lonlat(self.crs, xmin, ymin, xmax, ymax)[0]


def footprints_lonlat(
    crs: CRS, xmin: np.ndarray, ymin: np.ndarray, xmax: np.ndarray, ymax: np.ndarray
) -> np.ndarray:
    """Lon/lat outlines of boxes in `crs`, all in one PROJ call (1.6 M tiles at state scale).

    Only the corners are reprojected: along a 512 m tile edge a projected straight line departs
    from the lon/lat one by well under a millimetre. Rings run as `shapely.box` draws them.
    """
    xs = np.stack([xmax, xmax, xmin, xmin, xmax], axis=1)
    ys = np.stack([ymin, ymax, ymax, ymin, ymin], axis=1)
    lon, lat = transformer(crs, CRS.from_epsg(4326)).transform(xs.ravel(), ys.ravel())
    coords = np.stack([np.asarray(lon), np.asarray(lat)], axis=1).reshape(len(xmin), 5, 2)
    return shapely.polygons(coords)


@lru_cache(maxsize=64)
def _transformer(src_wkt: str, dst_wkt: str) -> Transformer:
    return Transformer.from_crs(CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt), always_xy=True)


def transformer(src: CRS, dst: CRS) -> Transformer:
    """A cached x/y (lon/lat order) transformer: building one costs milliseconds."""
    return _transformer(src.to_wkt(), dst.to_wkt())


def reproject_geometry(
    geom: shapely.Geometry, src: CRS, dst: CRS, segments: int = 64
) -> shapely.Geometry:
    """Reproject a geometry, densifying first so long edges follow the projection's curvature.

    `segments`: how many pieces the longest extent is cut into (a 512 m tile needs few).
    """
    if src == dst:
        return geom
    minx, miny, maxx, maxy = geom.bounds
    step = max(maxx - minx, maxy - miny) / segments or 1.0
    densified = shapely.segmentize(geom, step)
    return shapely.transform(densified, transformer(src, dst).transform, interleaved=False)


def utm_zone_band(crs: CRS) -> tuple[float, float] | None:
    """Longitude band (west, east) of a UTM CRS, or None for any other projection."""
    zone = crs.utm_zone
    if not zone:
        return None
    number = int(zone[:-1])
    return (number * 6 - 186.0, number * 6 - 180.0)


CHUNK_CELLS = 1 << 18
"""Cells whose boxes exist at once while planning: bounds the planner's memory at state size."""


def plan_cells(
    area_lonlat: shapely.Geometry,
    crs: CRS,
    gsd: float,
    size: int,
    zone_filter: bool,
) -> list[TileSpec]:
    """All grid cells of `crs` that intersect `area_lonlat` (and, if asked, centre in the zone).

    `zone_filter` is on when the build spans several UTM zones: then each cell is kept only by
    the zone that contains its centre, so zones never duplicate ground.
    """
    if area_lonlat.is_empty:
        return []
    area = reproject_geometry(area_lonlat, CRS.from_epsg(4326), crs)
    span = gsd * size
    xmin, ymin, xmax, ymax = area.bounds
    cols = np.arange(math.floor(xmin / span), math.floor(xmax / span) + 1)
    rows = np.arange(math.floor(ymin / span), math.floor(ymax / span) + 1)
    shapely.prepare(area)
    band = utm_zone_band(crs) if zone_filter else None
    wkt, epsg = crs.to_wkt(), crs.to_epsg()
    cells: list[TileSpec] = []
    step = max(1, CHUNK_CELLS // len(cols))
    for start in range(0, len(rows), step):  # a few rows at a time: a state's box is ~10^7 cells
        cc, rr = (a.ravel() for a in np.meshgrid(cols, rows[start : start + step]))
        boxes = shapely.box(cc * span, rr * span, (cc + 1) * span, (rr + 1) * span)
        keep = shapely.intersects(area, boxes) & ~shapely.touches(area, boxes)
        if band is not None:
            cx, cy = (cc + 0.5) * span, (rr + 0.5) * span
            lon, _ = transformer(crs, CRS.from_epsg(4326)).transform(cx, cy)
            keep &= (np.asarray(lon) >= band[0]) & (np.asarray(lon) < band[1])
        cells += [
            TileSpec(wkt, epsg, int(c), int(r), gsd, size)
            for c, r in zip(cc[keep], rr[keep], strict=True)
        ]
    return cells


def horizontal_crs(crs: CRS) -> CRS:
    """The horizontal part of a (possibly compound) CRS."""
    return crs.sub_crs_list[0] if crs.is_compound else crs


def same_horizontal_crs(a: CRS, b: CRS) -> bool:
    """True when two CRSs place x/y identically (EPSG codes first: WKT flavours differ)."""
    ha, hb = horizontal_crs(a), horizontal_crs(b)
    ea, eb = ha.to_epsg(), hb.to_epsg()
    if ea is not None and eb is not None:
        return ea == eb
    return ha.equals(hb, ignore_axis_order=True)
