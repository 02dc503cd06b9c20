"""Training-time readers of built datasets: torch/TorchGeo datasets and a fast cached path."""

from geoseg.datasets.cache import LAYERS, TileCacheDataset, build_cache
from geoseg.datasets.n3c import (
    BAND_PRESETS,
    N3CCalifornia,
    N3CDataModule,
    N3CImage,
    N3CLabel,
    collate,
    tile_files,
)
from geoseg.datasets.points import PointConfig, prepare_points
from geoseg.datasets.splits import SPLITS, split_tiles

__all__ = [
    "BAND_PRESETS",
    "LAYERS",
    "SPLITS",
    "N3CCalifornia",
    "N3CDataModule",
    "N3CImage",
    "N3CLabel",
    "PointConfig",
    "TileCacheDataset",
    "build_cache",
    "collate",
    "prepare_points",
    "split_tiles",
    "tile_files",
]
