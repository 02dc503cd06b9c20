"""Bad input through the real CLI: clear one-line errors, exit codes, nothing lost or leaked."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from geoseg.stac.server import sample_catalog_dir, serve_catalog
from tests.utils import geoseg

SAMPLE_GRID = ("--gsd", "0.5", "--tile-size", "64", "--workers", "1", "--no-progress")


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("geoseg: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--region", "Atlantis"), "unknown region"),
        (("--region", "Santa Clara"), "outside"),  # a real county, but not in the sample
        (("--bbox", "-100", "40", "-99", "41"), "outside"),
        (("--bbox", "10", "5", "9", "6"), "W"),  # W > E
        (("--aoi", "/nonexistent/aoi.geojson"), "aoi"),
        (("--gsd", "-1"), "--gsd"),
        (("--year", "2020", "--datetime", "2020/2021"), "--year"),
        (("--datetime", "notadate"), "--datetime: 'notadate' is not a date"),
        (("--datetime", "2022/2018"), "ends before it starts"),
        (("--stac-url", "http://127.0.0.1:9"), "--catalog sample or --stac-url, not both"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, args: tuple[str, ...], needle: str):
    out = tmp_path / "out"
    res = geoseg("build-dataset", "--catalog", "sample", *args, "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert needle.lower() in _error_line(res.stderr).lower()
    assert not out.exists()


def test_unknown_region_suggests_the_closest_names(tmp_path: Path):
    res = geoseg("build-dataset", "--region", "Santa Clar", "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    line = _error_line(res.stderr)
    assert "did you mean 'Santa Clara'" in line and "CA" in line and "--bbox" in line
    assert len(line) < 200


def test_out_pointing_to_a_file_is_refused_before_any_work(tmp_path: Path):
    out = tmp_path / "taken"
    out.write_text("not a folder")
    for target in (out, out / "sub"):
        t0 = time.time()
        res = geoseg("build-dataset", "--catalog", "sample", "--out", str(target))
        assert res.returncode == 2, res.stderr
        assert "is a file" in _error_line(res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
        assert time.time() - t0 < 15  # no search, no cluster (was a traceback after ~5 s)
    assert out.read_text() == "not a folder"


def test_max_tiles_counts_ready_tiles_not_candidates(tmp_path: Path):
    """The sample's first candidates by id are skipped (no LiDAR points): --max-tiles 1 used to
    stop there and write an empty dataset with exit 0."""
    out = tmp_path / "out"
    res = geoseg("build-dataset", "--catalog", "sample", "--max-tiles", "1", "--workers", "1",
                 "--no-progress", "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["tiles"]["total_ok"] == 1 and report["tiles"]["skipped"] > 0
    assert report["tiles"]["not_attempted"] > 0
    assert len(list(out.glob("tiles/*/tile.json"))) == 1
    assert "not tried (--max-tiles)" in (out / "report.md").read_text()


def test_empty_search_exits_1_and_writes_nothing(tmp_path: Path):
    out = tmp_path / "out"
    res = geoseg("build-dataset", "--catalog", "sample", "--year", "1990", "--out", str(out))
    assert res.returncode == 1
    assert "no NAIP imagery found" in _error_line(res.stderr)
    assert not out.exists()


def test_stac_api_down_is_retried_then_reported(tmp_path: Path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    t0 = time.time()
    res = geoseg("build-dataset", "--stac-url", f"http://127.0.0.1:{port}", "--region", "Fresno",
                 "--out", str(out))  # fmt: skip
    assert res.returncode == 1
    assert "unreachable" in _error_line(res.stderr)
    assert time.time() - t0 < 60
    assert not out.exists()


def test_region_ca_on_the_sample_keeps_california_only(tmp_path: Path):
    out = tmp_path / "out"
    res = geoseg("build-dataset", "--catalog", "sample", "--region", "CA", "--max-tiles", "3",
                 "--workers", "1", "--no-progress", "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    ids = [p.name for p in (out / "tiles").iterdir()]
    assert len(ids) == 3 and all(i.startswith("32611_") for i in ids)  # no Lambert-93


def _catalog_copy(tmp_path: Path, edit: Callable[[Path, dict, dict], None]) -> Path:
    """A copy of the sample catalog, restricted to the NEON plots, modified by `edit`."""
    root = tmp_path / "catalog"
    shutil.copytree(sample_catalog_dir(), root)
    naip = json.loads((root / "items" / "naip.json").read_text())
    copc = json.loads((root / "items" / "3dep-lidar-copc.json").read_text())
    naip["features"] = [f for f in naip["features"] if "teak" in f["id"]]
    copc["features"] = [f for f in copc["features"] if "TEAK" in f["id"]]
    edit(root, naip, copc)
    (root / "items" / "naip.json").write_text(json.dumps(naip))
    (root / "items" / "3dep-lidar-copc.json").write_text(json.dumps(copc))
    return root


def _asset(root: Path, feature: dict, key: str) -> Path:
    return (root / "items" / feature["assets"][key]["href"]).resolve()


def test_corrupt_inputs_fail_their_tiles_and_the_build_goes_on(tmp_path: Path):
    broken: dict[str, str] = {}

    def corrupt(root: Path, naip: dict, copc: dict) -> None:
        cog = _asset(root, naip["features"][0], "image")
        cog.write_bytes(cog.read_bytes()[: cog.stat().st_size // 3])  # truncated COG
        laz = _asset(root, copc["features"][2], "data")
        laz.write_bytes(laz.read_bytes()[: laz.stat().st_size * 2 // 3])  # truncated COPC
        naip["features"][1]["properties"]["proj:epsg"] = 26911  # file is EPSG:32611
        broken["naip"], broken["copc"] = naip["features"][0]["id"], copc["features"][2]["id"]
        broken["crs"] = naip["features"][1]["id"]

    root = _catalog_copy(tmp_path, corrupt)
    out = tmp_path / "out"
    with serve_catalog(root) as url:
        res = geoseg("build-dataset", "--stac-url", url, "--region", "Fresno", *SAMPLE_GRID,
                     "--out", str(out))  # fmt: skip
    assert res.returncode == 1  # some tiles failed ...
    report = json.loads((out / "report.json").read_text())
    reasons = " ".join(f["reason"] for f in report["failed"])
    assert broken["naip"] in reasons and broken["copc"] in reasons
    assert "unreadable" in reasons and "truncated COPC" in reasons
    assert f"imagery {broken['crs']}: CRS mismatch" in reasons
    assert report["tiles"]["built"] > 10  # ... and every other tile was built
    assert "Failed tiles" in (out / "report.md").read_text()
    assert f"catalog: STAC API given by --stac-url ({url})" in (out / "report.md").read_text()


def test_hrefs_and_ids_cannot_make_the_builder_write_outside_out(tmp_path: Path):
    def hostile(root: Path, naip: dict, copc: dict) -> None:
        for i, f in enumerate(naip["features"] + copc["features"]):
            f["id"] = f"../../../../escape-{i}"

    root = _catalog_copy(tmp_path, hostile)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)}
    with serve_catalog(root) as url:
        res = geoseg("build-dataset", "--stac-url", url, "--region", "Fresno", "--max-tiles", "4",
                     *SAMPLE_GRID, "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    after = {p for p in tmp_path.rglob("*") if not p.is_relative_to(out)}
    assert after == before
    assert not list(tmp_path.rglob("escape-*"))
