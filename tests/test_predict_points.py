"""`geoseg predict` with LiDAR: IKD-Net (and the points baselines) on the sample's Lambert-93 site.

The scene is a 160 × 170 px crop (3 × 4 windows of 64 px at 25 % overlap) of the sample's
0.5 m RGBN image, whose 697k points lie in a multi-node COPC beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import laspy
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from affine import Affine
from pyproj import CRS
from rasterio.windows import Window

from geoseg.builder.points import FIELDS
from geoseg.datasets.n3c import collate
from geoseg.datasets.points import PointConfig
from geoseg.models import create_model
from geoseg.predict import sliding, window_offsets
from geoseg.predict.points import (
    Extent,
    ScenePoints,
    canonical_order,
    lidar_rasters,
    local_item,
    window_arrays,
    window_sample,
)
from geoseg.stac.server import sample_catalog_dir
from geoseg.train.metrics import predict_labels
from geoseg.train.task import CONTRACT_KEY, load_model
from tests.utils import cli, one_line_error

CONFIGS = Path(__file__).parents[1] / "configs"
ASSETS = sample_catalog_dir() / "assets"
IMAGE = ASSETS / "naip" / "fr_lambert93_0484_6633_050_2024.tif"
COPC = ASSETS / "3dep-lidar-copc" / "FR_L93_LPC_2024_0484_6633.copc.laz"
CROP = Window(192, 0, 170, 160)
OVERLAP = 0.25
LIDAR_ORDER = ("red", "green", "dsm", "blue", "nir", "intensity")  # LiDAR bands in between


@pytest.fixture(scope="module")
def checkpoint(sample_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny IKD-Net config trained 2 steps through the CLI (the real contract)."""
    root = tmp_path_factory.mktemp("ikdnet")
    res = cli("train", "--config", CONFIGS / "ikdnet-tiny.yaml", "--data", sample_build,
              "--out", root / "run", "--max-steps", "2", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with rasterio.open(IMAGE) as src:
        data = src.read(window=CROP)
        profile = {**src.profile, "width": CROP.width, "height": CROP.height,
                   "transform": src.window_transform(CROP)}  # fmt: skip
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def predicted(checkpoint: Path, scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pred") / "pred.tif"
    res = cli("predict", "--checkpoint", checkpoint, "--image", scene, "--points", COPC,
              "--out", out, "--overlap", OVERLAP, "--batch-size", 3)  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def write_las(path: Path, las: laspy.LasData, keep: np.ndarray, crs: bool = True) -> Path:
    """A plain LAZ of some of `las`'s points, with or without its CRS."""
    header = laspy.LasHeader(point_format=las.header.point_format.id, version="1.4")
    header.scales, header.offsets = las.header.scales, las.header.offsets
    if crs:
        header.add_crs(las.header.parse_crs())
    out = laspy.LasData(header)
    out.points = las.points[keep].copy()
    out.write(path)
    return path


@pytest.fixture(scope="module")
def copc_points() -> laspy.LasData:
    with laspy.CopcReader.open(COPC) as reader:
        points = reader.query()
        las = laspy.LasData(reader.header.copy(), points)
    return las


def read_labels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def test_ikdnet_prediction_matches_tilewise_prediction(
    checkpoint: Path, scene: Path, predicted: Path
):
    """Each window cut on its own from one independent COPC read of the scene, through the
    per-window pipeline (same seed), gives the scene's labels wherever it is the only window."""
    model, contract = load_model(checkpoint)
    size, cfg = contract["tile_size"], PointConfig(**contract["points"])
    mean = np.asarray(contract["mean"], np.float32)[:, None, None]
    std = np.asarray(contract["std"], np.float32)[:, None, None]
    with rasterio.open(scene) as src:
        image, transform, scene_bounds = src.read().astype(np.float32), src.transform, src.bounds
    pred = read_labels(predicted)
    nodata = (image == 0).all(axis=0)
    normalised = np.where(image == 0, 0.0, (image - mean) / std).astype(np.float32)
    stride = round(size * (1 - OVERLAP))
    rows, cols = window_offsets(160, size, stride), window_offsets(170, size, stride)
    coverage = np.zeros(pred.shape, int)
    for top in rows:
        for left in cols:
            coverage[top : top + size, left : left + size] += 1
    checked = 0
    with laspy.CopcReader.open(COPC) as reader:
        corners = np.array(scene_bounds[:2]), np.array(scene_bounds[2:])
        pts = reader.query(bounds=laspy.copc.Bounds(*corners))
    arrays = canonical_order({k: np.asarray(pts[k]) for k in FIELDS})
    for top in rows:
        for left in cols:
            window = transform @ Affine.translation(left, top)
            bounds = (window.c, window.f - size * 0.5, window.c + size * 0.5, window.f)
            rng = np.random.default_rng([contract["seed"], top, left])
            sample = window_sample(window_arrays(arrays, bounds), window, size, cfg, rng)
            crop = torch.from_numpy(normalised[:, top : top + size, left : left + size])
            empty = torch.zeros(0)
            batch = collate([{"image": crop, "points": sample, "mask": empty,
                              "point_labels": empty, "tile_id": ""}])  # fmt: skip
            with torch.inference_mode():
                logits = model({"image": batch["image"], "points": batch["points"]})
            labels = predict_labels(logits["logits"])[0].numpy()
            region = np.s_[top : top + size, left : left + size]
            alone = (coverage[region] == 1) & ~nodata[region]
            checked += alone.sum()
            np.testing.assert_array_equal(pred[region][alone], labels[alone])
    assert checked == ((coverage == 1) & ~nodata).sum() > 0.2 * pred.size
    item = json.loads(predicted.with_suffix(".json").read_text())
    props = item["properties"]
    assert props["geoseg:model"] == "ikdnet"
    assert (props["geoseg:windows"], props["geoseg:skipped_windows"]) == (12, 0)


def test_plain_laz_files_and_the_sample_catalog_give_the_same_map(
    checkpoint: Path,
    scene: Path,
    predicted: Path,
    copc_points: laspy.LasData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """Two plain LAZ halves (streamed into stripes, read in 3 column passes) and the COPC found
    through the sample STAC API give the local COPC's map: window samples are order-independent
    and passes see every window that touches their columns."""
    monkeypatch.setattr(sliding, "COLUMN_BLOCK", 60)
    x = np.asarray(copc_points.x)
    west = write_las(tmp_path / "west.laz", copc_points, x < 484800)
    east = write_las(tmp_path / "east.laz", copc_points, x >= 484800)
    plain = tmp_path / "plain.tif"
    res = cli("predict", "--checkpoint", checkpoint, "--image", scene, "--points", west,
              "--points", east, "--out", plain, "--batch-size", 5)  # fmt: skip
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(read_labels(plain), read_labels(predicted))
    monkeypatch.undo()
    stac = tmp_path / "stac.tif"
    res = cli("predict", "--checkpoint", checkpoint, "--image", scene, "--catalog", "sample",
              "--out", stac)  # fmt: skip
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(read_labels(stac), read_labels(predicted))


def test_windows_without_points_are_skipped_not_fatal(
    checkpoint: Path, scene: Path, copc_points: laspy.LasData, tmp_path: Path
):
    with rasterio.open(scene) as src:
        xmin = src.bounds.left
    west = write_las(tmp_path / "west.laz", copc_points, np.asarray(copc_points.x) < xmin + 30)
    out = tmp_path / "pred.tif"
    res = cli("predict", "--checkpoint", checkpoint, "--image", scene, "--points", west,
              "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "warning: 6 of 12 windows had too few points" in res.stderr
    labels = read_labels(out)  # windows at columns 96 and 106 are skipped, 0 and 48 are not
    assert np.all(labels[:, 112:] == 0) and np.all(labels[:, :96] > 0)


def test_lidar_bands_are_the_builds_rasters(sample_build: Path):
    """dsm/intensity rasterised from the scene's points for a build tile's window are the
    tile's own dsm.tif/intensity.tif (same reader, same rasterize)."""
    index = pd.read_parquet(sample_build / "index.parquet")
    tile = index[index["epsg"] == 2154].iloc[len(index[index["epsg"] == 2154]) // 2]
    folder = sample_build / tile["path"]
    with rasterio.open(folder / "dsm.tif") as src:
        dsm, transform, nodata = src.read(1), src.transform, src.nodata
    with rasterio.open(folder / "intensity.tif") as src:
        intensity = src.read(1)
    crs = CRS.from_epsg(2154)
    bounds = (tile["xmin"], tile["ymin"], tile["xmax"], tile["ymax"])
    with ScenePoints([local_item(COPC)], crs, transform, (64, 64), 48) as points:
        arrays = window_arrays(points.read(Window(0, 0, 64, 64)), bounds)
    rasters = lidar_rasters(arrays, Extent(crs, bounds, 0.5, 64), ["dsm", "intensity"])
    expected = np.stack([dsm, intensity]).astype(np.float32)
    expected[expected == nodata] = np.nan
    assert np.isfinite(expected).mean() > 0.5
    np.testing.assert_array_equal(rasters, expected)


def swapped_checkpoint(checkpoint: Path, path: Path, model: str, **changes) -> Path:
    """`checkpoint`'s contract made another model's, with that model's random weights."""
    ckpt = torch.load(checkpoint, weights_only=True)
    contract = {**ckpt[CONTRACT_KEY], "model": model, **changes}
    net = create_model(model, **contract["model_kwargs"])
    ckpt[CONTRACT_KEY] = contract
    ckpt["state_dict"] = {f"model.{k}": v for k, v in net.state_dict().items()}
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("model", ["randlanet", "early-fusion", "unet+lidar"])
def test_points_baselines_and_lidar_bands_predict(
    checkpoint: Path, scene: Path, sample_build: Path, model: str, tmp_path: Path
):
    stats = json.loads((sample_build / "stats.json").read_text())["splits"]["train"]["bands"]
    kwargs = {
        "randlanet": ("randlanet", {"point_widths": [4, 8, 16, 32]}, {}),
        "early-fusion": ("early-fusion", {"in_channels": 4, "encoder_name": "resnet18"}, {}),
        "unet+lidar": (
            "unet",
            {"in_channels": 6, "widths": [8, 16, 32, 64]},
            {
                "bands": list(LIDAR_ORDER),
                "mean": [stats[b]["mean"] for b in LIDAR_ORDER],
                "std": [stats[b]["std"] or 1.0 for b in LIDAR_ORDER],
            },
        ),
    }
    name, model_kwargs, changes = kwargs[model]
    ckpt = swapped_checkpoint(
        checkpoint, tmp_path / "model.ckpt", name, model_kwargs=model_kwargs, **changes
    )
    out = tmp_path / "pred.tif"
    res = cli("predict", "--checkpoint", ckpt, "--image", scene, "--points", COPC, "--out", out)
    assert res.exit_code == 0, res.output
    labels = read_labels(out)
    assert labels.shape == (160, 170) and set(np.unique(labels)) <= {1, 2, 3, 4}


def test_point_vote_checkpoint_predicts_a_scene(
    checkpoint: Path, scene: Path, predicted: Path, tmp_path: Path
):
    """`point_vote` is a model keyword without weights: the same weights load strictly under a
    contract that turns it on, and the scene goes through the windows with the vote."""
    ckpt = torch.load(checkpoint, weights_only=True)
    kwargs = ckpt[CONTRACT_KEY]["model_kwargs"]
    ckpt[CONTRACT_KEY]["model_kwargs"] = {**kwargs, "point_vote": True}
    torch.save(ckpt, tmp_path / "vote.ckpt")
    model, _ = load_model(tmp_path / "vote.ckpt")
    assert model.vote is not None
    out = tmp_path / "pred.tif"
    res = cli("predict", "--checkpoint", tmp_path / "vote.ckpt", "--image", scene,
              "--points", COPC, "--out", out, "--overlap", OVERLAP)  # fmt: skip
    assert res.exit_code == 0, res.output
    labels, plain = read_labels(out), read_labels(predicted)
    assert labels.shape == plain.shape and set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(labels == 0, plain == 0)  # the same nodata


def test_bad_point_inputs_fail_in_one_line(
    checkpoint: Path, scene: Path, copc_points: laspy.LasData, tmp_path: Path
):
    everything = np.ones(len(copc_points.points), bool)
    no_crs = write_las(tmp_path / "nocrs.laz", copc_points, everything, crs=False)
    far = laspy.LasData(copc_points.header.copy(), copc_points.points.copy())
    far.x = np.asarray(far.x) + 50_000.0
    far = write_las(tmp_path / "far.laz", far, everything)
    with rasterio.open(scene) as src:
        data, profile = src.read(), src.profile
    three = tmp_path / "three.tif"
    with rasterio.open(three, "w", **{**profile, "count": 3}) as dst:
        dst.write(data[:3])
    unet = swapped_checkpoint(
        checkpoint, tmp_path / "unet.ckpt", "unet",
        model_kwargs={"in_channels": 4, "widths": [8, 16, 32, 64]},
    )  # fmt: skip
    out = tmp_path / "pred.tif"
    cases = {
        "nocrs.laz have no CRS; assign the file one": (checkpoint, scene, no_crs),
        "points far.laz do not overlap the image": (checkpoint, scene, far),
        "3 bands; the model expects 4": (checkpoint, three, COPC),
        "reads no LiDAR; drop the points": (unet, scene, COPC),
        "reads LiDAR: give --points, --stac-url or --catalog": (checkpoint, scene, None),
    }
    for message, (ckpt, image, points) in cases.items():
        extra = ["--points", points] if points is not None else []
        res = cli("predict", "--checkpoint", ckpt, "--image", image, *extra, "--out", out)
        assert message in one_line_error(res)
    res = cli("predict", "--checkpoint", checkpoint, "--image", scene, "--points", COPC,
              "--catalog", "sample", "--out", out)  # fmt: skip
    assert "give the points once" in one_line_error(res)
    assert not out.exists()
