"""Parsing Planetary Computer items (as served) into ImageryItem / PointCloudItem."""

from __future__ import annotations

import copy
import json
import pickle
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pyproj import CRS
from shapely import wkt

from geoseg.stac.errors import StacError
from geoseg.stac.items import parse_imagery, parse_pointcloud

STAC_EXAMPLES = Path(__file__).parent / "data" / "stac_examples"
NAIP_FILES = sorted((STAC_EXAMPLES / "items" / "naip").glob("*.json"))
COPC_FILES = sorted((STAC_EXAMPLES / "items" / "3dep-lidar-copc").glob("*.json"))
LAX_2016 = "items/naip/ca_m_3311805_ne_11_.6_20160711_20161004.json"
COPC_7015 = "items/3dep-lidar-copc/USGS_LPC_UT_StatewideSouth_2020_A20_12SUH7015.json"


def load_example(relative: str) -> dict:
    return json.loads((STAC_EXAMPLES / relative).read_text())


@pytest.mark.parametrize("path", NAIP_FILES, ids=lambda p: p.stem)
def test_parse_every_naip_example(path: Path) -> None:
    raw = load_example(f"items/naip/{path.name}")
    props = raw["properties"]
    item = parse_imagery(raw)

    assert item.id == raw["id"] and item.collection == "naip"
    assert item.href == raw["assets"]["image"]["href"]
    assert item.year == int(props["naip:year"])  # served as a string
    assert item.datetime == datetime.fromisoformat(props["datetime"])
    assert item.datetime.tzinfo is not None
    assert item.epsg == props["proj:epsg"]
    assert CRS.from_wkt(item.crs_wkt).to_epsg() == props["proj:epsg"]
    assert item.gsd == props["gsd"]
    assert item.band_count == 4
    assert item.bbox == tuple(raw["bbox"])
    footprint = wkt.loads(item.footprint_wkt)
    assert footprint.geom_type == "Polygon"
    assert footprint.bounds == pytest.approx(item.bbox)


@pytest.mark.parametrize("path", COPC_FILES, ids=lambda p: p.stem)
def test_parse_every_copc_example(path: Path) -> None:
    raw = load_example(f"items/3dep-lidar-copc/{path.name}")
    item = parse_pointcloud(raw)

    assert raw["properties"]["proj:epsg"] is None and raw["properties"]["datetime"] is None
    assert item.href == raw["assets"]["data"]["href"]
    crs = CRS.from_wkt(item.crs_wkt)
    assert crs.is_compound
    horizontal, vertical = crs.sub_crs_list
    assert horizontal.to_epsg() == 26912  # NAD83 / UTM zone 12N
    assert vertical.to_epsg() == 5703  # NAVD88 height
    west, south, _, east, north, _ = raw["bbox"]
    assert item.bbox == (west, south, east, north)
    assert item.start == datetime(2020, 1, 1, tzinfo=UTC)
    assert item.end == datetime(2020, 12, 31, tzinfo=UTC)
    assert item.project == "UT_StatewideSouth_1_2020"
    assert item.count == raw["properties"]["pc:count"]
    assert wkt.loads(item.footprint_wkt).geom_type == "Polygon"


def test_parsed_items_are_picklable() -> None:
    imagery = parse_imagery(load_example(LAX_2016))
    lidar = parse_pointcloud(load_example(COPC_7015))
    assert pickle.loads(pickle.dumps(imagery)) == imagery
    assert pickle.loads(pickle.dumps(lidar)) == lidar


def test_naip_utm_zones_and_gsd() -> None:
    assert parse_imagery(load_example(LAX_2016)).gsd == 0.6
    sf = parse_imagery(load_example("items/naip/ca_m_3712221_ne_10_060_20220518.json"))
    assert sf.epsg == 26910 and sf.year == 2022


def test_search_page_links_and_items() -> None:
    page = load_example("api/search_naip_limit10_page1.json")
    (next_link,) = [link for link in page["links"] if link["rel"] == "next"]
    assert next_link["method"] == "POST"
    assert next_link["body"]["token"] == "next:naip:mt_m_4811501_se_11_060_20231117_20240103"
    assert next_link["body"]["collections"] == ["naip"] and next_link["body"]["limit"] == 10
    items = [parse_imagery(feature) for feature in page["features"]]
    assert len(items) == 10 and {i.year for i in items} == {2023}


