"""The point pipeline and the torch/TorchGeo/Lightning datasets on the real sample build."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from dataclasses import replace
from pathlib import Path

import laspy
import lightning as L
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from affine import Affine
from torch.utils.data import DataLoader
from torchgeo.datasets import stack_samples
from torchgeo.samplers import RandomGeoSampler
from torchgeo.trainers import SemanticSegmentationTask

from geoseg.classes import CLASS_NAMES, NOISE_CODES, UNLABELED, remap_asprs
from geoseg.datasets.n3c import (
    N3CCalifornia,
    N3CDataModule,
    N3CImage,
    N3CLabel,
    collate,
    split_tiles,
    tile_files,
)
from geoseg.datasets.points import (
    PointConfig,
    TileAugment,
    View,
    augment,
    pixels_to_points,
    points_to_pixels,
    prepare_points,
    read_points,
    sample_fixed,
    select_points,
)
from geoseg.datasets.splits import tile_weights
from geoseg.models import create_model
from geoseg.train.losses import class_weights

CFG = PointConfig(num_points=2048, levels=4, ratio=4, k=16)  # 2048 -> 512 -> 128 -> 32 -> 8
SIZE = 64


@pytest.fixture(scope="module")
def train(sample_build: Path) -> N3CCalifornia:
    return N3CCalifornia(sample_build, "train", point_config=CFG, seed=0)


def _richest(ds: N3CCalifornia) -> int:
    """Index of the tile with the most labelled pixels other than ground, for sharper checks."""
    scores = []
    for folder in ds.folders:
        with rasterio.open(folder / "label.tif") as src:
            scores.append(int((src.read(1) > 2).sum()))
    return int(np.argmax(scores))


def _tile(ds: N3CCalifornia, index: int) -> tuple[dict[str, np.ndarray], Affine]:
    _, transform = ds.read_image(index)
    return ds.read_points(index), transform


def test_projection_round_trip(train: N3CCalifornia) -> None:
    arrays, transform = _tile(train, 0)
    x, y = arrays["x"], arrays["y"]
    rowcol = points_to_pixels(x, y, transform, SIZE)
    assert rowcol.min() >= 0 and rowcol.max() < SIZE
    inside = (rowcol > 0).all(1) & (rowcol < SIZE - 1e-6).all(1)  # not clipped
    centres = pixels_to_points(np.floor(rowcol).astype(np.int64), transform)
    gsd = transform.a
    assert np.abs(centres - np.stack([x, y], 1))[inside].max() <= gsd / 2 + 1e-9
    # and back: a pixel centre projects into its own pixel
    pix = np.array([[0, 0], [5, 17], [SIZE - 1, SIZE - 1]])
    xy = pixels_to_points(pix, transform)
    np.testing.assert_array_equal(
        np.floor(points_to_pixels(xy[:, 0], xy[:, 1], transform, SIZE)), pix
    )


def test_pyramid_pixels_halve_and_stay_in_range(train: N3CCalifornia) -> None:
    arrays, transform = _tile(train, 0)
    out = prepare_points(arrays, transform, SIZE, CFG, np.random.default_rng(0))
    pixels = out["pixels"]
    assert [len(p) for p in pixels] == [2048, 512, 128, 32, 8]
    for level, p in enumerate(pixels):
        np.testing.assert_array_equal(p, pixels[0][: len(p)] // 2**level)
        assert p.min() >= 0 and p.max() < SIZE // 2**level
    assert out["features"].shape == (2048, 2) and out["labels"].dtype == np.int64


def test_point_labels_agree_with_label_raster(train: N3CCalifornia) -> None:
    index = _richest(train)
    arrays, transform = _tile(train, index)
    cfg = PointConfig(num_points=len(arrays["x"]) + 64, levels=1, k=4, grid_size=0.0)
    out = prepare_points(arrays, transform, SIZE, cfg, np.random.default_rng(0))
    pixels, z, labels = out["pixels"][0], out["xyz"][0][:, 2], out["labels"]
    labelled = labels != UNLABELED
    flat = pixels[labelled, 0] * SIZE + pixels[labelled, 1]
    order = np.lexsort((z[labelled], flat))  # top point of each pixel last
    last = np.r_[flat[order][1:] != flat[order][:-1], True]
    top_pix, top_label = flat[order][last], labels[labelled][order][last]
    with rasterio.open(train.folders[index] / "label.tif") as src:
        raster = src.read(1).ravel().astype(np.int64)
    shown = raster[top_pix] != UNLABELED  # 0 also where no imagery lies under the pixel
    assert shown.sum() > 100 and len(np.unique(top_label[shown])) > 1
    assert (raster[top_pix][shown] == top_label[shown]).mean() > 0.99


def test_noise_points_are_dropped(train: N3CCalifornia) -> None:
    arrays, transform = _tile(train, 0)
    arrays["classification"] = arrays["classification"].copy()
    arrays["classification"][:] = sorted(NOISE_CODES)[0]
    with pytest.raises(ValueError, match="no non-noise points"):
        prepare_points(arrays, transform, SIZE, CFG, np.random.default_rng(0))


def test_normalisation_uses_stats_json(sample_build: Path) -> None:
    """A val tile is normalised with the *train* split's statistics."""
    ds = N3CCalifornia(sample_build, "val", bands="rgbn+dsm+intensity", point_config=CFG)
    stats = json.loads((sample_build / "stats.json").read_text())["splits"]["train"]["bands"]
    image, _ = ds.read_image(0)
    assert image.shape == (6, SIZE, SIZE) and image.dtype == np.float32
    with rasterio.open(ds.folders[0] / "image.tif") as src:
        red = src.read(1).astype(np.float64)
    with rasterio.open(ds.folders[0] / "dsm.tif") as src:
        dsm, dsm_nodata = src.read(1).astype(np.float64), src.nodata
    expected = (red - stats["red"]["mean"]) / stats["red"]["std"]
    np.testing.assert_allclose(image[0], np.where(red != 0, expected, 0.0), atol=1e-4)
    expected = (dsm - stats["dsm"]["mean"]) / stats["dsm"]["std"]
    np.testing.assert_allclose(image[4], np.where(dsm != dsm_nodata, expected, 0.0), atol=1e-4)
    assert (
        N3CCalifornia(sample_build, "val", bands="rgb", point_config=CFG)[0]["image"].shape[0] == 3
    )


