"""Spatially blocked train/val/test split with a buffer, so no split leaks into a neighbour.

Random per-tile splits put near-identical neighbouring tiles into train and test and inflate
scores. Here tiles are grouped into square blocks of `block` x `block` tiles, whole blocks are
assigned to splits by a seeded hash, and then any tile touching (8-neighbourhood) a tile of a
higher-priority split (test > val > train) becomes `buffer`: kept on disk, used by no split.

Blocks are dealt within each grid (CRS + tile size; at state scale, a UTM zone), each grid to
the ratios on its own. Dealt over all grids at once, a small grid could end up with no val or
no test block at all: the sample's scattered NEON TEAK plots had train and test but no val, so
choosing a checkpoint by val mIoU never saw a tree. Per grid, every site with three or more
blocks is in all three splits.

The work is done on arrays (`split_codes`): a state-wide build splits 1.6 M tiles at its end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

SPLITS = ("train", "val", "test")
BUFFER = "buffer"
NAMES = (*SPLITS, BUFFER)
"""Split names by code, as `split_codes` returns them."""
_PRIORITY = {"test": 2, "val": 1, "train": 0}
_CODE_PRIORITY = np.array([_PRIORITY[s] for s in SPLITS] + [-1])
_OFFSET = 1 << 25  # col/row (±33 M) packed into 26 bits each, the grid above them


def _key(grid: str, block: tuple[int, int], seed: int) -> str:
    return hashlib.sha256(f"{seed}:{grid}:{block[0]}:{block[1]}".encode()).hexdigest()


def _deal(
    blocks: np.ndarray,
    sizes: np.ndarray,
    out: np.ndarray,
    grids: list[str],
    ratios: tuple[float, float, float],
    seed: int,
) -> None:
    """Deal one grid's blocks (rows of grid, bx, by; tile counts `sizes`) to splits in `out`."""
    order = sorted(
        range(len(blocks)),
        key=lambda b: _key(grids[blocks[b, 0]], (int(blocks[b, 1]), int(blocks[b, 2])), seed),
    )
    if len(order) >= 3:
        # Smallest non-train splits first: guarantee one block each, then fill by tile share.
        out[order[0]], out[order[1]] = 2, 1
    n = int(sizes.sum())
    counts = [int(sizes[out == s].sum()) for s in range(len(SPLITS))]
    for b in order:
        if out[b] >= 0:
            continue
        deficit = [ratios[s] * n - counts[s] for s in range(len(SPLITS))]
        choice = max(range(len(SPLITS)), key=lambda s: (deficit[s], -_CODE_PRIORITY[s]))
        out[b] = choice
        counts[choice] += int(sizes[b])


def split_codes(
    grids: list[str],
    grid: np.ndarray,
    col: np.ndarray,
    row: np.ndarray,
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    block: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """Split code (index into `NAMES`) of each cell given as arrays.

    `grid[i]` indexes `grids`, the names that separate grids (CRS + tile size): cells of
    different grids never neighbour. Within each grid, blocks are dealt to splits in hash order
    until each split's share of that grid's tiles reaches its ratio, so every grid with three or
    more blocks gets a val and a test block.
    """
    n = len(col)
    if n == 0:
        return np.zeros(0, np.int8)
    bx, by = np.floor_divide(col, block), np.floor_divide(row, block)
    blocks, of_cell, sizes = np.unique(
        np.stack([grid, bx, by], axis=1), axis=0, return_inverse=True, return_counts=True
    )
    of_cell = of_cell.ravel()
    block_split = np.full(len(blocks), -1, np.int8)
    # `blocks` is sorted by grid first, so each grid's blocks are one contiguous run.
    starts = np.flatnonzero(np.r_[True, blocks[1:, 0] != blocks[:-1, 0]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(blocks)], strict=True):
        _deal(blocks[lo:hi], sizes[lo:hi], block_split[lo:hi], grids, ratios, seed)

    split = block_split[of_cell]
    keys = (grid.astype(np.int64) << 52) | ((col + _OFFSET) << 26) | (row + _OFFSET)
    by_key = np.argsort(keys, kind="stable")
    sorted_keys = keys[by_key]
    mine = _CODE_PRIORITY[split]
    strongest = np.full(n, -1)
    for dc in (-1, 0, 1):
        for dr in (-1, 0, 1):
            if dc == dr == 0:
                continue
            wanted = keys + (dc << 26) + dr
            at = np.minimum(np.searchsorted(sorted_keys, wanted), n - 1)
            found = sorted_keys[at] == wanted
            neighbour = np.where(found, mine[by_key[at]], -1)
            strongest = np.maximum(strongest, neighbour)
    return np.where(strongest > mine, NAMES.index(BUFFER), split).astype(np.int8)


def assign_splits(
    cells: Iterable[tuple[str, str, int, int]],
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    block: int = 8,
    seed: int = 0,
) -> dict[str, str]:
    """Map tile id -> split for cells given as (tile_id, grid_key, col, row)."""
    cells = list(cells)
    grids = sorted({g for _, g, _, _ in cells})
    codes = split_codes(
        grids,
        np.array([grids.index(g) for _, g, _, _ in cells], np.int64),
        np.array([c for _, _, c, _ in cells], np.int64),
        np.array([r for _, _, _, r in cells], np.int64),
        ratios,
        block,
        seed,
    )
    return {tid: NAMES[code] for (tid, _, _, _), code in zip(cells, codes, strict=True)}