def _naip() -> dict:
    return copy.deepcopy(load_example(LAX_2016))


def _copc() -> dict:
    return copy.deepcopy(load_example(COPC_7015))


def test_naip_year_falls_back_to_datetime() -> None:
    raw = _naip()
    del raw["properties"]["naip:year"]
    assert parse_imagery(raw).year == 2016
    raw["properties"]["naip:year"] = 2015
    assert parse_imagery(raw).year == 2015


def test_imagery_null_datetime_uses_start() -> None:
    raw = _naip()
    raw["properties"].update(datetime=None, start_datetime="2016-07-11T00:00:00Z")
    assert parse_imagery(raw).datetime == datetime(2016, 7, 11, tzinfo=UTC)
    raw["properties"]["start_datetime"] = None
    with pytest.raises(StacError, match="neither datetime nor start_datetime"):
        parse_imagery(raw)


@pytest.mark.parametrize(
    ("fields", "epsg"),
    [
        ({"proj:code": "EPSG:26910"}, 26910),
        ({"proj:wkt2": CRS.from_epsg(32611).to_wkt()}, 32611),
        ({"proj:projjson": CRS.from_epsg(26912).to_json_dict()}, 26912),
    ],
)
def test_imagery_crs_sources(fields: dict, epsg: int) -> None:
    raw = _naip()
    raw["properties"]["proj:epsg"] = None
    raw["properties"].update(fields)
    item = parse_imagery(raw)
    assert item.epsg == epsg and CRS.from_wkt(item.crs_wkt).to_epsg() == epsg


def test_asset_level_crs_overrides_item() -> None:
    raw = _naip()
    raw["assets"]["image"]["proj:epsg"] = 26910
    assert parse_imagery(raw).epsg == 26910


def test_imagery_without_crs_is_an_error() -> None:
    raw = _naip()
    raw["properties"]["proj:epsg"] = None
    with pytest.raises(StacError, match="has no CRS"):
        parse_imagery(raw)
    raw["properties"]["proj:code"] = "EPSG:0"
    with pytest.raises(StacError, match="unusable proj:code"):
        parse_imagery(raw)


def test_band_count_from_asset_properties_or_default() -> None:
    raw = _naip()
    raw["assets"]["image"]["eo:bands"] = raw["assets"]["image"]["eo:bands"][:3]
    assert parse_imagery(raw).band_count == 3
    del raw["assets"]["image"]["eo:bands"]
    assert parse_imagery(raw).band_count == 4
    raw["properties"]["eo:bands"] = [{"name": "Red"}, {"name": "Green"}, {"name": "Blue"}]
    assert parse_imagery(raw).band_count == 3


def test_missing_asset_is_a_clear_error() -> None:
    raw = _naip()
    del raw["assets"]["image"]
    with pytest.raises(StacError, match=r"no 'image' asset .*metadata, rendered_preview"):
        parse_imagery(raw)
    with pytest.raises(StacError, match="no 'data' asset"):
        parse_pointcloud(raw)


def test_invalid_datetime_and_bbox() -> None:
    raw = _copc()
    raw["properties"]["start_datetime"] = "last summer"
    with pytest.raises(StacError, match="invalid start_datetime"):
        parse_pointcloud(raw)
    raw = _copc()
    raw["bbox"] = [1, 2, 3]
    with pytest.raises(StacError, match="bbox of 3 numbers"):
        parse_pointcloud(raw)


def test_bbox_from_geometry_when_absent() -> None:
    raw = _copc()
    del raw["bbox"]
    item = parse_pointcloud(raw)
    # PC's COPC bbox and geometry disagree slightly, so compare with the geometry only.
    assert item.bbox == wkt.loads(item.footprint_wkt).bounds


def test_pointcloud_fallbacks() -> None:
    raw = _copc()
    for key in ("3dep:usgs_id", "proj:projjson", "start_datetime", "end_datetime", "pc:count"):
        del raw["properties"][key]
    raw["properties"]["datetime"] = "2019-05-01T00:00:00Z"
    item = parse_pointcloud(raw)
    assert item.project == "USGS_LPC_UT_StatewideSouth_2020_A20"  # id without the tile suffix
    assert item.crs_wkt is None and item.count is None
    assert item.start == item.end == datetime(2019, 5, 1, tzinfo=UTC)
