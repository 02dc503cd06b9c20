"""Torch, TorchGeo and Lightning views of a `geoseg build-dataset` folder (N3C-California layout).

`N3CCalifornia` is the multi-modal tile dataset the models train on: one sample = one tile's
normalised image, label mask and point pyramid (`geoseg.datasets.points`); `collate` stacks
samples into the model batch contract (`geoseg.models.batch.Batch`, plus targets).
`N3CImage` / `N3CLabel` expose the same COGs as TorchGeo `RasterDataset`s, so TorchGeo's
geo-samplers can cut arbitrary windows across tiles (image and mask only: points need the tile).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import rasterio
import torch
from affine import Affine
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, WeightedRandomSampler
from torchgeo.datasets import NonGeoDataset, RasterDataset

from geoseg.classes import build_classes
from geoseg.datasets.cache import TileCache, build_cache
from geoseg.datasets.points import (
    PointConfig,
    TileAugment,
    View,
    read_points,
    sample_points,
    select_points,
)
from geoseg.datasets.splits import split_stats, split_tiles
from geoseg.models.batch import neighbour_indices

LAYER_BANDS: dict[str, tuple[str, ...]] = {
    "image": ("red", "green", "blue", "nir"),
    "dsm": ("dsm",),
    "intensity": ("intensity",),
}
"""Raster layer (`<layer>.tif`) -> its bands in file order; names are those of stats.json."""

BAND_PRESETS: dict[str, tuple[str, ...]] = {
    "rgb": ("red", "green", "blue"),
    "rgbn": ("red", "green", "blue", "nir"),
    "rgbn+dsm+intensity": ("red", "green", "blue", "nir", "dsm", "intensity"),
}


def build_band_layout(root: Path) -> dict[str, Any]:
    """A build's `stats.json` band entries (where each band lives), {} when it has none."""
    path = root / "stats.json"
    return json.loads(path.read_text()).get("bands", {}) if path.is_file() else {}


def _band_layer(band: str, stats: dict[str, Any] | None = None) -> tuple[str, int]:
    """(layer, 1-based band index) of a band name.

    A build's stats.json may place a band itself (`bands.<name>.layer` and `.band`), which is
    how prepared benchmarks add layers (DFC2018's `hsi.tif`, its three intensities); bands it
    doesn't place are looked up in `LAYER_BANDS`, the N3C layout.
    """
    entry = (stats or {}).get(band, {})
    if "layer" in entry and "band" in entry:
        return entry["layer"], int(entry["band"])
    for layer, names in LAYER_BANDS.items():
        if band in names:
            return layer, names.index(band) + 1
    known = list(stats or {}) or [b for names in LAYER_BANDS.values() for b in names]
    raise ValueError(f"unknown band {band!r}; choose from {known} or presets {list(BAND_PRESETS)}")


def band_names(bands: str | Sequence[str]) -> tuple[str, ...]:
    """Band names of a preset or a list of names."""
    if isinstance(bands, str) and bands not in BAND_PRESETS:
        raise ValueError(f"unknown band preset {bands!r}; choose from {list(BAND_PRESETS)}")
    return BAND_PRESETS[bands] if isinstance(bands, str) else tuple(bands)


def points_to_tensors(pts: dict[str, Any]) -> dict[str, Any]:
    """The point pipeline's numpy arrays (lists per level) as tensors, sharing memory."""
    return {
        key: [torch.from_numpy(a) for a in value]
        if isinstance(value, list)
        else torch.from_numpy(value)
        for key, value in pts.items()
    }


def tile_files(root: str | Path, split: str, layer: str) -> list[Path]:
    """`<layer>.tif` of every tile of a split, to restrict `N3CImage`/`N3CLabel` to that split."""
    return [Path(root) / p / f"{layer}.tif" for p in split_tiles(root, split)["path"]]


