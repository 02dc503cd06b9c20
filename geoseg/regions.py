"""Named and user-defined regions of interest (California, its 58 counties, a bbox or an AOI file).

Every entry point that selects data (STAC search, dataset build, retrieval) takes one region, so
they all agree on what "Santa Clara" means and fail early, with one readable line, on bad input
instead of silently searching the whole country or nothing at all.

Geometries are always lon/lat (EPSG:4326): that is what STAC `intersects` expects.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import mapping, shape
from shapely.validation import explain_validity

__all__ = [
    "Region",
    "RegionError",
    "check_within",
    "county_names",
    "data_catalog_dir",
    "resolve_region",
]

STATE_NAME = "CA"
_STATE_ALIASES = frozenset({"ca", "california", "state", "california state", "state of california"})
_COUNTIES_FILE = "california-counties.geojson"
_STATE_FILE = "california-state.geojson"
_CRS84_NAMES = frozenset(
    {
        "urn:ogc:def:crs:ogc:1.3:crs84",
        "urn:ogc:def:crs:ogc::crs84",
        "urn:ogc:def:crs:epsg::4326",
        "urn:ogc:def:crs:epsg:4326",
        "epsg:4326",
        "crs84",
        "ogc:crs84",
    }
)
_GEOJSON_SUFFIXES = frozenset({".geojson", ".json"})


class RegionError(ValueError):
    """A region could not be resolved; the message is one line meant for the end user."""


@dataclass(frozen=True)
class Region:
    """A resolved region: a display name and its lon/lat footprint.

    The geometry is stored as WKT so the object stays hashable, picklable and cheap to ship to
    dask workers; the shapely object is parsed lazily.
    """

    name: str
    geometry_wkt: str

    @cached_property
    def geometry(self) -> shapely.Geometry:
        """The footprint as a shapely (Multi)Polygon in EPSG:4326."""
        return shapely.from_wkt(self.geometry_wkt)

    def geojson(self) -> dict[str, Any]:
        """GeoJSON geometry dict (plain lists, JSON-serialisable), e.g. for STAC `intersects`."""
        return json.loads(json.dumps(mapping(self.geometry)))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(W, S, E, N) in degrees."""
        return tuple(float(v) for v in self.geometry.bounds)  # type: ignore[return-value]


def data_catalog_dir() -> Path:
    """Directory holding boundaries/ and sample/.

    `GEOSEG_DATA_CATALOG` overrides it so an installed (non-editable) package or a test can point
    at another copy; the default is the `data_catalog/` folder next to the `geoseg` package.
    """
    env = os.environ.get("GEOSEG_DATA_CATALOG")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "data_catalog"


def _boundaries_dir() -> Path:
    path = data_catalog_dir() / "boundaries"
    if not (path / _COUNTIES_FILE).is_file():
        raise FileNotFoundError(
            f"California boundaries not found in {path}; set GEOSEG_DATA_CATALOG to the "
            "data_catalog directory"
        )
    return path


def _clean(geom: shapely.Geometry) -> shapely.Geometry:
    """Repair invalid polygons (3 source counties self-intersect) and keep only polygonal parts."""
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    polys = _polygons(geom)
    if not polys:
        return shapely.MultiPolygon()
    return shapely.union_all(polys) if len(polys) > 1 else polys[0]


def _polygons(geom: shapely.Geometry) -> list[shapely.Geometry]:
    """Flatten any geometry to its non-empty Polygon parts."""
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, shapely.Polygon):
        return [geom]
    if isinstance(geom, shapely.MultiPolygon | shapely.GeometryCollection):
        return [p for part in geom.geoms for p in _polygons(part)]
    return []


@lru_cache(maxsize=4)
def _load_counties(path: Path) -> dict[str, str]:
    """name -> WKT of the (repaired) county polygon, cached per boundaries file."""
    with open(path, encoding="utf-8") as f:
        fc = json.load(f)
    out: dict[str, str] = {}
    for feat in fc["features"]:
        geom = _clean(shape(feat["geometry"]))
        out[str(feat["properties"]["name"])] = shapely.to_wkt(geom, rounding_precision=-1)
    return dict(sorted(out.items()))


