"""Search a STAC API (Planetary Computer, any compatible API, or the local sample server).

Every failure leaves this module as a one-line `StacError`: the CLI shows it as is, so a flaky
network or a wrong `--stac-url` reads as a sentence, not a requests/urllib3 traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC
from datetime import datetime as Datetime
from itertools import pairwise
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pystac
import shapely
from pystac_client import Client
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO
from pystac_client.warnings import DoesNotConformTo
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from geoseg.stac.errors import StacError
from geoseg.stac.items import ImageryItem, PointCloudItem, parse_imagery, parse_pointcloud

__all__ = [
    "PLANETARY_COMPUTER_URL",
    "StacError",
    "check_datetime",
    "find_inputs",
    "open_client",
    "search_items",
]

PLANETARY_COMPUTER_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"

RETRY_STATUSES = (429, 500, 502, 503, 504)
"""Transient answers: rate limiting and gateway/backend hiccups (PC returns all of these)."""
RETRY_AFTER_MAX = 60.0
"""Cap on a server's Retry-After so a misbehaving API cannot stall a build for hours."""
MAX_LISTED_COLLECTIONS = 20
PAGE_SIZE = 1000
"""Items per search page: Planetary Computer's largest; fewer round trips for 10^5 items."""
SEARCH_THREADS = 4
"""Searches paged at once over a large area. A state holds ~475 k LiDAR items, ~480 pages that
one search cursor can only fetch one after the other (each costs the API seconds); the area is
cut into strips searched side by side, and items on a strip edge are kept once."""
SPLIT_AREA_DEG2 = 2.0
"""Areas whose bounding box is smaller (a county) are searched whole."""
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_DATETIME = re.compile(
    r"\d{4}(-\d{2}(-\d{2}([Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?)?)?)?"
)
"""What pystac-client expands into a search interval: a year, month, day or RFC 3339 instant."""


def check_datetime(value: str) -> None:
    """Raise ValueError (one line) unless `value` is a date or a START/END range STAC accepts.

    pystac-client only checks the text when the search is sent, and then fails with a long
    traceback; builds call this first, before anything is searched or written.
    """
    parts = value.split("/")
    if len(parts) > 2:
        raise ValueError(f"{value!r} has more than one '/'")
    starts = []
    for part in parts:
        if len(parts) == 2 and part in ("", ".."):
            continue  # an open end
        if not _DATETIME.fullmatch(part):
            raise ValueError(
                f"{part!r} is not a date: use YYYY, YYYY-MM, YYYY-MM-DD or an RFC 3339 time, "
                "and START/END for a range (.. for an open end)"
            )
        padded = part + "-01-01"[len(part) - 4 :] if len(part) < 10 else part
        try:
            start = Datetime.fromisoformat(padded.replace("z", "Z"))
        except ValueError as err:
            raise ValueError(f"{part!r} is not a valid date ({err})") from None
        starts.append(start if start.tzinfo else start.replace(tzinfo=UTC))
    if len(parts) == 2 and all(p in ("", "..") for p in parts):
        raise ValueError(f"{value!r} is open at both ends")
    if len(starts) == 2 and starts[0] > starts[1]:
        raise ValueError(f"{value!r} ends before it starts")


def open_client(
    url: str, *, timeout: float = 30.0, retries: int = 4, backoff: float = 0.5
) -> Client:
    """Open a STAC API with bounded retries and exponential backoff on every request.

    Retries cover connection errors, timeouts and `RETRY_STATUSES`, for GET and for POST (item
    search is a read, so re-sending it is safe). urllib3 waits 0, 2·backoff, 4·backoff, ... s.
    """
    retry = Retry(
        total=retries,
        backoff_factor=backoff,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "HEAD", "POST"}),
        retry_after_max=RETRY_AFTER_MAX,
    )
    stac_io = StacApiIO(timeout=timeout, max_retries=retry)
    if urlparse(url).hostname in _LOOPBACK_HOSTS:
        stac_io.session.trust_env = False  # a local API (the sample) must not go via HTTP_PROXY
    with _api_errors(url, retries + 1, "opening"):
        try:
            # Client.open re-applies its own `timeout` (default None) to a passed-in stac_io.
            return Client.open(url, stac_io=stac_io, timeout=timeout)
        except (ValueError, KeyError, pystac.STACTypeError) as err:
            raise StacError(f"{url} does not look like a STAC API: {_one_line(err)}") from err


