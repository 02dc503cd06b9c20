"""End-to-end builds of the embedded sample region through the real CLI, dask and STAC server."""

from __future__ import annotations

import difflib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import geopandas as gpd
import laspy
import numpy as np
import pyogrio
import pystac
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

import geoseg.builder.ledger as ledger_module
from geoseg.builder.ledger import (
    LEDGER,
    TileRows,
    check_ledgered,
    read_ledger,
    scan_finished,
    write_ledger,
)
from geoseg.builder.tile import FILES, MANIFEST
from geoseg.classes import CLASS_NAMES
from tests.utils import GEOSEG, checksums, geoseg


def test_sample_build_writes_the_full_tile_set(sample_build: Path):
    report = json.loads((sample_build / "report.json").read_text())
    assert report["tiles"]["failed"] == 0
    assert report["tiles"]["built"] >= 10
    reasons = {s["reason"] for s in report["skipped"]}
    assert "no NAIP coverage" in reasons  # the two LiDAR-only NEON plots
    tiles = sorted(p.parent for p in sample_build.glob(f"tiles/*/{MANIFEST}"))
    assert len(tiles) == report["tiles"]["total_ok"]
    for folder in tiles:
        for name in FILES:
            assert (folder / name).is_file(), folder / name
    for name in (
        "collection.json",
        "index.parquet",
        "ledger/part-0000.parquet",
        "tiles.vrt",
        "footprints/part-0000.fgb",
        "stats.json",
        "splits.json",
        "report.md",
        "preview.png",
        "build.yaml",
    ):
        assert (sample_build / name).is_file(), name
    assert not list(sample_build.rglob(".tmp-*"))


def test_tile_rasters_are_valid_cogs_on_one_grid(sample_build: Path):
    folder = next(sample_build.glob("tiles/*/"))
    profiles = {}
    for name in ("image", "label", "dsm", "intensity", "num_returns"):
        path = folder / f"{name}.tif"
        valid, errors, _ = cog_validate(str(path))
        assert valid, (name, errors)
        with rasterio.open(path) as src:
            profiles[name] = (src.crs, src.transform, src.width, src.height)
            if name == "image":
                assert src.count == 4
                assert src.colorinterp[3] == rasterio.enums.ColorInterp.undefined  # NIR not alpha
            if name == "label":
                assert set(np.unique(src.read(1))) <= set(range(len(CLASS_NAMES)))
                assert src.colormap(1)[3][:3] == (34, 139, 34)
                assert src.tags()["CLASS_NAMES"].split(",") == list(CLASS_NAMES)
    assert len(set(profiles.values())) == 1
    _, transform, w, h = profiles["image"]
    assert (w, h) == (64, 64) and transform.a == 0.5


