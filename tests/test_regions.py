"""Tests for geoseg.regions: names, bboxes, AOI files, coverage checks."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import shapely

from geoseg.regions import (
    Region,
    RegionError,
    check_within,
    county_names,
    data_catalog_dir,
    resolve_region,
)

SAN_JOSE = shapely.Point(-121.89, 37.34)
NEON_TEAK = shapely.Point(-119.01, 37.0)
SQUARE = [[-121.95, 37.30], [-121.85, 37.30], [-121.85, 37.40], [-121.95, 37.40], [-121.95, 37.30]]


def _write(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _polygon(ring: list[list[float]] = SQUARE) -> dict:
    return {"type": "Polygon", "coordinates": [ring]}


# --- data catalog location ---------------------------------------------------------------------


def test_data_catalog_dir_default_is_repo_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEOSEG_DATA_CATALOG", raising=False)
    d = data_catalog_dir()
    assert d.name == "data_catalog"
    assert (d / "boundaries" / "california-counties.geojson").is_file()


def test_data_catalog_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = Path(__file__).resolve().parents[1] / "data_catalog" / "boundaries"
    shutil.copytree(src, tmp_path / "boundaries")
    monkeypatch.setenv("GEOSEG_DATA_CATALOG", str(tmp_path))
    assert data_catalog_dir() == tmp_path.resolve()
    assert len(county_names()) == 58


def test_missing_catalog_is_clear(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEOSEG_DATA_CATALOG", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="GEOSEG_DATA_CATALOG"):
        county_names()


# --- names -------------------------------------------------------------------------------------


def test_county_names() -> None:
    names = county_names()
    assert len(names) == 58 == len(set(names))
    assert names == sorted(names)
    assert {"Santa Clara", "Fresno", "Los Angeles", "Alpine", "Yuba"} <= set(names)


@pytest.mark.parametrize("alias", ["CA", "ca", "California", "CALIFORNIA", " state "])
def test_state_aliases(alias: str) -> None:
    r = resolve_region(alias)
    assert r.name == "CA"
    assert r.geometry.is_valid
    assert r.geometry.contains(SAN_JOSE)
    assert r.geometry.contains(NEON_TEAK)
    w, s, e, n = r.bounds
    assert -124.5 < w < -124.3 and 32.4 < s < 32.6 and -114.2 < e < -114.0 and 41.9 < n < 42.1


@pytest.mark.parametrize(
    "alias",
    ["Santa Clara", "santa clara", "SANTA CLARA", "Santa Clara County", "santa  clara county"],
)
def test_county_aliases(alias: str) -> None:
    r = resolve_region(alias)
    assert r.name == "Santa Clara"
    assert r.geometry.is_valid  # the source polygon self-intersects; it must be repaired
    assert r.geometry.contains(SAN_JOSE)
    assert not r.geometry.contains(NEON_TEAK)


def test_fresno_contains_neon_teak() -> None:
    r = resolve_region("Fresno")
    assert r.geometry.contains(NEON_TEAK)
    assert not r.geometry.contains(SAN_JOSE)


def test_every_county_resolves_and_lies_in_state() -> None:
    state = resolve_region("CA").geometry
    for name in county_names():
        r = resolve_region(name)
        assert r.name == name
        assert r.geometry.is_valid and not r.geometry.is_empty
        assert r.geometry.representative_point().within(state.buffer(0.01))


def test_unknown_name_suggests_the_closest_names_on_one_short_line() -> None:
    with pytest.raises(RegionError) as err:
        resolve_region("Foo")
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 160  # was all 58 names: 636 characters
    assert "'Foo' (closest: Yolo, Mono, Modoc)" in msg
    assert "CA" in msg and "58 California county names" in msg and "--bbox or --aoi" in msg


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(RegionError, match="did you mean 'Santa Clara'"):
        resolve_region("Santa Clar")


def test_empty_name() -> None:
    with pytest.raises(RegionError, match="empty region name"):
        resolve_region("  ")


# --- exactly one selector ----------------------------------------------------------------------


def test_requires_exactly_one_selector(tmp_path: Path) -> None:
    with pytest.raises(RegionError, match="exactly one"):
        resolve_region()
    with pytest.raises(RegionError, match="name and bbox"):
        resolve_region("CA", bbox=[-122, 37, -121, 38])
    with pytest.raises(RegionError, match="exactly one"):
        resolve_region(bbox=[-122, 37, -121, 38], aoi=tmp_path / "x.geojson")


# --- bbox --------------------------------------------------------------------------------------


def test_bbox_resolves() -> None:
    r = resolve_region(bbox=[-122.1, 37.2, -121.9, 37.4])
    assert r.name == "bbox(-122.1,37.2,-121.9,37.4)"
    assert r.bounds == (-122.1, 37.2, -121.9, 37.4)
    assert r.geometry.contains(shapely.Point(-122.0, 37.3))
    assert r.geojson()["type"] == "Polygon"


def test_bbox_accepts_tuple_and_ints() -> None:
    r = resolve_region(bbox=(-122, 37, -121, 38))
    assert r.name == "bbox(-122,37,-121,38)"


@pytest.mark.parametrize(
    ("bbox", "match"),
    [
        ([-121.9, 37.2, -122.1, 37.4], "W < E"),  # W > E
        ([-122.1, 37.4, -121.9, 37.2], "W < E"),  # S > N
        ([-122.1, 37.2, -122.1, 37.4], "W < E"),  # zero width
        ([-200, 37.2, -121.9, 37.4], "not lon/lat"),
        ([-122.1, -91, -121.9, 37.4], "not lon/lat"),
        ([580000, 4130000, 590000, 4140000], "not lon/lat"),  # UTM metres
        ([-122.1, 37.2, -121.9], "4 finite numbers"),
        ([-122.1, 37.2, -121.9, 37.4, 5], "4 finite numbers"),
        ([-122.1, float("nan"), -121.9, 37.4], "4 finite numbers"),
        (["a", 37.2, -121.9, 37.4], "4 numbers"),
        ("-122.1,37.2,-121.9,37.4", "4 numbers"),
    ],
)
def test_bad_bbox(bbox: object, match: str) -> None:
    with pytest.raises(RegionError, match=match):
        resolve_region(bbox=bbox)  # type: ignore[arg-type]


# --- AOI files ---------------------------------------------------------------------------------


def test_aoi_geometry(tmp_path: Path) -> None:
    r = resolve_region(aoi=_write(tmp_path / "sq.geojson", _polygon()))
    assert r.name == "aoi:sq.geojson"
    assert r.geometry.contains(SAN_JOSE)


def test_aoi_feature(tmp_path: Path) -> None:
    doc = {"type": "Feature", "properties": {"a": 1}, "geometry": _polygon()}
    r = resolve_region(aoi=str(_write(tmp_path / "f.geojson", doc)))
    assert r.geometry.contains(SAN_JOSE)


def test_aoi_feature_collection_union_ignores_non_polygons(tmp_path: Path) -> None:
    far = [[-119.1, 36.9], [-118.9, 36.9], [-118.9, 37.1], [-119.1, 37.1], [-119.1, 36.9]]
    doc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {}, "geometry": _polygon()},
            {"type": "Feature", "properties": {}, "geometry": _polygon(far)},
            {
                "type": "Feature",
                "properties": {},
                "geometry": {"type": "Point", "coordinates": [0, 0]},
            },
            {"type": "Feature", "properties": {}, "geometry": None},
        ],
    }
    r = resolve_region(aoi=_write(tmp_path / "fc.json", doc))
    assert r.geometry.geom_type == "MultiPolygon"
    assert r.geometry.contains(SAN_JOSE) and r.geometry.contains(NEON_TEAK)
    assert not r.geometry.contains(shapely.Point(0, 0))


def test_aoi_declared_crs84_read_directly(tmp_path: Path) -> None:
    doc = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}},
        "features": [{"type": "Feature", "properties": {}, "geometry": _polygon()}],
    }
    assert resolve_region(aoi=_write(tmp_path / "c.geojson", doc)).geometry.contains(SAN_JOSE)


def test_aoi_projected_crs_member_is_reprojected(tmp_path: Path) -> None:
    # A 2 km square around San Jose in NAD83 / UTM 10N, declared with the legacy `crs` member.
    from pyproj import Transformer

    x, y = Transformer.from_crs(4326, 26910, always_xy=True).transform(-121.89, 37.34)
    ring = [[x - 1000, y - 1000], [x + 1000, y - 1000], [x + 1000, y + 1000], [x - 1000, y + 1000]]
    doc = {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::26910"}},
        "features": [{"type": "Feature", "properties": {}, "geometry": _polygon([*ring, ring[0]])}],
    }
    r = resolve_region(aoi=_write(tmp_path / "utm.geojson", doc))
    assert r.geometry.contains(SAN_JOSE)
    w, s, e, n = r.bounds
    assert -122 < w < e < -121.8 and 37.3 < s < n < 37.4


def test_aoi_other_vector_format(tmp_path: Path) -> None:
    import geopandas as gpd

    gdf = gpd.GeoDataFrame({"id": [1]}, geometry=[shapely.Polygon(SQUARE)], crs="EPSG:4326").to_crs(
        "EPSG:3310"
    )
    path = tmp_path / "aoi.gpkg"
    gdf.to_file(path, driver="GPKG")
    r = resolve_region(aoi=path)
    assert r.name == "aoi:aoi.gpkg"
    assert r.geometry.contains(SAN_JOSE)
    assert r.geometry.within(shapely.Polygon(SQUARE).buffer(1e-6))


def test_aoi_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegionError, match="not found"):
        resolve_region(aoi=tmp_path / "nope.geojson")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "cannot read AOI"),
        ('{"foo": 1}', "cannot read AOI"),
        ('{"type": "Polygon", "coordinates": "x"}', "cannot read AOI"),
    ],
)
def test_aoi_unreadable(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "bad.geojson"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(RegionError, match=match) as err:
        resolve_region(aoi=p)
    assert "\n" not in str(err.value)


def test_aoi_unreadable_other_format(tmp_path: Path) -> None:
    p = tmp_path / "bad.gpkg"
    p.write_bytes(b"definitely not a geopackage")
    with pytest.raises(RegionError, match="cannot read AOI"):
        resolve_region(aoi=p)


def test_aoi_without_polygons(tmp_path: Path) -> None:
    doc = {"type": "LineString", "coordinates": [[-122, 37], [-121, 38]]}
    with pytest.raises(RegionError, match="no \\(non-empty\\) Polygon"):
        resolve_region(aoi=_write(tmp_path / "line.geojson", doc))
    with pytest.raises(RegionError, match="no \\(non-empty\\) Polygon"):
        resolve_region(
            aoi=_write(tmp_path / "empty.geojson", {"type": "FeatureCollection", "features": []})
        )


def test_aoi_empty_polygon(tmp_path: Path) -> None:
    with pytest.raises(RegionError, match="no \\(non-empty\\) Polygon"):
        resolve_region(aoi=_write(tmp_path / "e.geojson", {"type": "Polygon", "coordinates": []}))


def test_aoi_invalid_polygon(tmp_path: Path) -> None:
    bowtie = [[-122, 37], [-121, 38], [-121, 37], [-122, 38], [-122, 37]]
    with pytest.raises(RegionError, match=r"invalid polygon.*Self-intersection"):
        resolve_region(aoi=_write(tmp_path / "bowtie.geojson", _polygon(bowtie)))


def test_aoi_zero_area(tmp_path: Path) -> None:
    flat = [[-122, 37], [-121, 37], [-121.5, 37], [-122, 37]]
    with pytest.raises(RegionError):
        resolve_region(aoi=_write(tmp_path / "flat.geojson", _polygon(flat)))


def test_aoi_projected_coordinates_without_crs(tmp_path: Path) -> None:
    ring = [[580000, 4130000], [590000, 4130000], [590000, 4140000], [580000, 4130000]]
    with pytest.raises(RegionError, match="not lon/lat"):
        resolve_region(aoi=_write(tmp_path / "utm.geojson", _polygon(ring)))


# --- Region object and coverage check ------------------------------------------------------------


def test_region_is_hashable_picklable_and_geojson_serialisable() -> None:
    r = resolve_region("Santa Clara")
    assert pickle.loads(pickle.dumps(r)) == r
    assert hash(r) == hash(Region(r.name, r.geometry_wkt))
    gj = r.geojson()
    assert gj["type"] in {"Polygon", "MultiPolygon"}
    json.dumps(gj)
    assert shapely.geometry.shape(gj).equals(r.geometry)


def test_check_within() -> None:
    ca = resolve_region("CA").geometry
    check_within(resolve_region("Santa Clara"), ca, "California")
    check_within(resolve_region(bbox=[-125, 41, -123, 43]), ca, "California")  # partial overlap
    with pytest.raises(RegionError) as err:
        check_within(resolve_region(bbox=[2.0, 48.0, 3.0, 49.0]), ca, "NAIP California")
    msg = str(err.value)
    assert msg.startswith("region bbox(2,48,3,49) lies outside the NAIP California coverage (")
    assert "-124.4087" in msg and "\n" not in msg


def test_check_within_empty_coverage() -> None:
    with pytest.raises(RegionError, match="coverage \\(empty\\)"):
        check_within(resolve_region("CA"), shapely.Polygon(), "sample")
