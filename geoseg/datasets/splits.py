"""The tiles of one split of a build (`index.parquet`) and its statistics (`stats.json`): the one
reader of both for training, so every dataset and the training cache agree on the tiles, their
order, the statistics and the error a user sees for a wrong folder or split."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoseg.builder.split import BUFFER
from geoseg.builder.split import SPLITS as BUILD_SPLITS

SPLITS = (*BUILD_SPLITS, BUFFER)
"""Split names of index.parquet; `buffer` tiles separate the others and are normally unused."""


def _build_folder(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"build folder not found: {root}")
    return root


def split_tiles(root: str | Path, split: str) -> pd.DataFrame:
    """Rows (tile_id, split, path, size) of one split sorted by tile id, so caches and datasets
    keep a stable order; one-line errors for the usual mistakes."""
    root = _build_folder(root)
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


def split_stats(root: str | Path, split: str = "train") -> dict[str, Any]:
    """One split's statistics from `<root>/stats.json` (bands, pixels, points, asprs).

    Training normalises and weights classes with the *train* split only: statistics summed over
    every split would leak val and test into the model. A stats.json written before geoseg kept
    per-split statistics is refused with the fix: rerunning build-dataset with the same
    arguments reuses every finished tile and only rewrites the statistics.
    """
    path = _build_folder(root) / "stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; rebuild with geoseg build-dataset")
    stats = json.loads(path.read_text())
    if split not in stats.get("splits", {}):
        raise ValueError(
            f"{path} has no per-split statistics (an older build): rerun geoseg build-dataset "
            "with the same arguments to rewrite them (finished tiles are reused, not rebuilt)"
        )
    return stats["splits"][split]


def tile_weights(
    root: str | Path, split: str, class_names: Sequence[str], weights: Sequence[float]
) -> np.ndarray:
    """Sampling weight of each tile of a split (in `split_tiles` order): the mean class weight
    of its labelled pixels, Σ_c frac_c · w_c, from index.parquet's class fractions.

    Drawing tiles with these weights shows rare classes more often in proportion to the same
    weights the loss uses; a tile without labelled pixels gets the smallest weight of the rest.
    """
    tiles = split_tiles(root, split)
    columns = [f"frac_{name}" for name in class_names[1:]]
    table = pd.read_parquet(Path(root) / "index.parquet", columns=["tile_id", *columns])
    fractions = tiles[["tile_id"]].merge(table, on="tile_id", how="left")[columns]
    scores = fractions.fillna(0.0).to_numpy() @ np.asarray(weights[1:], dtype=np.float64)
    labelled = scores > 0
    if not labelled.any():
        return np.ones(len(tiles))
    scores[~labelled] = scores[labelled].min()
    return scores
