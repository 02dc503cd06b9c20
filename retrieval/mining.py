"""Global hard-negative mining (stage 2) and top-K candidate lists (stage 3).

The paper ranks *all* candidates of a sub-dataset for every query, drops the ground-truth
positive and samples 2 negatives uniformly from ranks 50-100: hard enough to teach, deep enough
to skip the false negatives that crowd the top 10. A small corpus has fewer than 100
candidates, so the window is clipped (`mining_window`).
"""

from __future__ import annotations

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


def ranked_negatives(scores: Tensor, positives: Tensor) -> Tensor:
    """(Q, C) scores -> (Q, C-1) candidate indices by descending score, each query's positive
    candidate (`positives` (Q,)) removed."""
    order = torch.argsort(scores, dim=1, descending=True)
    keep = order != positives.view(-1, 1)
    return order[keep].view(scores.shape[0], -1)


def mine_hard_negatives(
    scores: Tensor,
    positives: Tensor,
    rng: np.random.Generator,
    k: int = 2,
    lo: int = 50,
    hi: int = 100,
) -> Tensor:
    """(Q, min(k, C-1)) hard negatives per query, sampled without replacement from the ranks
    `mining_window` gives; never the query's positive."""
    ranked = ranked_negatives(scores, positives)
    start, stop = mining_window(ranked.shape[1], k, lo, hi)
    take = min(k, stop - start)
    picks = np.stack([rng.choice(np.arange(start, stop), take, replace=False) for _ in ranked])
    return torch.gather(ranked, 1, torch.from_numpy(picks).to(ranked.device).long())


def top_k(scores: Tensor, positives: Tensor, k: int) -> Tensor:
    """(Q, min(k, C-1)) best-scoring candidates per query, positive excluded (stage-3 pool)."""
    return ranked_negatives(scores, positives)[:, :k]
