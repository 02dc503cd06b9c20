"""Exact k-nearest-neighbour search: scipy's KD-tree on CPU arrays, a uniform grid for torch.

Why a grid on the GPU: a KD-tree is a pointer-chasing, branchy traversal that GPUs run badly,
and brute force over one 131072-point tile costs 1.7·10¹⁰ distances (277 ms on an H200). A
uniform grid turns the search into sorts, gathers and one small top-k, all batched over tiles:

1. every reference point gets an integer cell (size h per tile) and a key (tile, x, y, z); one
   stable sort of the keys makes each occupied cell, and each column of 3 cells along z, a
   contiguous range of the sorted points;
2. every query gathers the points of the 3×3×3 block of cells around its own cell (9 column
   ranges, padded to the largest candidate count of its chunk) and keeps the k smallest;
3. the result is *proven* exact when the k-th distance is below the distance from the query to
   the block's boundary: any point outside the block is at least that far. Faces at the edge of
   the grid are open (no point lies beyond them);
4. the queries that fail the proof retry with a grid twice as coarse, a few times; the last few
   go to a chunked brute force over their tile.

The result equals brute force exactly, including ties: the search ranks candidates by one int64
key, (float32 squared distance bits << 32) | reference index, so equal distances are ordered by
index, on every device (the distance is `dx*dx + dy*dy + dz*dz` in float32, elementwise, which
rounds the same on CPU and GPU). scipy's KD-tree works in float64 and orders ties its own way,
so the two agree up to ties and last-ulp near-ties (tests/test_neighbors.py).
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import Tensor

CELL_POINTS = 6.0
"""Target mean number of points per occupied cell: a 3×3×3 block then holds enough candidates
for k = 16 in both volumetric (3-D) and surface-like (2.5-D LiDAR) clouds, without the block
growing needlessly large."""

ROUNDS = 3
"""Grid searches (cell size h, 2h, 4h) before the brute-force fallback."""

MAX_DIMS = 2**16
"""Cells per axis at most: keeps (tile, cell) keys inside int64 for batches of up to 2^14 tiles."""

_COLUMNS = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 2, indexing="ij"), -1).reshape(9, 2)
"""(x, y) offsets of the block's 9 columns; a column's 3 cells along z have consecutive keys, so
each column is one contiguous range of the sorted points."""
_NO_KEY = torch.iinfo(torch.int64).max


@overload
def knn(query: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray: ...
@overload
def knn(query: Tensor, reference: Tensor, k: int) -> Tensor: ...
def knn(query: np.ndarray | Tensor, reference: np.ndarray | Tensor, k: int) -> np.ndarray | Tensor:
    """Indices of the k nearest reference points of each query point, nearest first.

    numpy (M, 3) / (N, 3) -> (M, k) int64 via scipy's cKDTree, the fastest exact search on CPU
    (~0.25 s for 131072 points on 2 cores). Torch tensors, (M, 3) / (N, 3) or batched
    (B, M, 3) / (B, N, 3) -> (..., M, k) int64 on the same device: `grid_knn` on a GPU; on CPU
    the tensors make a round trip through cKDTree, which is faster there.
    """
    if isinstance(query, np.ndarray):
        _, idx = cKDTree(reference).query(query, k=k, workers=-1)
        return np.asarray(idx, dtype=np.int64).reshape(len(query), k)
    if query.device.type != "cpu":
        return grid_knn(query, reference, k)
    q, r = query.detach().numpy(), reference.detach().numpy()
    if q.ndim == 2:
        return torch.from_numpy(knn(q, r, k))
    return torch.from_numpy(np.stack([knn(qb, rb, k) for qb, rb in zip(q, r, strict=True)]))


def grid_knn(
    query: Tensor,
    reference: Tensor,
    k: int,
    *,
    cell_points: float = CELL_POINTS,
    rounds: int = ROUNDS,
    max_candidates: int | None = None,
) -> Tensor:
    """Exact kNN (module docstring) of query (B, M, 3) in reference (B, N, 3), or unbatched.

    Returns int64 (B, M, k) indices into each tile's reference points, nearest first, ties by
    index. `max_candidates` bounds the (query, candidate) pairs held at once (memory); the
    default is 2^25 on GPU (~1 GB of temporaries) and 2^22 on CPU.
    """
    query, reference, batched = _batched(query, reference)
    n = reference.shape[1]
    if not 0 < k <= n:
        raise ValueError(f"k={k} must be in 1..{n} (reference points per tile)")
    if n >= 2**31:
        raise ValueError(f"{n} reference points per tile exceed the int32 index of the search key")
    budget = max_candidates or (2**25 if query.device.type == "cuda" else 2**22)
    with torch.no_grad():
        ref = reference.float().contiguous()
        qry = query.float().contiguous()
        out = torch.empty(*qry.shape[:2], k, dtype=torch.int64, device=qry.device)
        pending = torch.arange(qry.shape[0] * qry.shape[1], device=qry.device)
        h = _cell_size(ref, cell_points)
        for _ in range(rounds):
            if len(pending) == 0:
                break
            pending = _grid_round(qry, ref, k, h, pending, out.view(-1, k), budget)
            h = h * 2
        if len(pending):
            _brute_force_rows(qry, ref, k, pending, out.view(-1, k), budget)
    return out if batched else out[0]


def brute_force_knn(
    query: Tensor, reference: Tensor, k: int, max_candidates: int | None = None
) -> Tensor:
    """The same result as `grid_knn` by computing every distance, in query chunks.

    The reference for correctness and the baseline of benchmarks/train_gpu.py.
    """
    query, reference, batched = _batched(query, reference)
    budget = max_candidates or (2**25 if query.device.type == "cuda" else 2**22)
    with torch.no_grad():
        qry, ref = query.float().contiguous(), reference.float().contiguous()
        out = torch.empty(*qry.shape[:2], k, dtype=torch.int64, device=qry.device)
        rows = torch.arange(qry.shape[0] * qry.shape[1], device=qry.device)
        _brute_force_rows(qry, ref, k, rows, out.view(-1, k), budget)
    return out if batched else out[0]


def _batched(query: Tensor, reference: Tensor) -> tuple[Tensor, Tensor, bool]:
    batched = query.dim() == 3
    if not batched:
        query, reference = query[None], reference[None]
    if query.dim() != 3 or reference.dim() != 3 or query.shape[-1] != 3:
        raise ValueError(
            f"expected (B, M, 3) query and (B, N, 3) reference points, got "
            f"{tuple(query.shape)} and {tuple(reference.shape)}"
        )
    if query.shape[0] != reference.shape[0] or reference.shape[-1] != 3:
        raise ValueError(f"query {tuple(query.shape)} and reference {tuple(reference.shape)}")
    return query, reference, batched


def _cell_size(ref: Tensor, cell_points: float) -> Tensor:
    """Per-tile cell size (B,) giving about `cell_points` points per occupied cell.

    A first guess spreads the points over the bounding box; LiDAR lies on surfaces, so fewer
    cells are occupied than the volume suggests: one correction from the measured occupancy
    (assuming surface-like scaling, occupancy ∝ h²), clamped to a factor of 4 either way.
    """
    b, n, _ = ref.shape
    extent = ref.amax(1) - ref.amin(1)
    span = extent.amax(1).clamp_min(1e-6)
    volume = extent.clamp_min(span[:, None] * 1e-3).prod(1)
    h = (volume * cell_points / n) ** (1 / 3)
    h = torch.maximum(h, span / (MAX_DIMS - 2))
    cell_keys, _, _ = _sorted_cells(ref, h)
    occupied = torch.bincount(cell_keys // (cell_keys.new_tensor(MAX_DIMS) ** 3), minlength=b)
    factor = (cell_points * occupied / n).clamp(1 / 16, 16) ** 0.5
    return torch.maximum(h * factor, span / (MAX_DIMS - 2))


def _cells(points: Tensor, origin: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """(integer cell (.., 3), position in cell units (.., 3)) of points with per-row origin/h."""
    u = (points - origin) / h[..., None]
    return torch.floor(u).long(), u


def _keys(tile: Tensor, cell: Tensor) -> Tensor:
    """int64 key of (tile, cell); cells must lie in [0, MAX_DIMS)^3."""
    return ((tile * MAX_DIMS + cell[..., 0]) * MAX_DIMS + cell[..., 1]) * MAX_DIMS + cell[..., 2]


def _sorted_cells(ref: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Occupied cell keys (C,) sorted, `bounds` (C + 1,): cell i is order[bounds[i]:bounds[i+1]],
    and `order`: flat reference indices sorted by cell."""
    b, n, _ = ref.shape
    cell, _ = _cells(ref, ref.amin(1, keepdim=True), h[:, None])
    tile = torch.arange(b, device=ref.device).repeat_interleave(n)
    keys, order = torch.sort(_keys(tile, cell.reshape(-1, 3)), stable=True)
    cell_keys, counts = torch.unique_consecutive(keys, return_counts=True)
    bounds = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return cell_keys, bounds, order