def test_sample_fixed_pads_with_duplicates_and_is_seeded() -> None:
    idx = sample_fixed(10, 25, np.random.default_rng(3))
    assert len(idx) == 25 and set(idx) == set(range(10))
    np.testing.assert_array_equal(idx, sample_fixed(10, 25, np.random.default_rng(3)))
    assert len(set(sample_fixed(100, 25, np.random.default_rng(0)))) == 25  # no replacement


def test_sample_with_replacement_as_released() -> None:
    idx = sample_fixed(100, 100, np.random.default_rng(0), replace=True)
    assert len(idx) == 100 and len(set(idx)) < 80  # ~63 distinct of 100 draws


@pytest.mark.parametrize("padded", [False, True])
def test_label_counts_cover_every_point_of_the_tile_once(
    train: N3CCalifornia, padded: bool
) -> None:
    """Scored samples count each thinned point of the tile once, whether the sample leaves
    points out (fewer points than the tile's) or pads with duplicates (more)."""
    index = _richest(train)
    points = select_points(train.read_points(index), CFG.grid_size)
    num_points = 2 * len(points["x"]) if padded else 2048
    assert padded or num_points < len(points["x"])
    scored = N3CCalifornia(
        train.root, "train", point_config=replace(CFG, num_points=num_points), seed=0,
        score_points=True,
    )  # fmt: skip
    sample = scored[index]
    counts = sample["point_counts"].numpy()
    n = len(points["x"])
    assert counts.sum() == n and counts.shape == (num_points, len(CLASS_NAMES))
    expected = np.bincount(remap_asprs(points["classification"]), minlength=len(CLASS_NAMES))
    np.testing.assert_array_equal(counts.sum(0), expected)
    labels = sample["point_labels"].numpy()
    drawn = counts.sum(1) > 0
    if num_points > n:  # every point drawn: it counts exactly itself, duplicates nothing
        assert drawn.sum() == n and (counts[drawn].argmax(1) == labels[drawn]).all()
    else:  # a drawn point counts itself plus the undrawn points nearest to it
        assert drawn.all() and (counts[np.arange(num_points), labels] >= 1).all()
    assert "point_counts" not in train[index]