@lru_cache(maxsize=4)
def _load_state(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        fc = json.load(f)
    geom = _clean(shapely.union_all([shape(ft["geometry"]) for ft in fc["features"]]))
    return shapely.to_wkt(geom, rounding_precision=-1)


def county_names() -> list[str]:
    """The 58 California county names as spelled in the boundaries file (sorted)."""
    return list(_load_counties(_boundaries_dir() / _COUNTIES_FILE))


def _valid_choices() -> str:
    """What a region name may be, short enough for a one-line error (not all 58 names)."""
    n = len(county_names())
    return f"use {STATE_NAME}, one of the {n} California county names, --bbox or --aoi"


def _resolve_name(name: str) -> Region:
    key = " ".join(name.strip().split()).casefold()
    if key in _STATE_ALIASES:
        return Region(STATE_NAME, _load_state(_boundaries_dir() / _STATE_FILE))
    if key.endswith(" county"):
        key = key[: -len(" county")].strip()
    counties = _load_counties(_boundaries_dir() / _COUNTIES_FILE)
    by_key = {c.casefold(): c for c in counties}
    if key in by_key:
        canonical = by_key[key]
        return Region(canonical, counties[canonical])
    close = difflib.get_close_matches(key, list(by_key), n=3, cutoff=0.75)
    if close:
        hint = f"did you mean {' or '.join(repr(by_key[c]) for c in close)}?"
    else:
        nearest = difflib.get_close_matches(key, list(by_key), n=3, cutoff=0.0)
        hint = "closest: " + ", ".join(by_key[c] for c in nearest)
    raise RegionError(f"unknown region {name.strip()!r} ({hint}); {_valid_choices()}")


def _fmt(v: float) -> str:
    return format(float(v), ".15g")


def _resolve_bbox(bbox: Sequence[float]) -> Region:
    try:
        vals = [float(v) for v in bbox]
    except (TypeError, ValueError):
        raise RegionError(f"bbox must be 4 numbers W S E N in lon/lat, got {bbox!r}") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise RegionError(f"bbox must be 4 finite numbers W S E N in lon/lat, got {list(bbox)!r}")
    w, s, e, n = vals
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= 90 and -90 <= n <= 90):
        raise RegionError(
            f"bbox {vals} is not lon/lat: need -180<=W,E<=180 and -90<=S,N<=90 (order W S E N)"
        )
    if not (w < e and s < n):
        raise RegionError(f"bbox {vals} is empty or inverted: need W < E and S < N (order W S E N)")
    name = f"bbox({_fmt(w)},{_fmt(s)},{_fmt(e)},{_fmt(n)})"
    return Region(name, shapely.to_wkt(shapely.box(w, s, e, n), rounding_precision=-1))


def _declared_crs(doc: dict[str, Any]) -> str | None:
    """The legacy GeoJSON-2008 `crs` member's name, or None if absent."""
    crs = doc.get("crs")
    if not isinstance(crs, dict):
        return None
    props = crs.get("properties") or {}
    name = props.get("name") or props.get("href")
    return str(name) if name else None


def _geojson_geometries(doc: Any) -> Iterable[dict[str, Any] | None]:
    """Yield raw geometry dicts from a GeoJSON FeatureCollection, Feature or geometry."""
    if not isinstance(doc, dict) or "type" not in doc:
        raise ValueError("not a GeoJSON object (no 'type' member)")
    kind = doc["type"]
    if kind == "FeatureCollection":
        for feat in doc.get("features") or []:
            yield from _geojson_geometries(feat)
    elif kind == "Feature":
        yield doc.get("geometry")
    else:
        yield doc