def _grid_round(
    qry: Tensor, ref: Tensor, k: int, h: Tensor, rows: Tensor, out: Tensor, budget: int
) -> Tensor:
    """Search `rows` (flat query indices) in a grid of cell size h; write the proven rows into
    `out` (B*M, k) and return the rows that failed the proof."""
    m, n = qry.shape[1], ref.shape[1]
    cell_keys, bounds, order = _sorted_cells(ref, h)
    origin, high = ref.amin(1), ref.amax(1)
    dims = _cells(high, origin, h)[0]  # (B, 3) last occupied cell per axis
    tile = rows // m
    point = qry.view(-1, 3)[rows]
    cell, u = _cells(point, origin[tile], h[tile])

    # the block as 9 columns of 3 cells along z; columns outside the grid hold nothing
    column = cell[:, None, :2] + _COLUMNS.to(cell.device)
    inside = ((column >= 0) & (column <= dims[tile][:, None, :2])).all(-1)
    column = column.clamp(0, MAX_DIMS - 1)
    z = cell[:, None, 2:].expand(-1, 9, 1)
    lo = _keys(tile[:, None], torch.cat([column, (z - 1).clamp(0, MAX_DIMS - 1)], -1))
    hi = _keys(tile[:, None], torch.cat([column, (z + 1).clamp(0, MAX_DIMS - 1)], -1))
    start = bounds[torch.searchsorted(cell_keys, lo)]
    count = torch.where(inside, bounds[torch.searchsorted(cell_keys, hi, right=True)] - start, 0)

    # proof bound: distance to the nearest closed face of the block, minus rounding slack
    low = torch.where(cell - 1 > 0, u - (cell - 1), torch.inf)
    up = torch.where(cell + 1 < dims[tile], (cell + 2) - u, torch.inf)
    scale = torch.maximum(ref.abs().amax((1, 2)), qry.abs().amax((1, 2)))[tile]
    slack = 64 * torch.finfo(torch.float32).eps * scale
    bound = (torch.minimum(low, up).amin(1) * h[tile] - slack).clamp_min(0) ** 2

    total = count.sum(1)
    by_size = torch.argsort(total)
    failed = []
    for chunk in _chunks(total[by_size], budget):
        sel = by_size[chunk]
        dist, idx = _block_topk(
            point[sel], ref.view(-1, 3), k, count[sel], start[sel], order, tile[sel] * n
        )
        ok = (total[sel] >= k) & (dist[:, -1] <= bound[sel])
        out[rows[sel[ok]]] = idx[ok]
        failed.append(rows[sel[~ok]])
    return torch.cat(failed) if failed else rows[:0]


