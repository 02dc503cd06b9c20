"""Unit behaviour of the builder's pieces: label remap, rasterizing, grid, CRS units, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from pyproj import CRS

from geoseg.builder.grid import TileSpec, plan_cells, same_horizontal_crs
from geoseg.builder.points import vertical_to_metres
from geoseg.builder.rasterize import FLOAT_NODATA, rasterize
from geoseg.builder.split import BUFFER, assign_splits
from geoseg.classes import remap_asprs
from geoseg.regions import resolve_region


def test_asprs_remap_matches_n3c_table():
    codes = np.arange(256, dtype=np.uint8)
    got = remap_asprs(codes)
    assert got[[3, 9, 17]].tolist() == [1, 1, 1]  # others
    assert got[2] == 2 and got[4] == 3 and got[5] == 3 and got[6] == 4
    unlabeled = [0, 1, 7, 8, 10, 11, 12, 13, 14, 15, 16, 18, 64, 65, 255]
    assert got[unlabeled].tolist() == [0] * len(unlabeled)


def _tile(size: int = 4, gsd: float = 1.0) -> TileSpec:
    return TileSpec(CRS.from_epsg(26910).to_wkt(), 26910, 100, 200, gsd, size)


def _points(rows):
    x, y, z, cls, inten, nret = (np.array(v) for v in zip(*rows, strict=True))
    return {
        "x": x.astype(float),
        "y": y.astype(float),
        "z": z.astype(float),
        "classification": cls.astype(np.uint8),
        "intensity": inten.astype(np.uint16),
        "return_number": np.ones(len(x), np.uint8),
        "number_of_returns": nret.astype(np.uint8),
    }


def test_rasterize_highest_labelled_point_wins_and_noise_is_ignored():
    tile = _tile()
    x0, _, _, y1 = tile.bounds
    px = (x0 + 0.5, y1 - 0.5)  # pixel (row 0, col 0)
    pts = _points(
        [
            (*px, 10.0, 2, 100, 1),  # ground
            (*px, 25.0, 5, 200, 3),  # high vegetation above it -> tree wins
            (*px, 99.0, 7, 50, 1),  # low noise: ignored for label and DSM
            (*px, 30.0, 1, 10, 1),  # unclassified: higher but never labels
            (x0 + 1.5, y1 - 0.5, 5.0, 6, 300, 2),  # building in (0, 1)
            (x0 + 3.5, y1 - 3.5, 5.0, 12, 300, 1),  # overlap only -> unlabeled (3, 3)
        ]
    )
    r = rasterize(pts, tile)
    assert r.label[0, 0] == 3
    assert r.label[0, 1] == 4
    assert r.label[3, 3] == 0 and r.label[1, 1] == 0
    assert r.dsm[0, 0] == pytest.approx(30.0)  # unclassified still shapes the surface
    assert r.dsm[1, 1] == FLOAT_NODATA
    assert r.intensity[0, 0] == pytest.approx((100 + 200 + 10) / 3)
    assert r.num_returns[0, 0] == 3 and r.num_returns[2, 2] == 0


def test_rasterize_pixel_edges_follow_the_grid():
    tile = _tile(size=4, gsd=0.5)
    x0, y0, x1, y1 = tile.bounds
    pts = _points([(x0, y1, 1.0, 2, 1, 1), (x1 - 1e-6, y0 + 1e-6, 1.0, 6, 1, 1)])
    r = rasterize(pts, tile)
    assert r.label[0, 0] == 2 and r.label[3, 3] == 4


def test_vertical_units_from_compound_crs():
    feet = CRS.from_user_input("EPSG:2227+6360")  # CA zone 3 (ftUS) + NAVD88 height (ftUS)
    assert vertical_to_metres(feet) == pytest.approx(0.3048006096)
    metres = CRS.from_user_input("EPSG:26910+5703")
    assert vertical_to_metres(metres) == pytest.approx(1.0)
    # no vertical CRS: heights follow the horizontal unit (LAS practice for state plane feet)
    assert vertical_to_metres(CRS.from_epsg(2227)) == pytest.approx(0.3048006096)
    assert same_horizontal_crs(metres, CRS.from_epsg(26910))
    assert not same_horizontal_crs(feet, CRS.from_epsg(26910))


def test_grid_cells_never_duplicate_ground_across_utm_zones():
    ca = resolve_region("CA").geometry
    strip = shapely.intersection(ca, shapely.box(-120.3, 38.0, -119.7, 38.2))  # crosses -120°
    z10 = plan_cells(strip, CRS.from_epsg(26910), 1.0, 512, zone_filter=True)
    z11 = plan_cells(strip, CRS.from_epsg(26911), 1.0, 512, zone_filter=True)
    assert z10 and z11
    c10 = [t.footprint_lonlat().centroid.x for t in z10]
    c11 = [t.footprint_lonlat().centroid.x for t in z11]
    assert max(c10) < -120.0 <= min(c11)
    assert len({t.id for t in z10} | {t.id for t in z11}) == len(z10) + len(z11)
    # Together they cover the strip: every 1 km probe point lies in some tile.
    union = shapely.union_all([t.footprint_lonlat() for t in z10 + z11])
    for lon in np.linspace(-120.29, -119.71, 12):
        assert union.buffer(1e-6).contains(shapely.Point(lon, 38.1))


def test_planning_in_chunks_gives_the_same_cells_and_items(monkeypatch):
    """State-size planning works a few rows of cells at a time; the chunks must not show."""
    from types import SimpleNamespace

    import geoseg.builder.grid as grid
    import geoseg.builder.plan as plan

    ca = resolve_region("CA").geometry
    strip = shapely.intersection(ca, shapely.box(-120.3, 38.0, -119.7, 38.2))
    crs = CRS.from_epsg(26910)
    items = [
        SimpleNamespace(footprint_wkt=shapely.box(x, 38.0, x + 0.07, 38.2).wkt)
        for x in np.arange(-120.3, -119.7, 0.05)
    ]
    whole = plan_cells(strip, crs, 1.0, 512, zone_filter=True)
    whole_items = plan._assign(whole, items, crs)
    monkeypatch.setattr(grid, "CHUNK_CELLS", 7)
    monkeypatch.setattr(plan, "CHUNK_CELLS", 5)
    chunked = plan_cells(strip, crs, 1.0, 512, zone_filter=True)
    assert len(whole) > 20 and chunked == whole
    assert plan._assign(chunked, items, crs) == whole_items
    assert all(whole_items) and max(map(len, whole_items)) > 1


def test_tile_ids_are_stable_and_grid_anchored():
    t = TileSpec(CRS.from_epsg(26910).to_wkt(), 26910, 1200, 8400, 1.0, 512)
    assert t.id == "26910_100cm512_1200_8400"
    assert t.bounds == (1200 * 512.0, 8400 * 512.0, 1201 * 512.0, 8401 * 512.0)


def test_split_blocks_have_no_neighbours_across_splits():
    cells = [(f"t{c}_{r}", "g", c, r) for c in range(40) for r in range(40)]
    split = assign_splits(cells, block=4, seed=1)
    where = {(c, r): split[t] for t, _, c, r in cells}
    counts = {s: list(split.values()).count(s) for s in ("train", "val", "test", BUFFER)}
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    for (c, r), s in where.items():
        if s == BUFFER:
            continue
        for dc in (-1, 0, 1):
            for dr in (-1, 0, 1):
                other = where.get((c + dc, r + dr))
                assert other in (None, s, BUFFER), ((c, r), s, other)
    assert assign_splits(cells, block=4, seed=1) == split  # deterministic


def test_each_grid_is_split_to_the_ratios_on_its_own():
    # A large site and a small one of three scattered blocks (like NEON plots): dealt over all
    # blocks at once (before per-grid dealing), seed 4 put all three small blocks in train.
    big = [(f"a{c}_{r}", "big", c, r) for c in range(40) for r in range(40)]
    small = [(f"b{c}", "small", c, 0) for c in (0, 100, 200)]
    split = assign_splits(big + small, block=4, seed=4)
    assert sorted(split[t] for t, *_ in small) == ["test", "train", "val"]
    counts = {s: sum(split[t] == s for t, *_ in big) for s in ("train", "val", "test")}
    assert counts["val"] > 0 and counts["test"] > 0 and counts["train"] > counts["val"]
    alone = assign_splits(big, block=4, seed=4)
    assert {t: split[t] for t, *_ in big} == alone  # a grid's split ignores the others


def test_block_catalogs_list_each_tile_once_whatever_the_id_order(tmp_path):
    """Sorted ids cross blocks (col 500 rows 60-70 span two; col 501 comes back): every block
    catalog must still list all its tiles, and the collection each block once."""
    import json

    from geoseg.builder.catalog import CATALOG_BLOCK, block_of, write_stac

    wkt = _tile().crs_wkt
    ids = sorted(
        TileSpec(wkt, 26910, col, row, 1.0, 512).id
        for col in (500, 501, 1000)
        for row in (60, 63, 64, 70)
    )
    write_stac(tmp_path, ids, None, None, resolve_region("CA"))
    links = json.loads((tmp_path / "collection.json").read_text())["links"]
    children = [link["href"] for link in links if link["rel"] == "child"]
    assert len(children) == len(set(children)) == len({block_of(t) for t in ids})
    listed = []
    for href in children:
        doc = json.loads((tmp_path / href).read_text())
        items = [Path(link["href"]).stem for link in doc["links"] if link["rel"] == "item"]
        assert {block_of(t) for t in items} == {block_of(items[0])}
        listed += items
    assert sorted(listed) == ids and CATALOG_BLOCK == 64
