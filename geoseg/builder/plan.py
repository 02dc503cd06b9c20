"""Plan a build: which tiles to cut and which STAC items feed each of them.

Imagery decides the grid: tiles live on the projected (UTM) CRS of the NAIP scenes, one grid per
CRS. Cells touching the region and any imagery or LiDAR footprint are planned; those lacking one of
the two are reported as skipped right here, without a task.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import shapely
from pyproj import CRS

from geoseg.builder.grid import (
    CHUNK_CELLS,
    TileSpec,
    horizontal_crs,
    plan_cells,
    reproject_geometry,
)
from geoseg.stac.items import ImageryItem, PointCloudItem

LONLAT = CRS.from_epsg(4326)


@dataclass
class PlannedTile:
    tile: TileSpec
    imagery: list[ImageryItem] = field(default_factory=list)
    lidar: list[PointCloudItem] = field(default_factory=list)

    @property
    def skip_reason(self) -> str | None:
        if not self.imagery:
            return "no NAIP coverage"
        if not self.lidar:
            return "no LiDAR coverage"
        return None


def _footprints(items: list, crs: CRS) -> list[shapely.Geometry]:
    return [reproject_geometry(shapely.from_wkt(i.footprint_wkt), LONLAT, crs) for i in items]


def _assign(cells: list[TileSpec], items: list, crs: CRS) -> list[list[int]]:
    """Indices of the items whose footprint overlaps (not just touches) each cell."""
    out: list[list[int]] = [[] for _ in cells]
    if not items or not cells:
        return out
    feet = _footprints(items, crs)
    tree = shapely.STRtree(feet)
    feet = np.asarray(feet, dtype=object)
    for start in range(0, len(cells), CHUNK_CELLS):  # pairs of a chunk only: ~10^7 at state size
        chunk = cells[start : start + CHUNK_CELLS]
        boxes = shapely.box(*np.array([c.bounds for c in chunk]).T)
        cell_idx, item_idx = tree.query(boxes, predicate="intersects")
        overlap = ~shapely.touches(boxes[cell_idx], feet[item_idx])
        for c, i in zip(cell_idx[overlap], item_idx[overlap], strict=True):
            out[start + c].append(int(i))
    return out


def plan_tiles(
    region: shapely.Geometry,
    imagery: list[ImageryItem],
    lidar: list[PointCloudItem],
    gsd: float,
    size: int,
) -> list[PlannedTile]:
    """All cells over region ∩ (imagery ∪ LiDAR) with their inputs, sorted by tile id."""
    groups: dict[str, list[ImageryItem]] = defaultdict(list)
    for item in imagery:
        groups[horizontal_crs(CRS.from_wkt(item.crs_wkt)).to_wkt()].append(item)
    crss = [CRS.from_wkt(w) for w in groups]
    zone_filter = sum(1 for c in crss if c.utm_zone) > 1
    lidar_union = shapely.union_all([shapely.from_wkt(i.footprint_wkt) for i in lidar])
    planned: list[PlannedTile] = []
    for crs, items in zip(crss, groups.values(), strict=True):
        # LiDAR-only ground is planned (and reported as lacking NAIP) only inside the CRS's
        # area of use: another zone's LiDAR must not stretch this grid across the map.
        domain = shapely.box(*crs.area_of_use.bounds) if crs.area_of_use else shapely.Polygon()
        own = [shapely.from_wkt(i.footprint_wkt) for i in items]
        covered = shapely.union_all([*own, shapely.intersection(lidar_union, domain)])
        cells = plan_cells(shapely.intersection(region, covered), crs, gsd, size, zone_filter)
        img_idx = _assign(cells, items, crs)
        lid_idx = _assign(cells, lidar, crs)
        for cell, ii, li in zip(cells, img_idx, lid_idx, strict=True):
            planned.append(PlannedTile(cell, [items[i] for i in ii], [lidar[i] for i in li]))
    planned.sort(key=lambda p: p.tile.id)
    return planned
