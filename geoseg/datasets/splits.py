"""The tiles of one split of a build, from its `index.parquet`: the one reader of that index
for training, so every dataset and the training cache agree on the tiles, their order and the
error a user sees for a wrong folder or split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from geoseg.builder.split import BUFFER
from geoseg.builder.split import SPLITS as BUILD_SPLITS

SPLITS = (*BUILD_SPLITS, BUFFER)
"""Split names of index.parquet; `buffer` tiles separate the others and are normally unused."""


def split_tiles(root: str | Path, split: str) -> pd.DataFrame:
    """Rows (tile_id, split, path, size) of one split sorted by tile id, so caches and datasets
    keep a stable order; one-line errors for the usual mistakes."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"build folder not found: {root}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    index = root / "index.parquet"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found; is {root} a geoseg build-dataset output?")
    table = pd.read_parquet(index, columns=["tile_id", "split", "path", "size"])
    tiles = table[table["split"] == split].sort_values("tile_id").reset_index(drop=True)
    if tiles.empty:
        have = ", ".join(sorted(table["split"].unique())) or "none"
        raise ValueError(f"split {split!r} of {root} has no tiles (splits: {have})")
    inside = root.resolve()
    for path in tiles["path"]:
        if inside not in (root / path).resolve().parents:
            raise ValueError(f"index path {path} is outside {root}")
    return tiles