def _chunks(sorted_sizes: Tensor, budget: int) -> list[slice]:
    """Consecutive slices of queries (sorted by candidate count) whose padded size
    (queries × largest count) fits `budget`."""
    sizes = sorted_sizes.clamp_min(1).cpu().numpy()
    out, i = [], 0
    while i < len(sizes):  # binary search for the last j with (j - i) * sizes[j - 1] <= budget
        lo, hi = i + 1, min(len(sizes), i + max(1, budget // int(sizes[i])))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if (mid - i) * int(sizes[mid - 1]) <= budget else (lo, mid - 1)
        out.append(slice(i, lo))
        i = lo
    return out


def _block_topk(
    point: Tensor,
    ref_flat: Tensor,
    k: int,
    count: Tensor,
    start: Tensor,
    order: Tensor,
    base: Tensor,
) -> tuple[Tensor, Tensor]:
    """k smallest (squared distance, index) over each query's candidate cells.

    count/start (Q, 9) describe each query's columns as ranges of `order`; the ranges are laid
    out side by side and padded to the longest. Returns distances (Q, k) float32 (NaN where a
    query has fewer than k candidates) and local reference indices (Q, k).
    """
    end = torch.cumsum(count, 1)
    width = max(int(end[:, -1].max()), 1)
    t = torch.arange(width, device=point.device).expand(len(point), width)
    cell = torch.searchsorted(end, t.contiguous(), right=True).clamp_max(end.shape[1] - 1)
    first = end.gather(1, cell) - count.gather(1, cell)
    pos = (start.gather(1, cell) + t - first).clamp_max(len(order) - 1)
    cand = order[pos]
    valid = t < end[:, -1:]
    return _topk(point, ref_flat[cand], cand - base[:, None], valid, k)


def _topk(
    point: Tensor, cand_xyz: Tensor, local: Tensor, valid: Tensor | None, k: int
) -> tuple[Tensor, Tensor]:
    """k smallest candidates by (float32 squared distance, local index), as one int64 key."""
    diff = cand_xyz - point[:, None, :]
    dx, dy, dz = diff.unbind(-1)
    dist = dx * dx + dy * dy + dz * dz
    key = (dist.view(torch.int32).long() << 32) | local
    if valid is not None:
        key = key.masked_fill(~valid, _NO_KEY)
    if key.shape[1] < k:
        key = torch.cat([key, key.new_full((len(key), k - key.shape[1]), _NO_KEY)], 1)
    best = torch.topk(key, k, dim=1, largest=False, sorted=True).values
    missing = best == _NO_KEY
    dist = (best >> 32).int().view(torch.float32).masked_fill(missing, torch.nan)
    return dist, (best & 0xFFFFFFFF).masked_fill(missing, 0)


def _brute_force_rows(
    qry: Tensor, ref: Tensor, k: int, rows: Tensor, out: Tensor, budget: int
) -> None:
    """Exact kNN of `rows` (flat query indices) against all points of their tile."""
    m, n = qry.shape[1], ref.shape[1]
    step = max(1, budget // n)
    local = torch.arange(n, device=ref.device)
    tiles = rows // m
    for tile in torch.unique(tiles).tolist():
        mine = rows[tiles == tile]
        for s in range(0, len(mine), step):
            sel = mine[s : s + step]
            point = qry.view(-1, 3)[sel]
            _, idx = _topk(point, ref[tile].expand(len(sel), n, 3), local, None, k)
            out[sel] = idx
