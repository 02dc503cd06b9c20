"""STAC search through pystac-client: rustac-served catalog, PC-style paging, retries, errors."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import shapely
from pystac_client import Client

from geoseg.stac.client import StacError, find_inputs, open_client, search_items, search_parts
from geoseg.stac.signing import local_path

STAC_EXAMPLES = Path(__file__).parent / "data" / "stac_examples"
PC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"

WORLD = {
    "type": "Polygon",
    "coordinates": [[[-180, -90], [180, -90], [180, 90], [-180, 90], [-180, -90]]],
}
LAX_BBOX = (-118.45, 33.93, -118.36, 34.01)  # one NAIP quarter quad, five years of items
UTAH_BBOX = (-112.49, 38.07, -112.47, 38.12)  # three of the four COPC tiles
LAX_2022 = "ca_m_3311805_ne_11_060_20220511"


def box(west: float, south: float, east: float, north: float) -> list:
    return [[[west, south], [east, south], [east, north], [west, north], [west, south]]]


def ids(items: list) -> list[str]:
    return sorted(i["id"] if isinstance(i, dict) else i.id for i in items)


# --- the rustac-served catalog -------------------------------------------------------------


def test_pystac_client_bbox_and_datetime(stac_api: str) -> None:
    client = Client.open(stac_api)
    search = client.search(collections=["naip"], bbox=LAX_BBOX, datetime="2016/2018")
    assert ids(list(search.items_as_dicts())) == [
        "ca_m_3311805_ne_11_.6_20160711_20161004",
        "ca_m_3311805_ne_11_060_20180723_20190208",
    ]


def test_search_items_intersects_and_datetime(stac_api: str) -> None:
    client = open_client(stac_api)
    lax = {"type": "Polygon", "coordinates": box(*LAX_BBOX)}
    assert len(list(search_items(client, "naip", lax, None))) == 5
    assert ids(list(search_items(client, "naip", lax, "2022"))) == [LAX_2022]


def test_null_datetime_items_match_by_start_end(stac_api: str) -> None:
    client = open_client(stac_api)
    assert len(list(search_items(client, "3dep-lidar-copc", WORLD, "2020-06-01/2020-06-30"))) == 4
    assert list(search_items(client, "3dep-lidar-copc", WORLD, "2021")) == []


def test_paging_follows_next_links(stac_api: str) -> None:
    client = open_client(stac_api)
    pages = list(client.search(collections=["naip"], intersects=WORLD, limit=3).pages_as_dicts())
    assert [len(p["features"]) for p in pages] == [3, 3, 3, 1]
    items = list(search_items(client, "naip", WORLD, None, limit=3))
    assert len(items) == len(set(ids(items))) == 10


def test_find_inputs_end_to_end(stac_api: str, stac_catalog: Path) -> None:
    area = {"type": "MultiPolygon", "coordinates": [box(*LAX_BBOX), box(*UTAH_BBOX)]}
    imagery, lidar = find_inputs(stac_api, area, "2022")

    assert [i.id for i in imagery] == [LAX_2022]
    assert [i.id[-4:] for i in lidar] == ["7015", "7019", "7020"]
    assert {i.project for i in lidar} == {"UT_StatewideSouth_1_2020"}
    for item in [*imagery, *lidar]:  # relative, absolute and file:// hrefs all became file://
        assert item.href.startswith("file:///")
        path = Path(local_path(item.href))
        assert path.is_file() and path.is_relative_to(stac_catalog)


def test_a_large_area_is_searched_in_strips_and_each_item_kept_once(stac_api: str) -> None:
    """A state is paged as strips side by side (a single cursor would fetch ~480 pages one by
    one); items on a strip edge come back twice and must be kept once."""
    area = {"type": "MultiPolygon", "coordinates": [box(*LAX_BBOX), box(*UTAH_BBOX)]}
    parts = search_parts(area)
    assert len(parts) > 1
    union = shapely.union_all([shapely.geometry.shape(p) for p in parts])
    assert union.symmetric_difference(shapely.geometry.shape(area)).area < 1e-9
    whole = [i["id"] for i in search_items(open_client(stac_api), "3dep-lidar-copc", area, None)]
    _, lidar = find_inputs(stac_api, area, None)
    assert [i.id for i in lidar] == sorted(set(whole))
    county = {"type": "Polygon", "coordinates": box(*LAX_BBOX)}
    assert search_parts(county) == [county]


def test_local_api_bypasses_proxy_settings(stac_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = open_client(stac_api, retries=0)
    assert len(list(search_items(client, "3dep-lidar-copc", WORLD, None))) == 4


def test_find_inputs_lidar_datetime(stac_api: str) -> None:
    area = {"type": "Polygon", "coordinates": box(*UTAH_BBOX)}
    assert find_inputs(stac_api, area, None, lidar_datetime="2019")[1] == []


def test_missing_collection_names_available_ones(stac_api: str) -> None:
    with pytest.raises(StacError) as err:
        find_inputs(stac_api, WORLD, None, lidar_collection="3dep-lidar-hag")
    assert str(err.value) == (
        f"STAC API {stac_api} has no collection '3dep-lidar-hag' (available: 3dep-lidar-copc, naip)"
    )


# --- a fake Planetary Computer: retries, timeouts and token paging ------------------------


@dataclass
class FakeApi:
    """PC lookalike serving the example landing page and search page with local URLs."""

    failures: dict[str, int] = field(default_factory=dict)
    """503 answers to give first, per HTTP method."""
    delay: float = 0.0
    requests: list[tuple[str, int, dict]] = field(default_factory=list)
    """(method, status, JSON body) of every request."""
    url: str = ""

    def page(self, name: str) -> bytes:
        text = (STAC_EXAMPLES / "api" / name).read_text()
        return text.replace(PC_URL, self.url).encode()

    def answer(self, method: str, path: str, body: dict) -> tuple[int, bytes]:
        time.sleep(self.delay)
        if not path.startswith("/api/stac/v1"):
            return 404, b'{"detail": "not found"}'
        if self.failures.get(method, 0) > 0:
            self.failures[method] -= 1
            return 503, b'{"detail": "busy"}'
        if method == "GET":
            return 200, self.page("landing_page.json")
        if "token" not in body:
            return 200, self.page("search_naip_limit10_page1.json")
        last = json.loads((STAC_EXAMPLES / "items/naip" / f"{LAX_2022}.json").read_text())
        page = {"type": "FeatureCollection", "features": [last], "links": []}
        return 200, json.dumps(page).encode()


@contextmanager
def serve_fake(api: FakeApi) -> Iterator[FakeApi]:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            status, payload = api.answer(method, self.path, body)
            api.requests.append((method, status, body))
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

        def do_GET(self) -> None:
            self._reply("GET")

        def do_POST(self) -> None:
            self._reply("POST")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.url = f"http://127.0.0.1:{server.server_port}/api/stac/v1"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()


def test_pc_token_paging_and_post_retry() -> None:
    with serve_fake(FakeApi(failures={"GET": 2, "POST": 1})) as api:
        client = open_client(api.url, retries=3, backoff=0.01)
        items = list(search_items(client, "naip", WORLD, None, limit=10))
    assert len(items) == 11
    statuses = [(m, s) for m, s, _ in api.requests]
    assert statuses[:3] == [("GET", 503), ("GET", 503), ("GET", 200)]
    assert [s for m, s in statuses if m == "POST"] == [503, 200, 200]
    token_body = api.requests[-1][2]
    assert token_body == {
        "limit": 10,
        "collections": ["naip"],
        "token": "next:naip:mt_m_4811501_se_11_060_20231117_20240103",
    }


def test_persistent_503_gives_up_after_bounded_tries() -> None:
    with serve_fake(FakeApi(failures={"GET": 100})) as api:
        started = time.monotonic()
        with pytest.raises(StacError, match=r"unreachable after 3 tries: .*too many 503"):
            open_client(api.url, retries=2, backoff=0.01)
    assert len(api.requests) == 3 and time.monotonic() - started < 5


def test_search_5xx_after_open_is_a_stac_error() -> None:
    with serve_fake(FakeApi()) as api:
        client = open_client(api.url, retries=1, backoff=0.01)
        api.failures["POST"] = 100
        with pytest.raises(StacError, match=r"unreachable after 2 tries"):
            list(search_items(client, "naip", WORLD, None))


def test_timeouts_are_retried_then_reported() -> None:
    expected = r"unreachable after 2 tries: Read timed out"
    with serve_fake(FakeApi(delay=0.5)) as api, pytest.raises(StacError, match=expected):
        open_client(api.url, timeout=0.1, retries=1, backoff=0.01)


def test_unreachable_api_fails_fast() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(StacError, match=rf"^STAC API {url} unreachable after 3 tries: .*refused"):
        open_client(url, retries=2, backoff=0.01)
    assert time.monotonic() - started < 5


def test_client_errors_are_not_retried() -> None:
    expected = r"/nowhere answered HTTP 404 while opening: .*not found"
    with serve_fake(FakeApi()) as api, pytest.raises(StacError, match=expected):
        open_client(api.url.replace("/api/stac/v1", "/nowhere"))
    assert len(api.requests) == 1