def test_augmentation_keeps_pixels_and_is_seeded(train: N3CCalifornia) -> None:
    arrays, transform = _tile(train, 0)
    aug_cfg = replace(CFG, augment=True)

    def run(cfg: PointConfig, seed: int, view: View | None = None) -> dict:
        return prepare_points(arrays, transform, SIZE, cfg, np.random.default_rng(seed), view)

    plain, aug = run(CFG, 1), run(aug_cfg, 1)
    for a, b in zip(plain["pixels"], aug["pixels"], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(plain["labels"], aug["labels"])
    assert not np.allclose(plain["xyz"][0], aug["xyz"][0])
    for a, b in zip(aug["xyz"], run(aug_cfg, 1)["xyz"], strict=True):
        np.testing.assert_array_equal(a, b)

    flipped = run(CFG, 1, View(flip=True))
    for level, (a, b) in enumerate(zip(plain["pixels"], flipped["pixels"], strict=True)):
        np.testing.assert_array_equal(b[:, 0], a[:, 0])
        np.testing.assert_array_equal(b[:, 1], SIZE // 2**level - 1 - a[:, 1])
    np.testing.assert_array_equal(flipped["xyz"][0][:, 0], -plain["xyz"][0][:, 0])
    turned = run(CFG, 1, View(turns=1))  # np.rot90: (row, col) -> (W - 1 - col, row)
    for level, (a, b) in enumerate(zip(plain["pixels"], turned["pixels"], strict=True)):
        np.testing.assert_array_equal(b[:, 0], SIZE // 2**level - 1 - a[:, 1])
        np.testing.assert_array_equal(b[:, 1], a[:, 0])
    xy, turned_xy = plain["xyz"][0][:, :2], turned["xyz"][0][:, :2]  # east -> north
    np.testing.assert_array_equal(turned_xy, np.stack([-xy[:, 1], xy[:, 0]], axis=1))

    xyz = plain["xyz"][0].astype(np.float64)
    moved, record = augment(xyz, np.random.default_rng(2), jitter=0.0)
    assert 0.9 <= record.scale <= 1.1
    np.testing.assert_allclose(moved.mean(0), 0.0, atol=1e-5)
    dist = np.linalg.norm(xyz[1:50] - xyz[0], axis=1)
    moved_dist = np.linalg.norm(moved[1:50] - moved[0], axis=1)
    np.testing.assert_allclose(moved_dist, record.scale * dist, rtol=1e-4)


@pytest.mark.parametrize("rotate", [False, True])
def test_dataset_views_move_image_mask_and_points_together(
    train: N3CCalifornia, rotate: bool
) -> None:
    """Random flips (and quarter turns) move image, mask and point pixels as one."""
    index = _richest(train)  # trees and buildings: a wrong view would break point-mask agreement
    aug = N3CCalifornia(
        train.root, "train", point_config=replace(CFG, augment=True),
        augment=TileAugment(flip=True, rotate=rotate),
    )  # fmt: skip
    plain = train[index]
    views = [View(flip, turns) for flip in (False, True) for turns in range(4 if rotate else 1)]
    seen = set()
    # draw until every view has appeared (~22 draws expected for 8 views): a fixed small number
    # of seeds made the coverage check depend on which tile is richest and on the RNG stream
    for seed in range(64):
        if len(seen) == len(views):
            break
        aug.seed = seed
        sample = aug[index]
        matches = [
            v for v in views if np.array_equal(v.apply(plain["image"].numpy()), sample["image"])
        ]
        view = matches[0]
        assert np.array_equal(view.apply(plain["mask"].numpy()), sample["mask"])
        # points under a canopy disagree with the (top-surface) mask, so compare with the mask
        # of the wrong view: ~0.72 vs ~0.56 agreement on this tile for a flip
        rows, cols = sample["points"]["pixels"][0].unbind(-1)
        labels = sample["point_labels"]
        agreement = []
        wrong = View(not view.flip, view.turns).apply(plain["mask"].numpy())
        for mask in (sample["mask"], torch.from_numpy(wrong)):
            known = (mask[rows, cols] != UNLABELED) & (labels != UNLABELED)
            agreement.append((mask[rows, cols][known] == labels[known]).float().mean())
        assert agreement[0] > agreement[1] + 0.1
        assert torch.equal(aug[index]["points"]["xyz"][0], sample["points"]["xyz"][0])  # seeded
        seen.add(view)
    assert seen == set(views)


def test_colour_jitter_changes_bands_affinely(train: N3CCalifornia) -> None:
    jittered = N3CCalifornia(
        train.root, "train", point_config=replace(CFG, augment=True), seed=1,
        augment=TileAugment(flip=False, jitter=0.2),
    )  # fmt: skip
    plain, moved = train[0]["image"].numpy(), jittered[0]["image"].numpy()
    for band in range(plain.shape[0]):
        slope, offset = np.polyfit(plain[band].ravel(), moved[band].ravel(), 1)
        assert 0.8 <= slope <= 1.2 and abs(offset) <= 0.2 and slope != 1.0
    with pytest.raises(ValueError, match="jitter"):
        TileAugment(jitter=1.5)


def test_dataloader_batch_runs_ikdnet(train: N3CCalifornia) -> None:
    batch = next(iter(DataLoader(train, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (2, 4, SIZE, SIZE) and batch["mask"].shape == (2, SIZE, SIZE)
    assert batch["point_labels"].shape == (2, 2048) and len(batch["tile_id"]) == 2
    points = batch["points"]
    assert [t.shape[1] for t in points["xyz"]] == [2048, 512, 128, 32, 8]
    assert points["features"].shape == (2, 2048, 2)
    model = create_model(
        "ikdnet", in_channels=4, widths=(8, 16, 16, 32), point_widths=(4, 8, 8, 16)
    ).eval()
    with torch.no_grad():
        out = model(batch)
    assert out["logits"].shape == (2, 5, SIZE, SIZE)
    assert out["point_logits"].shape == (2, 2048, 5)
    assert torch.isfinite(out["logits"]).all()


def test_torchgeo_raster_datasets_with_random_geo_sampler(sample_build: Path) -> None:
    ds = N3CImage(tile_files(sample_build, "train", "image")) & N3CLabel(
        tile_files(sample_build, "train", "label")
    )
    sampler = RandomGeoSampler(ds, size=32, length=4)
    batch = next(iter(DataLoader(ds, sampler=sampler, batch_size=2, collate_fn=stack_samples)))
    assert batch["image"].shape == (2, 4, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 32, 32) and batch["mask"].max() <= 4
    assert batch["image"].max() > 0
    assert len(N3CImage(sample_build / "tiles")) > len(
        N3CImage(tile_files(sample_build, "val", "image"))
    )


def test_torchgeo_segmentation_task_trains_on_the_raster_datasets(
    sample_build: Path, tmp_path: Path
) -> None:
    """The image-only baseline with TorchGeo's own trainer, normalised and weighted from the
    build's stats.json (train split) exactly as geoseg's task is (docs/ikdnet.md)."""
    stats = json.loads((sample_build / "stats.json").read_text())["splits"]["train"]
    bands = stats["bands"]
    mean = torch.tensor([bands[b]["mean"] for b in N3CImage.all_bands]).view(-1, 1, 1)
    std = torch.tensor([bands[b]["std"] for b in N3CImage.all_bands]).view(-1, 1, 1)

    def normalise(sample: dict) -> dict:
        return sample | {"image": (sample["image"] - mean) / std}

    def loader(split: str) -> DataLoader:
        ds = N3CImage(tile_files(sample_build, split, "image"), transforms=normalise) & N3CLabel(
            tile_files(sample_build, split, "label")
        )
        sampler = RandomGeoSampler(ds, size=64, length=4)
        return DataLoader(ds, sampler=sampler, batch_size=2, collate_fn=stack_samples)

    task = SemanticSegmentationTask(
        backbone="resnet18",
        in_channels=4,
        num_classes=len(CLASS_NAMES),
        ignore_index=UNLABELED,
        class_weights=class_weights(stats["pixels"]),
    )
    before = [p.detach().clone() for p in task.parameters()]
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, train_dataloaders=loader("train"), val_dataloaders=loader("val"))
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, task.parameters(), strict=True))


def test_balanced_sampling_draws_tiles_by_their_class_weights(sample_build: Path) -> None:
    """`tile_weights`: the mean class weight of a tile's labelled pixels; the data module draws
    an epoch of that many tiles with these probabilities."""
    names = ("unlabeled", "others", "ground", "tree", "building")
    weights = [0.0, 40.0, 1.0, 5.0, 40.0]
    tiles = split_tiles(sample_build, "train")
    scores = tile_weights(sample_build, "train", names, weights)
    index = pd.read_parquet(sample_build / "index.parquet").set_index("tile_id")
    fractions = index.loc[tiles["tile_id"], [f"frac_{n}" for n in names[1:]]].to_numpy()
    np.testing.assert_allclose(scores, fractions @ np.array(weights[1:]))
    teak = tiles["tile_id"].str.startswith("32611").to_numpy()  # NEON TEAK: trees
    assert scores[teak].mean() > 2 * scores[~teak].mean()
    dm = N3CDataModule(sample_build, point_config=CFG, epoch_tiles=400, tile_weights=scores)
    dm.setup("fit")
    torch.manual_seed(0)
    drawn = list(dm.train_dataloader().sampler)
    assert len(drawn) == 400
    share = teak[drawn].mean()
    assert share == pytest.approx(scores[teak].sum() / scores.sum(), abs=0.08) and share > 0.4


def test_datamodule_setup_fit(sample_build: Path) -> None:
    dm = N3CDataModule(sample_build, batch_size=2, point_config=PointConfig(num_points=2048))
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "val"}
    assert dm.datasets["train"].point_config.augment is False
    assert dm.datasets["val"].seed == 0
    assert len(dm.train_dataloader()) == -(-len(split_tiles(sample_build, "train")) // 2)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 4, SIZE, SIZE)
    default = N3CDataModule(sample_build, point_config=PointConfig(num_points=2048, augment=True))
    default.setup("fit")
    assert default.datasets["train"].point_config.augment
    assert not default.datasets["val"].point_config.augment


def test_bad_inputs(sample_build: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build folder not found"):
        N3CCalifornia(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        N3CCalifornia(sample_build, "validation")
    with pytest.raises(ValueError, match="unknown band"):
        N3CCalifornia(sample_build, bands=("red", "swir"), point_config=CFG)
    with pytest.raises(ValueError, match="no bands"):
        N3CCalifornia(sample_build, bands=(), point_config=CFG)
    with pytest.raises(ValueError, match="unknown band preset"):
        N3CCalifornia(sample_build, bands="rgbx", point_config=CFG)
    with pytest.raises(ValueError, match="too few"):
        PointConfig(num_points=500)
    with pytest.raises(FileNotFoundError, match=r"index\.parquet not found"):
        N3CCalifornia(tmp_path)
    index = pd.read_parquet(sample_build / "index.parquet")
    index[index["split"] == "train"].to_parquet(tmp_path / "index.parquet")
    with pytest.raises(ValueError, match=r"split 'test' of .* has no tiles \(splits: train\)"):
        N3CCalifornia(tmp_path, "test")
    escaping = index.assign(path="../elsewhere")
    escaping.to_parquet(tmp_path / "index.parquet")
    with pytest.raises(ValueError, match=r"index path \.\./elsewhere is outside"):
        N3CCalifornia(tmp_path, "train")
    index[index["split"] == "train"].to_parquet(tmp_path / "index.parquet")
    with pytest.raises(FileNotFoundError, match=r"stats\.json not found"):
        N3CCalifornia(tmp_path, "train")
    shutil.copy(sample_build / "stats.json", tmp_path)
    with pytest.raises(ValueError, match="divisible by 2\\^levels = 128"):
        N3CCalifornia(tmp_path, "train", point_config=PointConfig(num_points=2**20, levels=7))


def _count_points(path: Path, out: multiprocessing.Queue) -> None:
    out.put(len(read_points(path)["x"]))


def test_forked_loader_worker_reads_points_after_the_parent_did(train: N3CCalifornia) -> None:
    """A training run forks its DataLoader workers after the parent has read LAZ (statistics,
    sanity checks, earlier runs in one process): with lazrs's parallel backend the child hung
    for ever in `read_n_points` (seen in the full suite as a stuck `geoseg train`)."""
    path = train.folders[0] / "points.laz"
    expected = len(laspy.read(path, laz_backend=laspy.LazBackend.LazrsParallel).points)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_count_points, args=(path, out))
    child.start()
    child.join(60)
    hung = child.is_alive()
    child.kill()
    assert not hung, "a forked worker hung reading points.laz"
    assert out.get(timeout=5) == expected
