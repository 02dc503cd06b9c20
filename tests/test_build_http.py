"""Builds whose assets are http:// URLs on a flaky range server, found through `rustac serve`.

The issue's scenario first: the sample's Teakettle plots served by a store that answers each
file's first request with 503 (Retry-After: 1) and every 9th request with 429. Before the read
layer this built 1 tile and failed 65; it must now build every tile, byte-identical to the
offline (file://) build. Then the other faults (expiring tokens, dropped bodies, stalls) and a
store that stays down past the retry budget: those tiles fail with a one-line reason, and a
rerun against the recovered store finishes them.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from geoseg.stac.server import sample_catalog_dir, serve_catalog
from tests.fault_server import serve
from tests.utils import checksums, geoseg

pytestmark = pytest.mark.slow

BBOX = ("--bbox", "-119.017", "36.997", "-119.000", "37.008")  # the issue's command
SMALL = ("--bbox", "-119.0115", "36.9990", "-119.0075", "37.0035")  # 3 of the Teakettle plots
GRID = ("--gsd", "0.5", "--tile-size", "64", "--workers", "2", "--no-progress")
ASSETS = sample_catalog_dir() / "assets"


def http_catalog(root: Path, base_url: str) -> Path:
    """A copy of the sample catalog whose asset hrefs are URLs on `base_url`."""
    shutil.copytree(sample_catalog_dir(), root, ignore=shutil.ignore_patterns("assets"))
    for path in (root / "items").glob("*.json"):
        doc = json.loads(path.read_text())
        for feature in doc["features"]:
            for asset in feature["assets"].values():
                asset["href"] = asset["href"].replace("../assets", base_url)
        path.write_text(json.dumps(doc))
    return root


def build_over_http(tmp: Path, out: Path, faults: tuple[str, ...], *args: str):
    """Serve the assets with `faults`, the items with rustac, and build; (result, request log)."""
    with serve(ASSETS, tmp / "server", *faults) as server:
        catalog = http_catalog(tmp / "catalog", server.url)
        with serve_catalog(catalog) as url:
            res = geoseg("build-dataset", "--stac-url", url, *args, *GRID, "--out", str(out))
        return res, server.requests()


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Checksums of the same tiles built from file:// assets."""
    out = tmp_path_factory.mktemp("offline") / "out"
    res = geoseg("build-dataset", "--catalog", "sample", *BBOX, *GRID, "--out", str(out))
    assert res.returncode == 0, res.stderr
    return checksums(out)


def test_the_issue_scenario_builds_every_tile_like_the_offline_build(
    tmp_path: Path, offline: dict[str, str]
):
    out = tmp_path / "out"
    faults = ("--first-503", "--every-429", "9", "--retry-after", "1")
    res, log = build_over_http(tmp_path, out, faults, *BBOX)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["tiles"]["failed"] == 0
    assert checksums(out) == offline  # same tiles, same bytes
    statuses = Counter(r["status"] for r in log)
    assert statuses[503] >= 20 and statuses[429] >= 10  # the faults really happened
    for r in log:  # only windows and octree nodes: no request fetched a whole file
        assert r["sent"] < r.get("size", 1) or r["sent"] < 64 * 1024, r


def test_expiring_tokens_dropped_bodies_and_stalls(tmp_path: Path, offline: dict[str, str]):
    out = tmp_path / "out"
    faults = ("--token-uses", "6", "--drop-get", "2", "--slow-first-get", "3")
    signer = ("--signer", "tests.fault_server:TokenSigner", "--read-timeout", "1")
    res, log = build_over_http(tmp_path, out, faults, *SMALL, *signer)
    assert res.returncode == 0, res.stderr
    built = checksums(out)
    assert len(built) >= 6 * 5 and built == {k: offline[k] for k in built}
    assert sum(r["status"] == 403 for r in log) >= 5  # tokens expired mid-build, were renewed
    assert any(r.get("dropped") for r in log)


def test_a_store_down_past_the_budget_fails_its_tiles_and_a_rerun_finishes(
    tmp_path: Path, offline: dict[str, str]
):
    out = tmp_path / "out"
    down = ("--broken", "naip/ca_teak_044_010_2017.tif", "--retry-after", "0")
    budget = ("--read-tries", "2", "--read-budget", "5")
    res, _ = build_over_http(tmp_path / "first", out, down, *SMALL, *budget)
    assert res.returncode == 1
    report = json.loads((out / "report.json").read_text())
    failed = report["failed"]
    assert failed and report["tiles"]["built"] > 0
    for tile in failed:
        reason = tile["reason"]
        assert "\n" not in reason and reason.startswith("imagery ca_teak_044_010_2017: unreadable")
        assert "gave up after 2 tries" in reason and "HTTP 503" in reason
    res, _ = build_over_http(tmp_path / "again", out, (), *SMALL, *budget)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["tiles"]["built"] == len(failed) and report["tiles"]["failed"] == 0
    built = checksums(out)
    assert built == {k: offline[k] for k in built}