def search_items(
    client: Client,
    collection: str,
    intersects: dict[str, Any],
    datetime: str | None,
    limit: int = PAGE_SIZE,
) -> Iterator[dict[str, Any]]:
    """Every item of `collection` intersecting a GeoJSON geometry, as plain dicts, page by page.

    pystac-client follows `rel=next` links, including PC's POST links whose body carries the
    paging token; `limit` is only the page size. A generator: a state-wide search returns
    hundreds of thousands of items (gigabytes of JSON), which callers reduce as they arrive.
    """
    url = client.self_href
    try:
        search = client.search(
            method="POST",
            collections=[collection],
            intersects=intersects,
            datetime=datetime,
            limit=limit,
        )
    except DoesNotConformTo as err:
        raise StacError(f"STAC API {url} does not offer item search") from err
    with _api_errors(url, _tries(client), f"searching {collection!r}"):
        yield from search.items_as_dicts()


def find_inputs(
    stac_url: str,
    intersects: dict[str, Any],
    datetime: str | None,
    imagery_collection: str = "naip",
    lidar_collection: str = "3dep-lidar-copc",
    *,
    lidar_datetime: str | None = None,
) -> tuple[list[ImageryItem], list[PointCloudItem]]:
    """Imagery and point-cloud items over `intersects`, sorted by id for reproducible builds.

    `datetime` filters the imagery only: LiDAR projects are flown in other years than NAIP, and
    the builder chooses the project per tile; pass `lidar_datetime` to filter LiDAR too.
    """
    client = open_client(stac_url)
    _require_collections(client, [imagery_collection, lidar_collection])
    parts = search_parts(intersects)
    searches: list[tuple[str, str | None, Callable, dict[str, Any]]] = [
        (imagery_collection, datetime, parse_imagery, part) for part in parts
    ] + [(lidar_collection, lidar_datetime, parse_pointcloud, part) for part in parts]

    def run(search: tuple[str, str | None, Callable, dict[str, Any]]) -> list:
        collection, when, parse, part = search
        own = open_client(stac_url)  # a session per thread: requests' are not thread-safe
        return [parse(item) for item in search_items(own, collection, part, when)]

    with ThreadPoolExecutor(min(SEARCH_THREADS, len(searches))) as pool:
        found = list(pool.map(run, searches))
    imagery = {i.id: i for part in found[: len(parts)] for i in part}
    lidar = {i.id: i for part in found[len(parts) :] for i in part}
    return [imagery[k] for k in sorted(imagery)], [lidar[k] for k in sorted(lidar)]


def search_parts(intersects: dict[str, Any], count: int = 2 * SEARCH_THREADS) -> list[dict]:
    """`intersects` whole, or cut into `count` north-south strips when its box is large."""
    geometry = shapely.geometry.shape(intersects)
    west, south, east, north = geometry.bounds
    if (east - west) * (north - south) < SPLIT_AREA_DEG2:
        return [intersects]
    edges = np.linspace(west, east, count + 1)
    strips = [shapely.box(a, south, b, north) for a, b in pairwise(edges)]
    cut = [shapely.intersection(geometry, strip) for strip in strips]
    return [shapely.geometry.mapping(part) for part in cut if part.area > 0]


def _require_collections(client: Client, ids: list[str]) -> None:
    url = client.self_href
    with _api_errors(url, _tries(client), "listing collections"):
        missing = [cid for cid in ids if client.get_collection(cid) is None]
        if not missing:
            return
        available = sorted(c.id for c in client.get_collections())
    shown = ", ".join(available[:MAX_LISTED_COLLECTIONS]) or "none"
    if len(available) > MAX_LISTED_COLLECTIONS:
        shown += f", ... ({len(available) - MAX_LISTED_COLLECTIONS} more)"
    raise StacError(
        f"STAC API {url} has no collection {', '.join(map(repr, missing))} (available: {shown})"
    )


def _tries(client: Client) -> int:
    """How many attempts the client's retry policy allows, for error messages."""
    stac_io = client._stac_io
    adapter = stac_io.session.get_adapter(client.self_href) if stac_io else None
    retry = getattr(adapter, "max_retries", None)
    return (retry.total or 0) + 1 if isinstance(retry, Retry) else 1


@contextmanager
def _api_errors(url: str, tries: int, doing: str) -> Iterator[None]:
    """Turn pystac-client's APIError into a one-line StacError naming the API."""
    try:
        yield
    except APIError as err:
        status = getattr(err, "status_code", None)
        if status is not None:
            body = " ".join(str(err).split())
            detail = f": {_one_line(err)}" if body else ""
            raise StacError(f"STAC API {url} answered HTTP {status} while {doing}{detail}") from err
        raise StacError(f"STAC API {url} unreachable after {tries} tries: {_reason(err)}") from err


def _reason(err: BaseException) -> str:
    """The root cause urllib3 gave up on, without the connection-pool boilerplate."""
    cause: BaseException | None = err
    while cause is not None:
        for arg in getattr(cause, "args", ()):
            if isinstance(arg, MaxRetryError) and arg.reason is not None:
                return _one_line(re.sub(r"^\S*Connection\S*\(.*?\): ", "", str(arg.reason)))
        cause = cause.__cause__ or cause.__context__
    return _one_line(err)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
