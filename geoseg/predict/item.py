"""The STAC Item written beside a class map (`<out>.json`), in the dataset's STAC dialect.

Items come from pystac, like the build's tile items, so a prediction and the tiles it was trained
on share the STAC version and extension versions. Its time is the scene's acquisition time, not
the time of the run: the first of a date given by the user, a STAC item beside the scene (a geoseg
tile's `tile.json` or an item whose asset is the scene), GDAL's IMAGERY metadata, or a date in the
file name (NAIP's `_YYYYMMDD`, or a trailing `_YYYY` year as an interval). Only when none of these
exists is the file's modification time used, and `geoseg:datetime_source` says so.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pystac
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from rasterio.io import DatasetReader
from rasterio.warp import transform_geom
from shapely.geometry import box, mapping, shape

from geoseg.predict.errors import PredictError

_DAY = re.compile(r"(?<!\d)((?:19|20)\d{2})(\d{2})(\d{2})(?!\d)")
_YEAR = re.compile(r"_((?:19|20)\d{2})$")

SceneTime = tuple[datetime | None, datetime | None, datetime | None, str]
"""(datetime, start_datetime, end_datetime, where it came from): an instant or an interval."""


def parse_when(text: str) -> datetime:
    """An ISO date or time as an aware UTC datetime (`--datetime`); PredictError otherwise."""
    try:
        when = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise PredictError(f"--datetime {text!r} is not an ISO date, e.g. 2022-06-01") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def scene_time(image: Path, src: DatasetReader, given: str | None = None) -> SceneTime:
    """When the scene was acquired, and from which source that is known (see module doc)."""
    if given is not None:
        return parse_when(given), None, None, "--datetime"
    sidecar = _sidecar_time(image)
    if sidecar is not None:
        return sidecar, None, None, "STAC item beside the scene"
    tagged = src.tags(ns="IMAGERY").get("ACQUISITIONDATETIME")
    if tagged:
        try:
            return parse_when(tagged), None, None, "GDAL IMAGERY ACQUISITIONDATETIME"
        except PredictError:
            pass
    day = _DAY.search(image.stem)
    if day is not None:
        try:
            when = datetime(*map(int, day.groups()), tzinfo=UTC)
            return when, None, None, "date in the file name"
        except ValueError:
            pass
    year = _YEAR.search(image.stem)
    if year is not None:
        y = int(year.group(1))
        start = datetime(y, 1, 1, tzinfo=UTC)
        end = datetime(y, 12, 31, 23, 59, 59, tzinfo=UTC)
        return None, start, end, "year in the file name"
    mtime = datetime.fromtimestamp(image.stat().st_mtime, UTC).replace(microsecond=0)
    return mtime, None, None, "file modification time (the scene carries no date)"


def _sidecar_time(image: Path) -> datetime | None:
    """The datetime of a STAC item (or geoseg tile manifest) next to the scene that is about it."""
    for path in sorted(image.parent.glob("*.json")):
        if path.stat().st_size > 1 << 20:
            continue  # an item is small; a big JSON is something else
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict):
            continue
        if path.name == "tile.json" and image.name == "image.tif" and doc.get("datetime"):
            when = doc["datetime"]  # a geoseg tile: its manifest has the scene's time
        elif doc.get("type") == "Feature" and _names_asset(doc, image.name):
            when = (doc.get("properties") or {}).get("datetime")
        else:
            continue
        if when:
            try:
                return parse_when(when)
            except PredictError:
                continue
    return None


def _names_asset(item: dict[str, Any], name: str) -> bool:
    assets = item.get("assets") or {}
    return any(
        isinstance(a, dict) and str(a.get("href", "")).rsplit("/", 1)[-1] == name
        for a in assets.values()
    )


def prediction_item(
    out: Path,
    src: DatasetReader,
    contract: dict[str, Any],
    when: SceneTime,
    properties: dict[str, Any],
) -> dict[str, Any]:
    """STAC Item of the class map `out`: footprint, projection, classes, scene time."""
    footprint = transform_geom(src.crs, "EPSG:4326", mapping(box(*src.bounds)))
    instant, start, end, source = when
    item = pystac.Item(
        id=out.stem,
        geometry=footprint,
        bbox=list(shape(footprint).bounds),
        datetime=instant,
        start_datetime=start,
        end_datetime=end,
        properties={**properties, "geoseg:datetime_source": source},
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.epsg = src.crs.to_epsg()
    if proj.epsg is None:
        proj.wkt2 = src.crs.to_wkt()
    proj.shape = [src.height, src.width]
    proj.transform = list(src.transform)[:6]
    asset = pystac.Asset(f"./{out.name}", media_type=pystac.MediaType.COG, roles=["data"])
    item.add_asset("classification", asset)
    ClassificationExtension.add_to(item)
    ClassificationExtension.ext(asset).classes = [
        Classification.create(
            value=value,
            name=name,
            color_hint="{:02X}{:02X}{:02X}".format(*color[:3]),
            nodata=True if value == 0 else None,
        )
        for value, (name, color) in enumerate(
            zip(contract["class_names"], contract["class_colors"], strict=True)
        )
    ]
    return item.to_dict(include_self_link=False, transform_hrefs=False)
