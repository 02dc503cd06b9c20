"""Typed views of the STAC items the builder consumes, tolerant of Planetary Computer's quirks.

Quirks handled (all observed in PC responses, see tests/data/stac_examples):
`naip:year` is a string; 3DEP lidar items have `datetime: null` with `start/end_datetime`,
`proj:epsg: null` and the CRS only in `proj:projjson` (a CompoundCRS with a vertical part that may
be in US survey feet); COPC items carry a 3-D bbox.

These records are small, frozen and picklable: they travel inside dask tasks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from pyproj import CRS
from pyproj.exceptions import CRSError
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from geoseg.stac.errors import StacError


@dataclass(frozen=True)
class ImageryItem:
    """One NAIP scene: a 4-band (R, G, B, NIR) COG in a projected (UTM) CRS."""

    id: str
    collection: str
    href: str
    """Unsigned asset href (`image`); sign just before reading."""
    crs_wkt: str
    epsg: int | None
    bbox: tuple[float, float, float, float]
    """lon/lat bbox (W, S, E, N)."""
    footprint_wkt: str
    """Item geometry in lon/lat as WKT."""
    datetime: datetime
    year: int
    gsd: float | None
    band_count: int
    """Bands in the asset (NAIP: 4; some early acquisitions: 3 -> NIR missing)."""


@dataclass(frozen=True)
class PointCloudItem:
    """One 3DEP COPC tile of one acquisition project."""

    id: str
    collection: str
    href: str
    """Unsigned asset href (`data`); sign just before reading."""
    crs_wkt: str | None
    """Full (usually compound horizontal + vertical) CRS; None when the item has none."""
    bbox: tuple[float, float, float, float]
    """lon/lat bbox (W, S, E, N), the 3-D STAC bbox reduced to 2-D."""
    footprint_wkt: str
    start: datetime | None
    end: datetime | None
    project: str
    """`3dep:usgs_id` (acquisition project); the builder never mixes projects inside a tile."""
    count: int | None


NAIP_DEFAULT_BANDS = 4
"""NAIP's RGBIR COGs; used when an item lists no bands at all."""

# Asset-level projection fields override item-level ones (projection extension), and the full
# definitions come first: PC's lidar items carry `proj:epsg: null` plus a compound `proj:projjson`.
_CRS_KEYS = ("proj:wkt2", "proj:projjson", "proj:code", "proj:epsg")


IMAGERY_ASSET = "image"
POINTCLOUD_ASSET = "data"


def parse_imagery(item: dict[str, Any]) -> ImageryItem:
    """Build an `ImageryItem` from a STAC item dict (as served by PC or any compatible API)."""
    props = item.get("properties") or {}
    asset = _asset(item, IMAGERY_ASSET)
    crs = _crs(item, asset)
    if crs is None:
        raise StacError(f"imagery item {_name(item)} has no CRS (proj:epsg/code/wkt2/projjson)")
    crs_wkt, epsg = crs
    when = _parse_datetime(item, props.get("datetime") or props.get("start_datetime"), "datetime")
    if when is None:
        raise StacError(f"imagery item {_name(item)} has neither datetime nor start_datetime")
    gsd = props.get("gsd", asset.get("gsd"))
    return ImageryItem(
        id=item["id"],
        collection=item.get("collection") or "",
        href=asset["href"],
        crs_wkt=crs_wkt,
        epsg=epsg,
        bbox=_bbox(item),
        footprint_wkt=_footprint(item),
        datetime=when,
        year=_year(props.get("naip:year"), when),
        gsd=float(gsd) if gsd is not None else None,
        band_count=_band_count(asset, props),
    )