class N3CCalifornia(NonGeoDataset):
    """One split of a build: image + mask + point pyramid per tile.

    Sample keys: image float32 (C, H, W) normalised (nodata -> 0, the mean) with `mean_std`,
    by default the band statistics of the build's *train* split (stats.json), for every split;
    mask int64 (H, W) (0 = unlabeled); points (`PointsBatch` tensors without batch axis);
    point_labels int64 (N,); tile_id. `bands` is a preset of `BAND_PRESETS` or band names.

    Randomness (point sampling, augmentation): with `seed` an int, item i always draws from
    seed (seed, i), which suits val/test. With None it is drawn from torch's RNG, which
    DataLoader seeds per worker and epoch, so `lightning.seed_everything` makes training
    reproducible while every epoch sees new samples.

    Augmentation is on when `point_config.augment` is: the points' own (rotation, scale,
    jitter) and the tile's, `augment` (a random flip by default; quarter turns and colour
    jitter on request), which moves the image, mask and points together.

    `neighbours=False` leaves the kNN indices out of `points`: a GPU trainer computes them for
    the whole batch on the device (`N3CDataModule.on_after_batch_transfer`).
    `score_points` adds `point_counts` (N, K) int32: the labels of the tile's points that each
    sampled point stands for (`geoseg.datasets.points.label_counts`), so point metrics count
    every point of the tile once rather than the padded sample.

    `cache`: a training cache of this split holding the bands' layers, the label and the points
    (`build_cache(root, split, point_grid=point_config.grid_size)`); samples then read the pixels
    from memory maps and slice the thinned points instead of decoding COGs and points.laz, with
    identical results (the same steps run on the same raw values).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        bands: str | Sequence[str] = "rgbn",
        point_config: PointConfig | None = None,
        seed: int | None = None,
        neighbours: bool = True,
        cache: str | Path | None = None,
        mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
        augment: TileAugment | None = None,
        score_points: bool = False,
    ) -> None:
        self.root = Path(root)
        self.augment = augment or TileAugment()
        self.score_points = score_points
        tiles = split_tiles(self.root, split)
        self.bands = band_names(bands)
        if not self.bands:
            raise ValueError("no bands selected")
        layout = build_band_layout(self.root)
        self._sources = [_band_layer(b, layout) for b in self.bands]
        self.num_classes = len(build_classes(self.root))
        if mean_std is None:
            stats = split_stats(self.root, "train")["bands"]
            mean_std = [stats[b]["mean"] for b in self.bands], [stats[b]["std"] for b in self.bands]
        self.mean = np.array(mean_std[0], np.float32)
        self.std = np.array([s or 1.0 for s in mean_std[1]], np.float32)
        self.point_config = point_config or PointConfig()
        step = 2**self.point_config.levels
        if (tiles["size"] % step).any():
            raise ValueError(f"tile sizes must be divisible by 2^levels = {step}")
        self.split = split
        self.seed = seed
        self.neighbours = neighbours
        self.tile_ids: list[str] = tiles["tile_id"].tolist()
        self.folders = [self.root / p for p in tiles["path"]]
        self.cache = TileCache(cache) if cache is not None else None
        if self.cache is not None:
            needed = {*(layer for layer, _ in self._sources), "label"}
            if self.cache.tile_ids != self.tile_ids:
                raise ValueError(f"the cache {cache} holds other tiles than split {split!r}")
            if not needed <= self.cache.layers.keys():
                raise ValueError(f"the cache {cache} lacks some of the layers {sorted(needed)}")
            if self.cache.grid_size != self.point_config.grid_size:
                raise ValueError(
                    f"the cache {cache} holds points thinned at grid_size {self.cache.grid_size},"
                    f" not {self.point_config.grid_size}"
                )

    def __len__(self) -> int:
        return len(self.tile_ids)

    def read_image(self, index: int) -> tuple[np.ndarray, Affine]:
        """Normalised (C, H, W) float32 image of the configured bands and its geotransform."""
        layers: dict[str, np.ndarray] = {}
        transform = Affine.identity()
        for layer in dict.fromkeys(layer for layer, _ in self._sources):  # each file once
            if self.cache is not None:
                raw, nodata = self.cache.layer(index, layer), self.cache.layers[layer]["nodata"]
                transform = self.cache.transform(index)
            else:
                with rasterio.open(self.folders[index] / f"{layer}.tif") as src:
                    raw, nodata, transform = src.read(), src.nodata, src.transform
            data = raw.astype(np.float32)
            if nodata is not None:
                data[data == nodata] = np.nan
            layers[layer] = data
        channels = np.stack([layers[layer][band - 1] for layer, band in self._sources])
        image = (channels - self.mean[:, None, None]) / self.std[:, None, None]
        return np.nan_to_num(image, nan=0.0).astype(np.float32), transform

    def read_points(self, index: int) -> dict[str, np.ndarray]:
        """The LAS fields the point pipeline uses, x/y/z as float64 map coordinates."""
        return read_points(self.folders[index] / "points.laz")

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        return np.random.default_rng([self.seed, index])

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, transform = self.read_image(index)
        if self.cache is not None:
            mask = self.cache.layer(index, "label")[0].astype(np.int64)
        else:
            with rasterio.open(self.folders[index] / "label.tif") as src:
                mask = src.read(1).astype(np.int64)
        rng = self._rng(index)
        cfg = self.point_config
        view = View.draw(rng, self.augment.flip, self.augment.rotate) if cfg.augment else None
        if self.cache is not None:
            points = self.cache.points(index)
        else:
            points = select_points(self.read_points(index), cfg.grid_size)
        pts = sample_points(
            points,
            transform,
            mask.shape,
            cfg,
            rng,
            view,
            self.neighbours,
            self.score_points,
            self.num_classes,
        )
        if view is not None:
            image, mask = view.apply(image), view.apply(mask)
        if cfg.augment and self.augment.jitter > 0:
            image = self.augment.colour(image, rng)
        labels = pts.pop("labels")
        sample = {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask),
            "point_labels": torch.from_numpy(labels),
            "tile_id": self.tile_ids[index],
        }
        if "label_counts" in pts:
            sample["point_counts"] = torch.from_numpy(pts.pop("label_counts"))
        sample["points"] = points_to_tensors(pts)
        return sample


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack `N3CCalifornia` samples into a model `Batch` plus mask, point_labels, tile_id (and
    point_counts when scored)."""

    def stack(key: str) -> Tensor:
        return torch.stack([s[key] for s in samples])

    first = samples[0]["points"]
    points = {
        key: [torch.stack([s["points"][key][i] for s in samples]) for i in range(len(value))]
        if isinstance(value, list)
        else torch.stack([s["points"][key] for s in samples])
        for key, value in first.items()
    }
    batch = {
        "image": stack("image"),
        "mask": stack("mask"),
        "points": points,
        "point_labels": stack("point_labels"),
        "tile_id": [s["tile_id"] for s in samples],
    }
    if "point_counts" in samples[0]:
        batch["point_counts"] = stack("point_counts")
    return batch


