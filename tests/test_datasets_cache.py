"""The training cache on the real sample build: exact pixels, stats.json normalisation, staleness,
DataLoader workers and one-line errors; the points cache: exact thinned points, samples identical
to the LAZ path, staleness."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import laspy
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from torch.utils.data import DataLoader

from geoseg.builder.writers import sha256
from geoseg.datasets import LAYERS, TileCacheDataset, build_cache
from geoseg.datasets.cache import TileCache
from geoseg.datasets.n3c import N3CCalifornia, N3CDataModule
from geoseg.datasets.points import POINT_FIELDS, PointConfig, select_points

CFG = PointConfig(num_points=2048, augment=True)


@pytest.fixture(scope="module")
def train_cache(sample_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cache(sample_build, "train", out=tmp_path_factory.mktemp("cache"))


def _copy_build(build: Path, dest: Path) -> Path:
    """A private copy (without points) for tests that modify tiles."""
    shutil.copytree(build / "tiles", dest / "tiles", ignore=shutil.ignore_patterns("*.laz"))
    for name in ("index.parquet", "stats.json"):
        shutil.copy(build / name, dest / name)
    return dest


def _read(tile: Path, layer: str) -> np.ndarray:
    with rasterio.open(tile / f"{layer}.tif") as src:
        return src.read()


def test_cache_holds_the_cog_pixels_exactly(sample_build: Path, train_cache: Path):
    meta = json.loads((train_cache / "tiles.json").read_text())
    index = pd.read_parquet(sample_build / "index.parquet")
    assert meta["tile_ids"] == sorted(index.loc[index["split"] == "train", "tile_id"])
    assert meta["layers"]["image"]["bands"] == ["red", "green", "blue", "nir"]
    assert meta["layers"]["dsm"]["nodata"] == -9999.0
    assert sorted(meta["layers"]) == sorted(LAYERS)
    arrays = {k: np.load(train_cache / v["file"]) for k, v in meta["layers"].items()}
    assert arrays["image"].dtype == np.uint8 and arrays["dsm"].dtype == np.float32
    for i, tile_id in enumerate(meta["tile_ids"]):
        for layer, arr in arrays.items():
            cog = _read(sample_build / "tiles" / tile_id, layer)
            assert np.array_equal(arr[i], cog), (tile_id, layer)
            holes = bool((cog == meta["layers"][layer]["nodata"]).any())
            assert holes == (i in meta["layers"][layer]["nodata_tiles"]), (tile_id, layer)
    assert not list(train_cache.parent.glob(".tmp-*"))


def test_samples_are_normalised_with_stats_json(sample_build: Path, train_cache: Path):
    stats = json.loads((sample_build / "stats.json").read_text())["splits"]["train"]
    ds = TileCacheDataset(train_cache, sample_build / "stats.json")
    assert ds.bands == ("red", "green", "blue", "nir", "dsm")
    nodata = np.array([0, 0, 0, 0, -9999.0])[:, None, None]
    raws = [
        np.concatenate([_read(t, "image"), _read(t, "dsm")]).astype(np.float64)
        for t in (sample_build / "tiles" / tile_id for tile_id in ds.tile_ids)
    ]
    # a tile with holes in every band
    i = next(k for k, r in enumerate(raws) if (r == nodata).any(axis=(1, 2)).all())
    tile, raw = sample_build / "tiles" / ds.tile_ids[i], raws[i]
    mean = np.array([stats["bands"][b]["mean"] for b in ds.bands])[:, None, None]
    std = np.array([stats["bands"][b]["std"] for b in ds.bands])[:, None, None]
    expected = (raw - mean) / std
    expected[raw == nodata] = 0.0  # holes -> the mean, not outliers (down to -3000 sigma)

    sample = ds[i]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (5, 64, 64)
    np.testing.assert_allclose(sample["image"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert sample["mask"].dtype == torch.int64
    assert np.array_equal(sample["mask"].numpy(), _read(tile, "label")[0])

    shifted = json.loads(json.dumps(stats))
    shifted["bands"]["red"]["mean"] += shifted["bands"]["red"]["std"]  # one std up
    moved = TileCacheDataset(train_cache, shifted, mask=None)[i]
    valid = raw[0] != 0
    np.testing.assert_allclose(moved["image"][0][valid], sample["image"][0][valid] - 1, atol=1e-5)
    assert torch.equal(moved["image"][1:], sample["image"][1:])
    assert "mask" not in moved


def test_random_crops_are_windows_of_the_tile(sample_build: Path, train_cache: Path):
    full = TileCacheDataset(train_cache, sample_build / "stats.json", channels=("image",))[3]
    ds = TileCacheDataset(train_cache, sample_build / "stats.json", channels=("image",), crop=24)
    torch.manual_seed(0)
    crops = [ds[3] for _ in range(4)]
    for crop in crops:
        assert crop["image"].shape == (4, 24, 24) and crop["mask"].shape == (24, 24)
        windows = full["image"].unfold(1, 24, 1).unfold(2, 24, 1)  # (4, 41, 41, 24, 24)
        hit = (windows == crop["image"][:, None, None]).flatten(3).all(-1).all(0).nonzero()
        assert len(hit), "crop is not a window of the tile"
        y, x = hit[0].tolist()
        assert torch.equal(full["mask"][y : y + 24, x : x + 24], crop["mask"])
    torch.manual_seed(0)
    assert torch.equal(ds[3]["image"], crops[0]["image"])  # torch RNG: seedable per worker


def test_dataloader_with_two_workers(sample_build: Path, train_cache: Path):
    ds = TileCacheDataset(train_cache, sample_build / "stats.json")
    reference = [ds[i] for i in range(len(ds))]  # read in the parent first (fork gotcha)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=TileCacheDataset.collate)
    batches = list(loader)
    assert batches[0]["image"].shape == (8, 5, 64, 64)
    assert batches[0]["mask"].shape == (8, 64, 64)
    assert torch.equal(
        torch.cat([b["image"] for b in batches]), torch.stack([s["image"] for s in reference])
    )
    assert torch.equal(
        torch.cat([b["mask"] for b in batches]), torch.stack([s["mask"] for s in reference])
    )
    plain = next(iter(DataLoader(ds, batch_size=8)))  # default_collate works too
    assert torch.equal(plain["image"], batches[0]["image"])


def test_cache_is_reused_until_a_manifest_changes(sample_build: Path, tmp_path: Path):
    build = _copy_build(sample_build, tmp_path / "build")
    cache = build_cache(build, "val", layers=("image", "dsm"))
    assert cache == build / "cache" / "val"
    first = (cache / "image.u8.npy").stat().st_ino
    tile = build / "tiles" / json.loads((cache / "tiles.json").read_text())["tile_ids"][0]

    (tile / "tile.json").touch()  # same bytes: same fingerprint, e.g. after a copy or resume
    assert build_cache(build, "val", layers=("image",)) == cache  # subset of the cached layers
    assert (cache / "image.u8.npy").stat().st_ino == first

    # the tile is rebuilt with other pixels: its manifest records the new checksum
    with rasterio.open(tile / "image.tif") as src:
        profile, pixels = src.profile, src.read()
    with rasterio.open(tile / "image.tif", "w", **profile) as dst:
        dst.write(255 - pixels)
    manifest = json.loads((tile / "tile.json").read_text())
    manifest["files"]["image.tif"]["sha256"] = sha256(tile / "image.tif")
    (tile / "tile.json").write_text(json.dumps(manifest))
    assert build_cache(build, "val", layers=("image", "dsm")) == cache
    assert (cache / "image.u8.npy").stat().st_ino != first
    assert np.array_equal(np.load(cache / "image.u8.npy")[0], _read(tile, "image"))

    build_cache(build, "val", layers=("intensity",))  # a layer the cache lacks: added
    assert json.loads((cache / "tiles.json").read_text())["layers"].keys() == {
        "image", "dsm", "intensity"
    }  # fmt: skip
    assert not list(cache.parent.glob(".tmp-*"))


def test_bad_input_gives_one_line_errors(sample_build: Path, train_cache: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown split 'nope'; choose from \['train', 'val'"):
        build_cache(sample_build, "nope", out=tmp_path)
    with pytest.raises(FileNotFoundError, match="build folder not found"):
        build_cache(tmp_path / "missing", "train")
    with pytest.raises(FileNotFoundError, match=r"index\.parquet not found; is .* a geoseg"):
        build_cache(tmp_path, "train")
    with pytest.raises(ValueError, match="layers must be a subset"):
        build_cache(sample_build, "train", out=tmp_path, layers=("rgb",))
    with pytest.raises(FileNotFoundError, match="no training cache"):
        TileCacheDataset(tmp_path, sample_build / "stats.json")
    with pytest.raises(ValueError, match=r"layers \['points'\] not in the cache"):
        TileCacheDataset(train_cache, sample_build / "stats.json", channels=("image", "points"))
    with pytest.raises(ValueError, match=r"crop must be in 1\.\.64"):
        TileCacheDataset(train_cache, sample_build / "stats.json", crop=65)

    build = _copy_build(sample_build, tmp_path / "build")
    index = pd.read_parquet(build / "index.parquet")
    tile = build / index.loc[index["split"] == "test", "path"].iloc[-1]
    with rasterio.open(tile / "label.tif") as src:
        profile = src.profile | {"width": 32, "height": 32}
    with rasterio.open(tile / "label.tif", "w", **profile) as dst:
        dst.write(np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="one cache holds one tile size"):
        build_cache(build, "test")
    assert not (build / "cache" / "test").exists()
    (tile / "tile.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no tile\.json: unfinished build"):
        build_cache(build, "test")


@pytest.fixture(scope="module")
def val_points(sample_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("points")
    return build_cache(sample_build, "val", out=out, layers=("image", "label"), point_grid=0.06)


def test_points_cache_holds_the_thinned_points_exactly(sample_build: Path, val_points: Path):
    cache = TileCache(val_points)
    uncached = N3CCalifornia(sample_build, "val", point_config=CFG)
    assert cache.tile_ids == uncached.tile_ids and cache.grid_size == CFG.grid_size
    for i in range(len(cache)):
        expected = select_points(uncached.read_points(i), CFG.grid_size)
        got = cache.points(i)
        assert got.keys() == expected.keys()
        for name, values in expected.items():
            assert got[name].dtype == values.dtype, name  # x/y/z float64: no precision lost
            assert np.array_equal(got[name], values), (i, name)
    meta = json.loads((val_points / "tiles.json").read_text())
    assert meta["points"]["fields"]["x"]["file"] == "points.x.f8.bin"
    with rasterio.open(sample_build / "tiles" / cache.tile_ids[-1] / "label.tif") as src:
        assert cache.transform(len(cache) - 1) == src.transform


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            _assert_same(value, b[key])
        elif isinstance(value, list) and isinstance(value[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(value, b[key], strict=True)), key
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_cached_samples_equal_the_laz_path(sample_build: Path, val_points: Path):
    # augmented + seeded: every random draw (sampling, flip, rotation, jitter) must match
    uncached = N3CCalifornia(sample_build, "val", point_config=CFG, seed=3)
    cached = N3CCalifornia(sample_build, "val", point_config=CFG, seed=3, cache=val_points)
    for i in (0, len(cached) - 1):
        _assert_same(cached[i], uncached[i])

    # the data module builds the caches itself; training draws from torch's RNG
    kwargs = {"point_config": CFG, "neighbours": False}
    dm = N3CDataModule(sample_build, **kwargs, cache_dir=val_points.parent)
    plain = N3CDataModule(sample_build, **kwargs)
    batches = []
    for datamodule in (dm, plain):
        datamodule.setup("fit")
        torch.manual_seed(0)
        batches.append(next(iter(datamodule.train_dataloader())))
    assert dm.datasets["train"].cache is not None
    _assert_same(*batches)
    assert "neighbors" not in batches[0]["points"]


def test_points_cache_is_rebuilt_when_a_tile_changes(sample_build: Path, tmp_path: Path):
    build = _copy_build(sample_build, tmp_path / "build")
    index = pd.read_parquet(build / "index.parquet")
    tiles = sorted(index.loc[index["split"] == "val", "tile_id"])
    for tile_id in tiles:
        shutil.copy(sample_build / "tiles" / tile_id / "points.laz", build / "tiles" / tile_id)
    cache = build_cache(build, "val", layers=("image", "label"))
    assert build_cache(build, "val", layers=(), point_grid=0.06) == cache  # points added
    meta = json.loads((cache / "tiles.json").read_text())
    assert meta["layers"].keys() == {"image", "label"}  # and the layers kept
    first = TileCache(cache).points(0)["x"].copy()

    tile = build / "tiles" / tiles[0]
    las = laspy.read(tile / "points.laz")
    las.points = las.points[: len(las.points) // 2]
    las.write(tile / "points.laz")
    manifest = json.loads((tile / "tile.json").read_text())
    manifest["files"]["points.laz"]["sha256"] = sha256(tile / "points.laz")
    (tile / "tile.json").write_text(json.dumps(manifest))
    build_cache(build, "val", layers=(), point_grid=0.06)
    rebuilt = json.loads((cache / "tiles.json").read_text())
    assert rebuilt["fingerprint"] != meta["fingerprint"]
    assert rebuilt["layers"].keys() == {"image", "label"}  # rebuilt with all it held
    got = TileCache(cache).points(0)["x"]
    fields = {name: np.asarray(las[name]) for name in POINT_FIELDS}
    assert len(got) < len(first) and np.array_equal(got, select_points(fields, 0.06)["x"])

    build_cache(build, "val", layers=(), point_grid=0.5)  # another grid: thinned again
    assert TileCache(cache).grid_size == 0.5
    with pytest.raises(ValueError, match=r"thinned at grid_size 0\.5, not 0\.06"):
        N3CCalifornia(build, "val", point_config=CFG, cache=cache)
    with pytest.raises(ValueError, match="holds other tiles than split 'test'"):
        N3CCalifornia(build, "test", point_config=CFG, cache=cache)
    with pytest.raises(ValueError, match="no points in the cache"):
        TileCache(build_cache(build, "test", layers=("label",))).points(0)
    with pytest.raises(ValueError, match="lacks some of the layers"):
        N3CCalifornia(build, "val", "rgbn+dsm+intensity", replace(CFG, grid_size=0.5), cache=cache)
    with pytest.raises(ValueError, match="layers must be a subset"):
        build_cache(build, "val", layers=())