def parse_pointcloud(item: dict[str, Any]) -> PointCloudItem:
    """Build a `PointCloudItem` from a STAC item dict of a COPC collection."""
    props = item.get("properties") or {}
    asset = _asset(item, POINTCLOUD_ASSET)
    crs = _crs(item, asset)
    instant = _parse_datetime(item, props.get("datetime"), "datetime")
    start = _parse_datetime(item, props.get("start_datetime"), "start_datetime") or instant
    end = _parse_datetime(item, props.get("end_datetime"), "end_datetime") or instant
    count = props.get("pc:count")
    return PointCloudItem(
        id=item["id"],
        collection=item.get("collection") or "",
        href=asset["href"],
        crs_wkt=crs[0] if crs is not None else None,
        bbox=_bbox(item),
        footprint_wkt=_footprint(item),
        start=start,
        end=end,
        # USGS tile ids are `<workunit>_<tile>`; the work unit is the best stand-in for a project.
        project=props.get("3dep:usgs_id") or item["id"].rsplit("_", 1)[0],
        count=int(count) if count is not None else None,
    )


def _name(item: Mapping[str, Any]) -> str:
    return f"{item.get('collection') or '?'}/{item.get('id', '?')}"


def _asset(item: Mapping[str, Any], key: str) -> dict[str, Any]:
    assets = item.get("assets") or {}
    asset = assets.get(key)
    if not asset or not asset.get("href"):
        have = ", ".join(sorted(assets)) or "none"
        raise StacError(f"item {_name(item)} has no '{key}' asset with an href (assets: {have})")
    return asset


def _crs(item: Mapping[str, Any], asset: Mapping[str, Any]) -> tuple[str, int | None] | None:
    """(WKT, EPSG code or None) of the item's CRS, or None when it declares none."""
    props = item.get("properties") or {}
    for source in (asset, props):
        for key in _CRS_KEYS:
            value = source.get(key)
            if value is None:
                continue
            text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
            try:
                return _parse_crs(key, text)
            except CRSError as err:
                raise StacError(f"item {_name(item)} has an unusable {key}: {err}") from None
    return None


@lru_cache(maxsize=4096)
def _parse_crs(key: str, text: str) -> tuple[str, int | None]:
    """Parse a CRS once per distinct definition: a state-wide search returns 10^5 COPC items
    sharing a few dozen projects' CRSs, and parsing one costs about a millisecond. The WKT
    string is shared by every item of that CRS, which keeps the items small in memory."""
    value = json.loads(text) if text.startswith("{") else text
    crs = CRS.from_user_input(f"EPSG:{value}" if key == "proj:epsg" else value)
    return crs.to_wkt(), crs.to_epsg()


def _parse_datetime(item: Mapping[str, Any], value: str | None, key: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except (TypeError, ValueError) as err:
        raise StacError(f"item {_name(item)} has an invalid {key}: {value!r}") from err
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _year(naip_year: str | int | None, when: datetime) -> int:
    """PC serves `naip:year` as a string; the acquisition date is the fallback."""
    try:
        return int(naip_year)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return when.year


def _band_count(asset: Mapping[str, Any], props: Mapping[str, Any]) -> int:
    for source in (asset, props):
        for key in ("eo:bands", "bands"):  # STAC 1.0 eo extension, STAC 1.1 common `bands`
            bands = source.get(key)
            if bands:
                return len(bands)
    return NAIP_DEFAULT_BANDS


def _bbox(item: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """2-D lon/lat bbox; COPC items carry 6 numbers (W, S, zmin, E, N, zmax)."""
    bbox = item.get("bbox")
    if bbox is None:
        bbox = _geometry(item).bounds
    if len(bbox) == 6:
        bbox = [bbox[0], bbox[1], bbox[3], bbox[4]]
    if len(bbox) != 4:
        raise StacError(f"item {_name(item)} has a bbox of {len(bbox)} numbers (want 4 or 6)")
    west, south, east, north = (float(v) for v in bbox)
    return west, south, east, north


def _geometry(item: Mapping[str, Any]) -> BaseGeometry:
    geometry = item.get("geometry")
    if not geometry:
        raise StacError(f"item {_name(item)} has no geometry")
    return shape(geometry)


def _footprint(item: Mapping[str, Any]) -> str:
    return _geometry(item).wkt