class N3CImage(RasterDataset):
    """The tiles' `image.tif` (uint8 R, G, B, NIR; 0 = nodata) as a TorchGeo raster dataset.

    paths: the build's `tiles/` folder (all splits) or `tile_files(root, split, "image")`.
    """

    filename_glob = "image.tif"
    is_image = True
    all_bands = LAYER_BANDS["image"]
    rgb_bands = BAND_PRESETS["rgb"]


class N3CLabel(RasterDataset):
    """The tiles' `label.tif` (N3C class, 0 = unlabeled) as a TorchGeo mask dataset."""

    filename_glob = "label.tif"
    is_image = False


class N3CDataModule(L.LightningDataModule):
    """train/val/test loaders of one build; val and test are seeded and score every point of
    their tiles (`score_points`), train is augmented (`augment` for the tile-level part).

    `epoch_tiles`: a training epoch is that many tiles drawn at random with replacement, as in
    the released config (2000 per epoch); None = one shuffled pass over the train split.
    `tile_weights` (train tiles in split order, e.g. `splits.tile_weights`): draw the epoch's
    tiles with these probabilities instead of uniformly.
    `mean_std`: image normalisation, by default the train split's band statistics.
    `neighbours=False`: the workers skip the kNN indices (see `N3CCalifornia`) and
    `on_after_batch_transfer` computes them for the whole batch on the training device.
    `cache_dir`: read tiles from a training cache there (`<cache_dir>/<split>`), built on
    `setup` if missing or stale; build it from one process (`geoseg train` does, before DDP).
    """

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 2,
        num_workers: int = 0,
        bands: str | Sequence[str] = "rgbn",
        point_config: PointConfig | None = None,
        seed: int = 0,
        neighbours: bool = True,
        cache_dir: str | Path | None = None,
        epoch_tiles: int | None = None,
        augment: TileAugment | None = None,
        mean_std: tuple[Sequence[float], Sequence[float]] | None = None,
        tile_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if epoch_tiles is not None and epoch_tiles < 1:
            raise ValueError(f"epoch_tiles must be >= 1, got {epoch_tiles}")
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.bands = bands
        self.point_config = point_config or PointConfig(augment=True)
        self.seed = seed
        self.neighbours = neighbours
        self.cache_dir = cache_dir
        self.epoch_tiles = epoch_tiles
        self.augment = augment
        self.mean_std = mean_std
        self.tile_weights = tile_weights
        self.datasets: dict[str, N3CCalifornia] = {}

    def _dataset(self, split: str) -> N3CCalifornia:
        cache = None
        if self.cache_dir is not None:
            bands = band_names(self.bands)
            layout = build_band_layout(self.root)
            layers = [*dict.fromkeys(_band_layer(band, layout)[0] for band in bands), "label"]
            grid = self.point_config.grid_size
            cache = build_cache(self.root, split, self.cache_dir, layers, point_grid=grid)
        train = split == "train"
        cfg = self.point_config if train else replace(self.point_config, augment=False)
        seed = None if train else self.seed
        return N3CCalifornia(
            self.root, split, self.bands, cfg, seed, self.neighbours, cache,
            mean_std=self.mean_std, augment=self.augment, score_points=not train,
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for split in splits.get(stage, ()) if stage else ("train", "val", "test"):
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset, sampler = self.datasets[split], None
        # Lightning wraps these in a distributed sampler under DDP: N tiles per epoch in all
        if shuffle and self.tile_weights is not None:
            draws = self.epoch_tiles or len(dataset)
            sampler = WeightedRandomSampler(list(self.tile_weights), draws, replacement=True)
            shuffle = False
        elif shuffle and self.epoch_tiles is not None:
            sampler = RandomSampler(dataset, replacement=True, num_samples=self.epoch_tiles)
            shuffle = False
        trainer = self.trainer
        if not shuffle and trainer is not None and 1 < trainer.world_size <= len(dataset):
            # Lightning's DistributedSampler would repeat tiles to give every rank as many
            # batches; metrics (confusion matrices summed over ranks) must see each tile once.
            # Safe in evaluation as long as every rank has a batch: DDP syncs buffers only on
            # the first forward after training (fewer tiles than ranks keep Lightning's way).
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> Any:
        """The kNN indices the workers left out, batched on the device the batch is on."""
        points = batch["points"]
        if "neighbors" not in points:
            points.update(neighbour_indices(points["xyz"], self.point_config.k))
        return batch

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
