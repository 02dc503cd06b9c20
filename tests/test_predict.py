"""`geoseg predict` on a scene of 3 × 3 sample tiles with a 2-step tiny U-Net checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
import yaml

from geoseg.classes import CLASS_COLORS
from geoseg.models import create_model
from geoseg.predict import blend_weights, predict, sliding, window_offsets
from geoseg.train.metrics import predict_labels
from geoseg.train.task import CONTRACT_KEY, load_model
from geoseg.train.tta import forward
from tests.utils import cli, one_line_error

CONFIGS = Path(__file__).parents[1] / "configs"
OVERLAP = 0.25


@pytest.fixture(scope="module")
def checkpoint(sample_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny image-only U-Net trained 2 steps through the CLI (carries the real contract)."""
    root = tmp_path_factory.mktemp("predict")
    cfg = yaml.safe_load((CONFIGS / "ikdnet-tiny.yaml").read_text())
    cfg["model"] = {"name": "unet", "kwargs": {"widths": [8, 16, 32, 64]}}
    config = root / "unet.yaml"
    config.write_text(yaml.safe_dump(cfg))
    res = cli("train", "--config", config, "--data", sample_build, "--out", root / "run",
              "--max-steps", "2", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    return root / "run" / "checkpoints" / "last.ckpt"


def write_scene(path: Path, data: np.ndarray, profile: dict) -> Path:
    profile = {**profile, "count": len(data), "height": data.shape[1], "width": data.shape[2]}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def scene(sample_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine sample tile images side by side, cropped to 160 × 170 px (3 × 4 windows at 25 %
    overlap, the last column pinned to the edge) with a nodata corner."""
    tiles = sorted(sample_build.glob("tiles/*/image.tif"))[:9]
    mosaic = np.zeros((4, 192, 192), np.uint8)
    for i, tile in enumerate(tiles):
        with rasterio.open(tile) as src:
            mosaic[:, i // 3 * 64 : i // 3 * 64 + 64, i % 3 * 64 : i % 3 * 64 + 64] = src.read()
            profile = src.profile
    data = mosaic[:, :160, :170].copy()
    data[:, :20, :30] = 0
    return write_scene(tmp_path_factory.mktemp("scene") / "scene.tif", data, profile)


@pytest.fixture(scope="module")
def predicted(checkpoint: Path, scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pred") / "pred.tif"
    vector = out.with_suffix(".gpkg")
    res = cli("predict", "--checkpoint", checkpoint, "--image", scene, "--out", out,
              "--overlap", OVERLAP, "--batch-size", 3, "--vector", vector)  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def test_windows_cover_the_scene_and_weights_never_vanish():
    assert window_offsets(160, 64, 48) == [0, 48, 96]
    assert window_offsets(170, 64, 48) == [0, 48, 96, 106]
    assert window_offsets(40, 64, 48) == [0]
    weights = blend_weights(64, 16)
    assert weights.min() > 0 and weights[16:48, 16:48].min() == 1.0
    assert np.all(weights == weights.T)


def test_prediction_matches_tilewise_prediction(checkpoint: Path, scene: Path, predicted: Path):
    assert_tilewise(checkpoint, scene, predicted, tta=False)


def test_tta_prediction_matches_tilewise_tta(checkpoint: Path, scene: Path, tmp_path: Path):
    """--tta: every window is the mean of its 8 views, then windows blend as without."""
    out = tmp_path / "tta.tif"
    res = cli("predict", "--checkpoint", checkpoint, "--image", scene, "--out", out,
              "--overlap", OVERLAP, "--tta")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(out.with_suffix(".json").read_text())["properties"]["geoseg:tta"] is True
    assert_tilewise(checkpoint, scene, out, tta=True)


def assert_tilewise(checkpoint: Path, scene: Path, predicted: Path, tta: bool) -> None:
    """Where one window alone covers a pixel, the map holds that window's own prediction."""
    model, contract = load_model(checkpoint)
    size = contract["tile_size"]
    mean = np.asarray(contract["mean"], np.float32)[:, None, None]
    std = np.asarray(contract["std"], np.float32)[:, None, None]
    with rasterio.open(scene) as src:
        image = src.read().astype(np.float32)
    with rasterio.open(predicted) as src:
        pred = src.read(1)
    nodata = (image == 0).all(axis=0)
    normalised = np.where(image == 0, 0.0, (image - mean) / std).astype(np.float32)
    rows = window_offsets(image.shape[1], size, round(size * (1 - OVERLAP)))
    cols = window_offsets(image.shape[2], size, round(size * (1 - OVERLAP)))
    coverage = np.zeros(pred.shape, int)
    for top in rows:
        for left in cols:
            coverage[top : top + size, left : left + size] += 1
    candidates = np.zeros((5, *pred.shape), bool)  # classes some covering window predicts
    checked = 0  # the window at column 96 has no pixel of its own: 48 and 106 overlap it all
    for top in rows:
        for left in cols:
            window = torch.from_numpy(normalised[None, :, top : top + size, left : left + size])
            with torch.inference_mode():
                output = forward(model, {"image": window, "points": None}, tta)  # type: ignore[arg-type]
                labels = predict_labels(output["logits"])[0]
            labels = labels.numpy()
            region = np.s_[top : top + size, left : left + size]
            alone = (coverage[region] == 1) & ~nodata[region]
            checked += alone.sum()
            np.testing.assert_array_equal(pred[region][alone], labels[alone])
            r, c = np.indices(labels.shape)
            candidates[labels, r + top, c + left] = True
    assert checked == ((coverage == 1) & ~nodata).sum() > 0.2 * pred.size
    # Where windows overlap, the blend may pick a class either window picks, nothing else.
    shared = (coverage > 1) & ~nodata
    agrees = np.take_along_axis(candidates, pred[None].astype(int), 0)[0]
    assert agrees[shared].mean() > 0.99
    assert np.all(pred[nodata] == 0) and np.all(pred[~nodata] > 0)


def test_column_passes_give_the_same_map(
    checkpoint: Path, scene: Path, predicted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A scene wider than `COLUMN_BLOCK` is done in passes; the seams between them vanish."""
    monkeypatch.setattr(sliding, "COLUMN_BLOCK", 50)  # 4 passes over 170 columns
    out = tmp_path / "passes.tif"
    item = predict(checkpoint, scene, out, overlap=OVERLAP, batch_size=2)
    assert item["properties"]["geoseg:windows"] > 12  # windows on pass seams run twice
    with rasterio.open(out) as a, rasterio.open(predicted) as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))


def test_output_is_a_cog_on_the_input_grid(scene: Path, predicted: Path):
    with rasterio.open(scene) as src, rasterio.open(predicted) as out:
        assert (out.crs, out.transform, out.shape) == (src.crs, src.transform, src.shape)
        assert out.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert out.dtypes == ("uint8",) and out.nodata == 0
        assert all(out.colormap(1)[v] == c for v, c in CLASS_COLORS.items())
    item = json.loads(predicted.with_suffix(".json").read_text())
    assert item["properties"]["geoseg:model"] == "unet"
    assert item["properties"]["geoseg:device"] == "cpu"
    assert item["properties"]["proj:shape"] == [160, 170]
    classes = item["assets"]["classification"]["classification:classes"]
    assert [c["name"] for c in classes] == ["unlabeled", "others", "ground", "tree", "building"]
    polygons = gpd.read_file(predicted.with_suffix(".gpkg"))
    assert set(polygons["value"]) <= {1, 2, 3, 4} and len(polygons) > 0
    assert polygons.crs == rasterio.open(predicted).crs


def test_bad_inputs_fail_in_one_line(checkpoint: Path, scene: Path, tmp_path: Path):
    with rasterio.open(scene) as src:
        data, profile = src.read(), src.profile
    three = write_scene(tmp_path / "three.tif", data[:3], profile)
    no_crs = write_scene(tmp_path / "nocrs.tif", data, {**profile, "crs": None})
    random = tmp_path / "random.pt"
    torch.save({"weights": torch.zeros(3)}, random)
    ckpt = torch.load(checkpoint, weights_only=True)  # the same contract, made an IKD-Net's
    kwargs = {"in_channels": 4, "widths": [8, 16, 32, 64], "point_widths": [4, 8, 16, 32]}
    ikdnet = create_model("ikdnet", **kwargs)
    ckpt[CONTRACT_KEY].update(model="ikdnet", model_kwargs=kwargs)
    ckpt["state_dict"] = {f"model.{k}": v for k, v in ikdnet.state_dict().items()}
    points = tmp_path / "ikdnet.ckpt"
    torch.save(ckpt, points)
    out = tmp_path / "pred.tif"
    cases = {
        "3 bands; the model expects 4": (checkpoint, three),
        "has no CRS": (checkpoint, no_crs),
        "is not a geoseg checkpoint": (random, scene),
        "reads LiDAR: give --points, --stac-url or --catalog": (points, scene),
    }
    for message, (ckpt_path, image) in cases.items():
        res = cli("predict", "--checkpoint", ckpt_path, "--image", image, "--out", out)
        assert message in one_line_error(res)
    assert not out.exists()


def test_an_rgb_model_reads_the_first_three_bands_of_a_naip_scene(
    checkpoint: Path, scene: Path, tmp_path: Path
):
    with rasterio.open(scene) as src:
        data, profile = src.read(), src.profile
    three = write_scene(tmp_path / "rgb.tif", data[:3], profile)
    ckpt = torch.load(checkpoint, weights_only=True)  # the same contract, made an RGB model's
    contract = ckpt[CONTRACT_KEY]
    assert contract["bands"] == ["red", "green", "blue", "nir"]
    contract.update(bands=contract["bands"][:3], mean=contract["mean"][:3], std=contract["std"][:3])
    contract["model_kwargs"] = {**contract["model_kwargs"], "in_channels": 3}
    torch.manual_seed(0)
    unet = create_model("unet", **contract["model_kwargs"])
    ckpt["state_dict"] = {f"model.{k}": v for k, v in unet.state_dict().items()}
    rgb = tmp_path / "rgb.ckpt"
    torch.save(ckpt, rgb)
    maps = []
    for image in (scene, three):
        out = tmp_path / f"pred-{image.stem}.tif"
        res = cli("predict", "--checkpoint", rgb, "--image", image, "--out", out)
        assert res.exit_code == 0, res.output
        with rasterio.open(out) as src:
            maps.append(src.read(1))
    assert np.array_equal(*maps) and maps[0].any()


def test_item_speaks_the_dataset_stac_and_carries_the_scene_time(
    checkpoint: Path, sample_build: Path, tmp_path: Path
):
    """pred.json used STAC 1.0.0 with older extensions and the run's time as its datetime."""
    tile = sorted(sample_build.glob("tiles/32611_*/image.tif"))[0]
    dataset_item = json.loads((tile.parent / f"{tile.parent.name}.json").read_text())

    def item_of(image: Path, *extra: str) -> dict:
        out = tmp_path / f"{image.stem}-pred.tif"
        res = cli("predict", "--checkpoint", checkpoint, "--image", image, "--out", out, *extra)
        assert res.exit_code == 0, res.output
        return json.loads(out.with_suffix(".json").read_text())

    item = item_of(tile)  # a built tile: its tile.json knows the NAIP scene's date
    assert item["stac_version"] == dataset_item["stac_version"]
    assert set(item["stac_extensions"]) <= set(dataset_item["stac_extensions"])
    assert item["properties"]["proj:code"] == dataset_item["properties"]["proj:code"]
    assert item["properties"]["datetime"] == dataset_item["properties"]["datetime"]
    naip = tmp_path / "m_3611960_ne_11_060_20220504.tif"  # NAIP's file naming
    naip.write_bytes(tile.read_bytes())
    assert item_of(naip)["properties"]["datetime"] == "2022-05-04T00:00:00Z"
    given = item_of(naip, "--datetime", "2021-07-09")["properties"]
    assert given["datetime"] == "2021-07-09T00:00:00Z"
    assert given["geoseg:datetime_source"] == "--datetime"
    yearly = tmp_path / "scene_2024.tif"
    yearly.write_bytes(tile.read_bytes())
    props = item_of(yearly)["properties"]
    assert props["datetime"] is None
    assert (props["start_datetime"], props["end_datetime"]) == (
        "2024-01-01T00:00:00Z",
        "2024-12-31T23:59:59Z",
    )
    res = cli("predict", "--checkpoint", checkpoint, "--image", naip, "--datetime", "notadate",
              "--out", tmp_path / "bad.tif")  # fmt: skip
    assert "--datetime 'notadate' is not an ISO date" in one_line_error(res)
    assert not (tmp_path / "bad.tif").exists()