def _read_with_geopandas(path: Path) -> list[shapely.Geometry]:
    """Read any OGR-readable vector file and reproject it to EPSG:4326."""
    import geopandas as gpd  # heavy import, only needed for non-plain-GeoJSON AOIs

    gdf = gpd.read_file(path)
    if gdf.crs is not None and not gdf.crs.equals("EPSG:4326"):
        gdf = gdf.to_crs("EPSG:4326")
    return [g for g in gdf.geometry if g is not None]


def _resolve_aoi(aoi: str | Path) -> Region:
    path = Path(aoi).expanduser()
    label = f"aoi:{path.name}"
    if not path.is_file():
        raise RegionError(f"AOI file not found: {path}")
    try:
        geoms: list[shapely.Geometry]
        doc = None
        if path.suffix.lower() in _GEOJSON_SUFFIXES:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        crs_name = _declared_crs(doc) if isinstance(doc, dict) else None
        if doc is not None and (crs_name is None or crs_name.casefold() in _CRS84_NAMES):
            geoms = [shape(g) for g in _geojson_geometries(doc) if g]
        else:
            geoms = _read_with_geopandas(path)
    except RegionError:
        raise
    except Exception as exc:  # any parse/driver error becomes one readable line
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise RegionError(f"cannot read AOI {path}: {reason}") from None
    polys = [p for g in geoms for p in _polygons(g)]
    if not polys:
        raise RegionError(f"AOI {path} contains no (non-empty) Polygon or MultiPolygon")
    for p in polys:
        if not p.is_valid:
            raise RegionError(
                f"AOI {path} has an invalid polygon ({explain_validity(p)}); fix it, "
                "e.g. with QGIS 'Fix geometries'"
            )
    geom = shapely.union_all(polys)
    if geom.is_empty or geom.area == 0:
        raise RegionError(f"AOI {path} has an empty (zero-area) geometry")
    w, s, e, n = geom.bounds
    if w < -180 or e > 180 or s < -90 or n > 90:
        raise RegionError(
            f"AOI {path} coordinates {tuple(round(v, 3) for v in geom.bounds)} are not lon/lat; "
            "declare its CRS (a 'crs' member or another vector format) or reproject to EPSG:4326"
        )
    return Region(label, shapely.to_wkt(geom, rounding_precision=-1))


def resolve_region(
    name: str | None = None,
    bbox: Sequence[float] | None = None,
    aoi: str | Path | None = None,
) -> Region:
    """Turn exactly one of a region name, a W S E N lon/lat bbox or an AOI file into a Region.

    Names are case-insensitive: "CA"/"California"/"state" for the state, county names with or
    without " County" ("santa clara", "Santa Clara County").
    """
    given = [k for k, v in (("name", name), ("bbox", bbox), ("aoi", aoi)) if v is not None]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise RegionError(
            f"give exactly one of a region name, --bbox or --aoi (got {what}); {_valid_choices()}"
        )
    if name is not None:
        if not str(name).strip():
            raise RegionError(f"empty region name; {_valid_choices()}")
        return _resolve_name(str(name))
    if bbox is not None:
        if isinstance(bbox, str | bytes):
            raise RegionError(f"bbox must be 4 numbers W S E N in lon/lat, got {bbox!r}")
        return _resolve_bbox(bbox)
    assert aoi is not None
    return _resolve_aoi(aoi)


def check_within(region: Region, coverage: shapely.Geometry, coverage_name: str) -> None:
    """Fail early when a region cannot contain any data of a collection/catalog.

    Searching a region that does not touch the coverage returns zero items, which downstream
    looks like a silent, empty build; an explicit error names both extents instead.
    """
    if coverage is None or coverage.is_empty or not region.geometry.intersects(coverage):
        if coverage is None or coverage.is_empty:
            bounds = "empty"
        else:
            bounds = ", ".join(f"{v:.4f}" for v in coverage.bounds)
        raise RegionError(
            f"region {region.name} lies outside the {coverage_name} coverage ({bounds})"
        )
