"""Spatially blocked train/val/test split with a buffer, so no split leaks into a neighbour.

Random per-tile splits put near-identical neighbouring tiles into train and test and inflate
scores. Here tiles are grouped into square blocks of `block` x `block` tiles, whole blocks are
assigned to splits by a seeded hash, and then any tile touching (8-neighbourhood) a tile of a
higher-priority split (test > val > train) becomes `buffer`: kept on disk, used by no split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

SPLITS = ("train", "val", "test")
BUFFER = "buffer"
_PRIORITY = {"test": 2, "val": 1, "train": 0}


def _key(grid: str, block: tuple[int, int], seed: int) -> str:
    return hashlib.sha256(f"{seed}:{grid}:{block[0]}:{block[1]}".encode()).hexdigest()


def assign_splits(
    cells: Iterable[tuple[str, str, int, int]],
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15),
    block: int = 8,
    seed: int = 0,
) -> dict[str, str]:
    """Map tile id -> split for cells given as (tile_id, grid_key, col, row).

    `grid_key` separates grids (CRS + tile size): cells of different grids never neighbour.
    Blocks are dealt to splits in hash order until each split's tile share reaches its ratio, so
    small datasets still get a val and a test block whenever there are three or more blocks.
    """
    cells = list(cells)
    blocks: dict[tuple[str, int, int], list[str]] = {}
    where: dict[tuple[str, int, int], str] = {}
    for tid, grid, col, row in cells:
        bkey = (grid, col // block, row // block)
        blocks.setdefault(bkey, []).append(tid)
        where[(grid, col, row)] = tid
    order = sorted(blocks, key=lambda b: _key(b[0], (b[1], b[2]), seed))
    total = len(cells)
    block_split: dict[tuple[str, int, int], str] = {}
    if len(order) >= 3:
        # Smallest non-train splits first: guarantee one block each, then fill by tile share.
        block_split[order[0]] = "test"
        block_split[order[1]] = "val"
    counts = {s: sum(len(blocks[b]) for b, v in block_split.items() if v == s) for s in SPLITS}
    for b in order:
        if b in block_split:
            continue
        deficit = {s: ratios[i] * total - counts[s] for i, s in enumerate(SPLITS)}
        choice = max(SPLITS, key=lambda s: (deficit[s], -_PRIORITY[s]))
        block_split[b] = choice
        counts[choice] += len(blocks[b])

    split = {tid: block_split[b] for b, tids in blocks.items() for tid in tids}
    final = dict(split)
    for tid, grid, col, row in cells:
        mine = _PRIORITY[split[tid]]
        for dc in (-1, 0, 1):
            for dr in (-1, 0, 1):
                other = where.get((grid, col + dc, row + dr))
                if other is not None and _PRIORITY[split[other]] > mine:
                    final[tid] = BUFFER
    return final