def test_tile_points_are_in_tile_crs_and_metres(sample_build: Path):
    teak = sorted(sample_build.glob(f"tiles/32611_*/{MANIFEST}"))  # NEON Teakettle, UTM 11N
    m = json.loads(teak[len(teak) // 2].read_text())
    las = laspy.read(sample_build / "tiles" / m["tile_id"] / "points.laz")
    xmin, ymin, xmax, ymax = m["tile"]["bounds"]
    assert len(las) == m["points"]["count"] > 0
    assert xmin <= las.x.min() and las.x.max() <= xmax
    assert ymin <= las.y.min() and las.y.max() <= ymax
    assert 2000 < float(np.median(las.z)) < 2400  # Teakettle ground is ~2100-2250 m a.s.l.
    assert las.header.parse_crs().to_epsg() == m["tile"]["epsg"]
    assert set(np.unique(las.classification)) <= {1, 2, 5, 7}


def test_labels_agree_with_the_points(sample_build: Path):
    """Pixels labelled tree must have a high-vegetation point as their top labelled point."""
    stats = json.loads((sample_build / "stats.json").read_text())
    assert stats["pixels"]["tree"] > 0 and stats["pixels"]["ground"] > 0
    assert stats["points"]["tree"] > 0
    for name in ("red", "green", "blue"):
        assert 0 < stats["bands"][name]["mean"] < 255 and stats["bands"][name]["std"] > 0


def test_catalog_index_and_splits(sample_build: Path):
    collection = pystac.Collection.from_file(str(sample_build / "collection.json"))
    items = list(collection.get_items(recursive=True))
    index = gpd.read_parquet(sample_build / "index.parquet")
    assert len(items) == len(index) > 0
    assert sorted(i.id for i in items) == index["tile_id"].tolist()
    # The collection links sub-catalogs, never the tiles themselves (1.6 M links at state scale).
    links = json.loads((sample_build / "collection.json").read_text())["links"]
    assert {link["rel"] for link in links} == {"root", "child"}
    item = next(i for i in items if i.id.startswith("32611_"))
    assert item.properties["proj:code"] == "EPSG:32611"
    assert item.properties["geoseg:missing_bands"] == ["nir"]  # NEON RGB has no NIR
    assert "geoseg:split" not in item.properties  # the dataset's, not the tile's: index.parquet
    assert {"image", "label", "dsm", "intensity", "num_returns", "points"} <= set(item.assets)
    label = item.assets["label"].to_dict()
    assert [c["name"] for c in label["classification:classes"]] == list(CLASS_NAMES)
    assert label["file:checksum"].startswith("1220")
    assert Path(item.assets["image"].get_absolute_href()).is_file()
    parent = pystac.Catalog.from_file(str(item.get_single_link("parent").get_absolute_href()))
    assert item.id in {i.id for i in parent.get_items()}
    assert index.crs.to_epsg() == 4326
    footprints = gpd.read_file(sample_build / "tiles.vrt")  # the same outlines, for any GIS
    assert footprints.crs.to_epsg() == 4326
    assert pyogrio.list_layers(sample_build / "tiles.vrt")[:, 0].tolist() == ["tiles"]
    footprints = footprints.sort_values("tile_id", ignore_index=True)
    assert footprints["tile_id"].tolist() == index["tile_id"].tolist()
    assert footprints["split"].tolist() == index["split"].tolist()
    assert footprints.geometry.geom_equals_exact(index.geometry, 1e-9).all()
    assert not (sample_build / "tiles.geojson").exists()  # gone, with its legacy `crs` member
    splits = json.loads((sample_build / "splits.json").read_text())
    assert set(index["split"]) <= {"train", "val", "test", "buffer"}
    assert sum(len(v) for v in splits.values()) == len(index)
    for split, ids in splits.items():
        assert ids == index.loc[index["split"] == split, "tile_id"].tolist()


def test_torchgeo_reads_the_image_cogs(sample_build: Path):
    from torchgeo.datasets import RasterDataset
    from torchgeo.samplers import RandomGeoSampler

    class Tiles(RasterDataset):
        filename_glob = "image.tif"
        is_image = True
        all_bands = ("red", "green", "blue", "nir")

    ds = Tiles(paths=str(sample_build / "tiles"))
    sampler = RandomGeoSampler(ds, size=64, length=4)
    sample = ds[next(iter(sampler))]
    assert sample["image"].shape == (4, 64, 64)


def _metadata_bytes(out: Path) -> dict[str, bytes]:
    """Every STAC item and catalog and the index of a build (what a resume must reproduce)."""
    names = [
        *out.glob("tiles/*/*_*.json"),
        *out.glob("catalogs/*/*.json"),
        *out.glob("footprints/*.fgb"),
        *(out / n for n in ("collection.json", "index.parquet", "stats.json", "splits.json")),
    ]
    return {str(p.relative_to(out)): p.read_bytes() for p in names}


def _first_difference(before: bytes, after: bytes) -> str:
    old, new = (b.decode(errors="replace").splitlines() for b in (before, after))
    lines = difflib.unified_diff(old, new, lineterm="")
    return "\n".join(list(lines)[:20])


def test_rerun_skips_finished_tiles_and_rewrites_identical_metadata(
    sample_build: Path, tmp_path: Path
):
    out = tmp_path / "copy"
    shutil.copytree(sample_build, out)
    before, meta = checksums(out), _metadata_bytes(out)
    for folder in sorted(out.glob("tiles/*/"))[:3]:  # resume = some tiles cached, some rebuilt
        shutil.rmtree(folder)
    res = geoseg("build-dataset", "--catalog", "sample", "--workers", "1", "--no-progress",
                 "--out", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["tiles"]["built"] == 3
    assert report["tiles"]["cached"] == len(before) // len(FILES) - 3
    assert checksums(out) == before
    after = _metadata_bytes(out)
    assert after.keys() == meta.keys()
    # Class order in geoseg:pixel_counts, not tile.json's sorted keys (was not byte-identical).
    changed = [k for k, v in after.items() if v != meta[k]]
    assert changed == [], _first_difference(meta[changed[0]], after[changed[0]])


def test_the_ledger_stands_for_the_manifests_until_a_tile_changes(
    sample_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A resume trusts the ledger (a few stat calls per tile) instead of reading 1.6 M
    manifests: its rows must be what the manifests give, and any change to a tile's files must
    send that tile back to its manifest."""
    out = tmp_path / "copy"
    shutil.copytree(sample_build, out)
    ledger = read_ledger(out)
    ids = ledger.tile_id.to_pylist()
    assert ids == sorted(p.name for p in (out / "tiles").iterdir())
    scanned, todo = scan_finished(str(out), ids)
    assert todo == [] and scanned.to_table().equals(ledger.to_table())  # stamps included
    assert TileRows.from_table(ledger.to_table()).to_table().equals(ledger.to_table())

    def still_valid() -> np.ndarray:
        args = (ledger.stamp, ledger.file_names, ledger.file_sizes)
        return check_ledgered(str(out), ids, *args)

    assert still_valid().all()
    first, second, third = (out / "tiles" / t for t in ids[:3])
    (first / MANIFEST).write_bytes((first / MANIFEST).read_bytes())  # rewritten: new mtime
    with open(second / "label.tif", "ab") as f:
        f.write(b"x")
    (third / f"{third.name}.json").unlink()  # the item
    assert still_valid().tolist() == [False] * 3 + [True] * (len(ids) - 3)
    monkeypatch.setattr(ledger_module, "LEDGER_PART_TILES", 3)  # 1.6 M tiles: 4 parts
    write_ledger(out, ledger)
    assert len(list((out / LEDGER).glob("part-*.parquet"))) == -(-len(ids) // 3)
    assert read_ledger(out).to_table().equals(ledger.to_table())
    (out / LEDGER / "part-0001.parquet").write_bytes(b"not parquet")
    assert read_ledger(out) is None  # a broken cache only costs a full scan


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_tiles(sample_build: Path, tmp_path: Path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            *GEOSEG,
            "build-dataset",
            "--catalog",
            "sample",
            "--workers",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # own process group: SIGKILL takes the dask workers too
    )
    deadline = time.time() + 300
    while len(list(out.glob(f"tiles/*/{MANIFEST}"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "build ended before it was killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(list(out.glob(f"tiles/*/{MANIFEST}")))
    assert 3 <= partial < len(checksums(sample_build))
    res = geoseg(
        "build-dataset", "--catalog", "sample", "--workers", "2", "--no-progress", "--out", str(out)
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["tiles"]["cached"] >= partial
    assert checksums(out) == checksums(sample_build)
    assert not list(out.rglob(".tmp-*"))
