"""The embedded offline sample catalog (data_catalog/sample/) is complete, valid and PC-shaped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import laspy
import pystac
import pytest
import rasterio
import shapely
from pyproj import CRS
from rasterio.enums import ColorInterp
from rio_cogeo.cogeo import cog_validate
from shapely.geometry import shape

from geoseg.regions import data_catalog_dir, resolve_region

SAMPLE = data_catalog_dir() / "sample"
ITEMS_DIR = SAMPLE / "items"
COLLECTIONS = ("naip", "3dep-lidar-copc")
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
COPC_TYPE = "application/vnd.laszip+copc"


def _items(collection: str) -> list[dict[str, Any]]:
    doc = json.loads((ITEMS_DIR / f"{collection}.json").read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection"
    return doc["features"]


def _asset_path(href: str) -> Path:
    """Resolve an asset href the way the server does: relative to the items file."""
    assert "://" not in href, f"asset href must be relative: {href}"
    return (ITEMS_DIR / href).resolve()


NAIP = _items("naip")
COPC = _items("3dep-lidar-copc")
ALL = NAIP + COPC


def _ids(items: list[dict[str, Any]]) -> list[str]:
    return [it["id"] for it in items]


def test_layout_and_size() -> None:
    for c in COLLECTIONS:
        assert (SAMPLE / "collections" / f"{c}.json").is_file()
        assert (ITEMS_DIR / f"{c}.json").is_file()
    assert (SAMPLE / "README.md").is_file()
    assert len(list((SAMPLE / "LICENSES").glob("*.txt"))) >= 2
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total < 15 * 2**20


def test_expected_items() -> None:
    assert len(NAIP) == 13 and len(COPC) == 15
    assert len(set(_ids(ALL))) == len(ALL)
    assert sum(i.startswith("ca_teak_") for i in _ids(NAIP)) == 12
    assert sum(i.startswith("NEON_LPC_TEAK_") for i in _ids(COPC)) == 14
    # TEAK_048 and TEAK_056 have lidar but no imagery ("no NAIP coverage" tiles).
    plots_img = {i.split("_")[2] for i in _ids(NAIP) if i.startswith("ca_teak_")}
    plots_pc = {i.rsplit("_", 1)[1] for i in _ids(COPC) if i.startswith("NEON_LPC_TEAK_")}
    assert plots_pc - plots_img == {"048", "056"}


@pytest.mark.parametrize("collection", COLLECTIONS)
def test_collection_parses_and_matches_items(collection: str) -> None:
    doc = json.loads((SAMPLE / "collections" / f"{collection}.json").read_text(encoding="utf-8"))
    coll = pystac.Collection.from_dict(doc)
    assert coll.id == collection
    assert "item_assets" in doc
    overall = doc["extent"]["spatial"]["bbox"][0]
    for it in _items(collection):
        assert it["collection"] == collection
        b = it["bbox"]
        w, s, e, n = (b[0], b[1], b[3], b[4]) if len(b) == 6 else b
        assert overall[0] <= w <= e <= overall[2] and overall[1] <= s <= n <= overall[3]


@pytest.mark.parametrize("item", ALL, ids=_ids(ALL))
def test_item_is_pystac_item_with_resolvable_assets(item: dict[str, Any]) -> None:
    it = pystac.Item.from_dict(item)
    assert it.id == item["id"]
    assert item["stac_version"] == "1.0.0"
    assert (
        "https://stac-extensions.github.io/projection/v1.0.0/schema.json" in item["stac_extensions"]
    )
    for asset in item["assets"].values():
        path = _asset_path(asset["href"])
        assert path.is_file(), path
        assert path.is_relative_to(SAMPLE.resolve())
    # lon/lat footprint agrees with the 2-D part of the bbox
    geom = shape(item["geometry"])
    assert geom.is_valid
    b = item["bbox"]
    w, s, e, n = (b[0], b[1], b[3], b[4]) if len(b) == 6 else b
    assert geom.bounds == pytest.approx((w, s, e, n), abs=1e-9)
    assert -180 <= w < e <= 180 and -90 <= s < n <= 90


def test_every_asset_file_is_referenced() -> None:
    referenced = {_asset_path(a["href"]) for it in ALL for a in it["assets"].values()}
    on_disk = {p.resolve() for p in (SAMPLE / "assets").rglob("*") if p.is_file()}
    assert referenced == on_disk


@pytest.mark.parametrize("item", NAIP, ids=_ids(NAIP))
def test_naip_item_shape_and_cog(item: dict[str, Any]) -> None:
    p = item["properties"]
    assert isinstance(p["naip:year"], str) and p["naip:year"] == p["datetime"][:4]
    assert p["naip:state"] in {"ca", "fr"}
    asset = item["assets"]["image"]
    assert asset["type"] == COG_TYPE and asset["roles"] == ["data"]
    bands = [b["common_name"] for b in asset["eo:bands"]]
    assert bands in (["red", "green", "blue"], ["red", "green", "blue", "nir"])

    path = _asset_path(asset["href"])
    valid, errors, _ = cog_validate(str(path), strict=True)
    assert valid, errors
    with rasterio.open(path) as ds:
        assert ds.count == len(bands) and ds.dtypes[0] == "uint8"
        assert ds.colorinterp[:3] == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        if ds.count == 4:
            assert ds.colorinterp[3] != ColorInterp.alpha  # NIR must not be a transparency mask
        assert ColorInterp.alpha not in ds.colorinterp
        assert ds.crs.to_epsg() == p["proj:epsg"]
        assert [ds.height, ds.width] == p["proj:shape"]
        assert list(ds.transform)[:6] == pytest.approx(p["proj:transform"][:6])
        assert list(ds.bounds) == pytest.approx(p["proj:bbox"])
        assert ds.res[0] == pytest.approx(p["gsd"])
        assert ds.overviews(1)


@pytest.mark.parametrize("item", COPC, ids=_ids(COPC))
def test_copc_item_shape_and_file(item: dict[str, Any]) -> None:
    p = item["properties"]
    # Planetary Computer's quirks, reproduced on purpose
    assert p["datetime"] is None and p["start_datetime"] <= p["end_datetime"]
    assert p["proj:epsg"] is None
    assert len(item["bbox"]) == 6 and len(p["proj:bbox"]) == 6
    assert p["pc:type"] == "lidar" and p["pc:encoding"] == COPC_TYPE
    assert {s["name"] for s in p["pc:schemas"]} >= {"X", "Y", "Z", "Classification", "GpsTime"}
    assert isinstance(p["3dep:usgs_id"], str) and p["3dep:usgs_id"]
    assert shape(p["proj:geometry"]).is_valid
    asset = item["assets"]["data"]
    assert asset["type"] == COPC_TYPE and asset["roles"] == ["data"]
    item_crs = CRS.from_json_dict(p["proj:projjson"])

    with laspy.CopcReader.open(_asset_path(asset["href"])) as r:
        h = r.header
        assert h.point_format.id in (6, 7, 8) and h.version.minor == 4
        assert h.point_count == p["pc:count"]
        crs = h.parse_crs()
        assert crs is not None and crs.equals(item_crs)
        assert list(h.mins) + list(h.maxs) == pytest.approx(
            [p["proj:bbox"][i] for i in (0, 1, 2, 3, 4, 5)], abs=0.01
        )
        assert item["bbox"][2] == pytest.approx(h.mins[2], abs=0.01)
        assert item["bbox"][5] == pytest.approx(h.maxs[2], abs=0.01)
        pts = r.query()
        assert len(pts) == p["pc:count"]
        # the native footprint covers every point
        fp = shape(p["proj:geometry"]).buffer(0.01)
        assert shapely.contains_xy(fp, pts.x, pts.y).all()


def test_teak_crs_is_compound_utm11_navd88() -> None:
    for item in COPC:
        if item["id"].startswith("NEON_LPC_TEAK_"):
            crs = CRS.from_json_dict(item["properties"]["proj:projjson"])
            assert crs.is_compound
            horiz, vert = crs.sub_crs_list
            assert horiz.to_epsg() == 32611 and vert.to_epsg() == 5703


def test_teak_sample_lies_in_fresno_county() -> None:
    fresno = resolve_region("Fresno").geometry
    teak = [it for it in ALL if it["id"].startswith(("ca_teak_", "NEON_LPC_TEAK_"))]
    assert len(teak) == 26
    for it in teak:
        assert shape(it["geometry"]).within(fresno), it["id"]


def test_teak_056_outlier_is_kept() -> None:
    (item,) = [it for it in COPC if it["id"].endswith("TEAK_056")]
    assert item["bbox"][5] > 3190


def test_lambert93_site() -> None:
    (img,) = [it for it in NAIP if it["id"].startswith("fr_lambert93_")]
    (pc,) = [it for it in COPC if it["id"].startswith("FR_L93_")]
    assert len(img["assets"]["image"]["eo:bands"]) == 4
    assert img["properties"]["proj:epsg"] == 2154
    assert CRS.from_json_dict(pc["properties"]["proj:projjson"]).to_epsg() == 2154
    with laspy.CopcReader.open(_asset_path(pc["assets"]["data"]["href"])) as r:
        classes = set(r.query().classification.tolist())
    assert {2, 3, 5, 6} <= classes  # ground, low vegetation, high vegetation, building
    assert shape(img["geometry"]).intersects(shape(pc["geometry"]))
