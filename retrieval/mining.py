"""Global hard-negative mining (stage 2) and top-K candidate lists (stage 3), through faiss.

The paper ranks *all* candidates of a sub-dataset for every query, drops the ground-truth
positive and samples 2 negatives uniformly from ranks 50-100: hard enough to teach, deep enough
to skip the false negatives that crowd the top 10. A small corpus has fewer than 100
candidates, so the window is clipped (`mining_window`).

Only the top `hi + 1` of each ranking is ever needed, so queries are answered by a faiss index
over the candidate vectors (`ranked_negatives`): memory is O(n·d) for the vectors plus O(n·k)
for the answers, never the dense n×n score matrix (which ran out of memory at 50-100 k tiles),
and the index is exact up to `retrieval.index.FLAT_MAX` candidates, IVF above.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


def mining_window(n_negatives: int, k: int, lo: int = 50, hi: int = 100) -> tuple[int, int]:
    """Rank window [start, stop) over the negatives (positive removed, 0 = most similar).

    The paper's [lo, hi) when the corpus is big enough. Otherwise it keeps the paper's
    proportion and starts half-way down the list (`lo * n / hi`), ends at the last negative, and
    widens upwards until it holds at least `k` ranks; with fewer than k negatives it is all.
    """
    stop = min(hi, n_negatives)
    start = min(lo, lo * n_negatives // hi)
    start = max(0, min(start, stop - k))
    return start, stop


def ranked_chunks(
    queries: np.ndarray | Tensor,
    candidates: np.ndarray | Tensor,
    positives: np.ndarray | Tensor,
    k: int,
    chunk: int = 4096,
) -> Iterator[tuple[int, np.ndarray]]:
    """(first query, (chunk, min(k, C-1)) candidate indices by descending inner product) per
    chunk of queries, each query's positive (`positives` (Q,), a candidate index) removed.
    One faiss index over the candidates; callers keep only what they need of each chunk."""
    from retrieval.index import FLAT_MAX, make_faiss

    cands = np.ascontiguousarray(_numpy(candidates), dtype=np.float32)
    index = make_faiss(cands, "flat" if len(cands) <= FLAT_MAX else "ivf")
    positives = _numpy(positives).astype(np.int64)
    depth, keep = min(k + 1, len(cands)), min(k, len(cands) - 1)
    for start in range(0, len(positives), chunk):
        q = np.ascontiguousarray(_numpy(queries[start : start + chunk]), dtype=np.float32)
        _, rows = index.search(q, depth)
        out = np.empty((len(rows), keep), dtype=np.int64)
        for i, (row, p) in enumerate(zip(rows, positives[start : start + chunk], strict=True)):
            row = row[(row != p) & (row >= 0)]
            out[i] = row[:keep]
        yield start, out


def ranked_negatives(
    queries: np.ndarray | Tensor,
    candidates: np.ndarray | Tensor,
    positives: np.ndarray | Tensor,
    k: int,
) -> np.ndarray:
    """(Q, min(k, C-1)) candidate indices by descending score, positives removed."""
    return np.concatenate([rows for _, rows in ranked_chunks(queries, candidates, positives, k)])


def mine_hard_negatives(
    queries: np.ndarray | Tensor,
    candidates: np.ndarray | Tensor,
    positives: np.ndarray | Tensor,
    rng: np.random.Generator,
    k: int = 2,
    lo: int = 50,
    hi: int = 100,
) -> Tensor:
    """(Q, min(k, C-1)) hard negatives per query, sampled without replacement from the ranks
    `mining_window` gives; never the query's positive. Memory: the candidate vectors, one
    chunk of rankings and the (Q, k) answer."""
    start, stop = mining_window(len(candidates) - 1, k, lo, hi)
    take = min(k, stop - start)
    out = np.empty((len(positives), take), dtype=np.int64)
    for first, ranked in ranked_chunks(queries, candidates, positives, stop):
        # `take` distinct ranks per query: the first columns of a random permutation each
        picks = rng.random((len(ranked), stop - start)).argsort(axis=1)[:, :take] + start
        out[first : first + len(ranked)] = np.take_along_axis(ranked, picks, axis=1)
    return torch.from_numpy(out)


def top_k(
    queries: np.ndarray | Tensor,
    candidates: np.ndarray | Tensor,
    positives: np.ndarray | Tensor,
    k: int,
) -> Tensor:
    """(Q, min(k, C-1)) best-scoring candidates per query, positive excluded (stage-3 pool)."""
    return torch.from_numpy(ranked_negatives(queries, candidates, positives, k))


def _numpy(x: np.ndarray | Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
