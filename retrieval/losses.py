"""Training losses of the three embedder stages and the reranker (papers.md part 2, §2.2).

Stage 1 uses the backbone's own next-token loss (`Backbone.lm_loss`); this module holds the
contrastive and reranker objectives, which only see scores and embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TAU = 0.03
"""InfoNCE temperature of the paper (Table 14)."""


def info_nce(
    queries: Tensor,
    candidates: Tensor,
    hard: Tensor | None = None,
    tau: float = TAU,
    hard_mask: Tensor | None = None,
) -> Tensor:
    """InfoNCE of (B, D) queries against their (B, D) positives, all L2-normalised.

    Row i's positive is `candidates[i]`; the other B-1 candidates are in-batch negatives and
    `hard` (B, K, D) adds K explicit hard negatives per query, seen by that query only
    (`hard_mask` (B, K) False = a padding slot, left out):
    L_i = -log exp(q·c+/τ) / (exp(q·c+/τ) + Σ_neg exp(q·c-/τ)), averaged over the batch.
    """
    logits = queries @ candidates.T / tau
    if hard is not None and hard.shape[1]:
        extra = torch.einsum("bd,bkd->bk", queries, hard) / tau
        if hard_mask is not None:
            extra = extra.masked_fill(~hard_mask.bool(), float("-inf"))
        logits = torch.cat([logits, extra], dim=1)
    target = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, target)


def pointwise_loss(yes_no: Tensor, relevant: Tensor) -> Tensor:
    """CE of the (B, 2) [logit yes, logit no] against "Yes" for relevant pairs, "No" otherwise."""
    return F.cross_entropy(yes_no, (~relevant.bool()).long())


def listwise_loss(position_logits: Tensor, positive: Tensor) -> Tensor:
    """CE of the (B, M+1) logits of the position tokens "1".."M+1" against the positive's index."""
    return F.cross_entropy(position_logits, positive)


def relational_kd(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(teacher || student) of (B, B) query-to-candidate logits, over rows (each query's
    candidates) and columns (each candidate's queries), averaged: distils how a teacher ranks,
    whatever the size of its embedding space."""
    rows = F.kl_div(
        F.log_softmax(student, dim=1),
        F.log_softmax(teacher, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    cols = F.kl_div(
        F.log_softmax(student.T, dim=1),
        F.log_softmax(teacher.T, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    return (rows + cols) / 2
