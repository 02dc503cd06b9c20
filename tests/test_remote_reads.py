"""Asset reads over HTTP against a real range server (its own process) that injects faults.

Each fault the issue lists gets a test on both readers: the COPC side (`RangeFile` under
laspy) and the COG side (GDAL /vsicurl/ under `read_with_retries`). Every read must return the
bytes of the local file, and the server's request log must show the fault happened and that no
read downloaded the whole file.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import laspy
import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from geoseg.builder.points import read_tile_points
from geoseg.stac.items import PointCloudItem
from geoseg.stac.remote import AssetReadError, RangeFile, read_with_retries
from geoseg.stac.retry import RetryPolicy
from geoseg.stac.server import sample_catalog_dir
from geoseg.stac.signing import NoSigner
from tests.fault_server import Server, TokenSigner, serve

ASSETS = sample_catalog_dir() / "assets"
COG = "naip/fr_lambert93_0484_6633_050_2024.tif"  # 925 kB, 256 px blocks
COPC = "3dep-lidar-copc/FR_L93_LPC_2024_0484_6633.copc.laz"  # 3.5 MB
FAST = RetryPolicy(tries=6, budget_s=30, base_delay_s=0.05, max_delay_s=0.2, timeout_s=5)
WINDOW = Window(300, 300, 64, 64)


def read_window(path: str) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(window=WINDOW)


def served(server: Server, path: str) -> list[dict]:
    return [r for r in server.requests() if r["path"] == f"/{path}"]


def bytes_served(server: Server, path: str) -> int:
    return sum(r["sent"] for r in served(server, path))


@pytest.fixture
def local() -> dict[str, np.ndarray]:
    bounds = laspy.copc.Bounds(np.array([484800.0, 6632850.0]), np.array([484840.0, 6632890.0]))
    with laspy.CopcReader.open(ASSETS / COPC) as reader:
        points = reader.query(bounds=bounds)
    assert len(points) > 1000
    return {
        "image": read_window(str(ASSETS / COG)),
        "points": np.asarray(points.X),
        "bounds": bounds,
    }


def read_both(server: Server, local: dict, signer=None, policy: RetryPolicy = FAST) -> None:
    """Read the COPC box and the COG window over HTTP; both must equal the local reads."""
    signer = signer or NoSigner()
    with laspy.CopcReader(RangeFile(f"{server.url}/{COPC}", signer, policy)) as reader:
        points = reader.query(bounds=local["bounds"])
    np.testing.assert_array_equal(np.asarray(points.X), local["points"])
    image = read_with_retries(f"{server.url}/{COG}", signer, read_window, policy)
    np.testing.assert_array_equal(image, local["image"])
    for path in (COG, COPC):  # a window, never the whole file
        size = (ASSETS / path).stat().st_size
        assert 0 < bytes_served(server, path) < size / 3, path


def test_clean_reads_fetch_only_what_a_window_needs(tmp_path: Path, local: dict):
    with serve(ASSETS, tmp_path) as server:
        read_both(server, local)
        assert {r["status"] for r in server.requests()} == {200, 206}  # 200: GDAL's HEAD


def refusals_and_retries(server: Server) -> list[tuple[dict, dict]]:
    """Each 429/503 answer with the next request for the same file."""
    log = server.requests()
    return [
        (r, next(later for later in log[i + 1 :] if later["path"] == r["path"]))
        for i, r in enumerate(log)
        if r["status"] in (429, 503)
    ]


def test_copc_reads_wait_as_long_as_retry_after_says(tmp_path: Path, local: dict):
    with serve(ASSETS, tmp_path, "--first-503", "--every-429", "3", "--retry-after", "2") as srv:
        with laspy.CopcReader(RangeFile(f"{srv.url}/{COPC}", NoSigner(), FAST)) as reader:
            points = reader.query(bounds=local["bounds"])
        pairs = refusals_and_retries(srv)
    np.testing.assert_array_equal(np.asarray(points.X), local["points"])
    assert {r["status"] for r, _ in pairs} == {429, 503}
    for refused, retry in pairs:  # FAST's own backoff is at most 0.2 s: the header decided
        assert retry["t"] - refused["t"] >= 1.95, (refused, retry)


def test_cog_reads_retry_503_and_429_after_the_base_delay(tmp_path: Path, local: dict):
    """GDAL 3.10 retries without reading Retry-After: its first wait is the policy's base delay
    (1 s, the usual Retry-After of cloud stores), then 2-2.5 times longer each time."""
    policy = replace(FAST, base_delay_s=1.0)
    with serve(ASSETS, tmp_path, "--first-503", "--every-429", "3", "--retry-after", "1") as srv:
        image = read_with_retries(f"{srv.url}/{COG}", NoSigner(), read_window, policy)
        pairs = refusals_and_retries(srv)
    np.testing.assert_array_equal(image, local["image"])
    assert {r["status"] for r, _ in pairs} == {429, 503}
    for refused, retry in pairs:
        assert retry["t"] - refused["t"] >= 0.95, (refused, retry)


def test_an_expired_token_is_re_signed_mid_read(tmp_path: Path, local: dict):
    """A token serves 5 requests (a SAS token's 45 minutes, shortened): it runs out inside the
    COPC query, and inside the COG window read once only 2 of its requests are left."""
    with serve(ASSETS, tmp_path, "--token-uses", "5") as server:
        signer = TokenSigner()
        with laspy.CopcReader(RangeFile(f"{server.url}/{COPC}", signer, FAST)) as reader:
            points = reader.query(bounds=local["bounds"])
        np.testing.assert_array_equal(np.asarray(points.X), local["points"])
        signer.sign(server.url, refresh=True)
        burn = RangeFile(f"{server.url}/{COG}", signer, FAST)
        for _ in range(3):
            burn.fetch(0, 1)
        image = read_with_retries(f"{server.url}/{COG}", signer, read_window, FAST)
        np.testing.assert_array_equal(image, local["image"])
        log = server.requests()
    expired = {r["path"] for r in log if r["status"] == 403}
    assert expired == {f"/{COG}", f"/{COPC}"}
    assert sum(r["path"] == "/sign" for r in log) >= 4  # renewed inside both reads


def test_a_connection_dropped_mid_body_is_read_again(tmp_path: Path, local: dict):
    with serve(ASSETS, tmp_path, "--drop-get", "2") as server:
        read_both(server, local)
        dropped = [r for r in server.requests() if r.get("dropped")]
    assert {r["path"] for r in dropped} == {f"/{COG}", f"/{COPC}"}


def test_a_response_slower_than_the_timeout_is_retried(tmp_path: Path, local: dict):
    policy = replace(FAST, timeout_s=1.0)
    t0 = time.monotonic()
    with serve(ASSETS, tmp_path, "--slow-first-get", "4") as server:
        read_both(server, local, policy=policy)
    assert time.monotonic() - t0 < 7  # two timeouts of 1 s, not two waits of 4 s


def test_a_store_that_stays_down_fails_in_one_line_within_the_budget(tmp_path: Path):
    with serve(ASSETS, tmp_path, "--broken", COG, "--broken", COPC, "--retry-after", "0") as srv:
        for read in (
            lambda: read_with_retries(f"{srv.url}/{COG}", NoSigner(), read_window, FAST),
            lambda: RangeFile(f"{srv.url}/{COPC}", NoSigner(), FAST).read(100),
        ):
            with pytest.raises(AssetReadError) as err:
                read()
            message = str(err.value)
            assert "\n" not in message and "gave up after 6 tries" in message, message
            assert "HTTP 503" in message
    tight = replace(FAST, budget_s=0.5)
    with (
        serve(ASSETS, tmp_path / "slow", "--broken", COG, "--retry-after", "1") as slow,
        pytest.raises(AssetReadError, match=r"out of its 0\.5 s retry budget"),
    ):
        RangeFile(f"{slow.url}/{COG}", NoSigner(), tight).read(100)


def test_forbidden_even_after_re_signing_and_not_found_are_not_retried(tmp_path: Path):
    with serve(ASSETS, tmp_path, "--token-uses", "1") as server:
        with pytest.raises(AssetReadError, match="HTTP 403 even with a fresh signature"):
            RangeFile(f"{server.url}/{COG}", NoSigner(), FAST).read(10)  # never signs
        with pytest.raises(AssetReadError, match="HTTP 404"):
            RangeFile(f"{server.url}/naip/missing.tif", TokenSigner(), FAST).read(10)
        assert [r["status"] for r in server.requests()] == [403, 403, 200, 404]  # 200: /sign


def test_a_server_that_ignores_ranges_is_not_used_to_download_whole_files(tmp_path: Path):
    with (
        serve(ASSETS, tmp_path, "--ignore-ranges") as server,
        pytest.raises(AssetReadError, match="ignores byte ranges"),
    ):
        RangeFile(f"{server.url}/{COPC}", NoSigner(), FAST).read(100)


def test_tile_points_over_http_equal_the_local_ones(tmp_path: Path):
    """The builder's point reader on a remote COPC: same points, a fraction of the file."""
    from geoseg.builder.grid import TileSpec

    with laspy.CopcReader.open(ASSETS / COPC) as reader:
        crs = reader.header.parse_crs()
    tile = TileSpec(crs.to_wkt(), 2154, 484810 // 32, 6632860 // 32, 0.5, 64)  # 32 m, dense
    item = PointCloudItem("fr", "3dep-lidar-copc", str(ASSETS / COPC), crs.to_wkt(),
                          (0, 0, 1, 1), "POINT (0 0)", None, None, "FR", None)  # fmt: skip
    expected = read_tile_points(tile, [item], NoSigner())
    assert len(expected) > 1000
    with serve(ASSETS, tmp_path, "--every-429", "3", "--retry-after", "0") as server:
        remote = replace(item, href=f"{server.url}/{COPC}")
        got = read_tile_points(tile, [remote], NoSigner(), FAST)
        assert bytes_served(server, COPC) < (ASSETS / COPC).stat().st_size / 3
    for key, values in expected.arrays.items():
        np.testing.assert_array_equal(got.arrays[key], values, key)
