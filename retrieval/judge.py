"""Pluggable relevance judges for stage 3 (MLLM-as-a-judge, papers.md part 2, §2.3).

The stage-2 embedder proposes the top-20 tiles per training query; a judge says which are
relevant. Judged-relevant tiles widen the reranker's positives, the rest become the 12 hard
negatives of stage 3 (the ground-truth tile stays the only contrastive positive).

- `LabelJudge` (offline default): the query's source tile is known (its caption is the query),
  so relevance is graded from both tiles' labels and LiDAR/NDVI statistics
  (`retrieval.captions.relevance`) - the paper's "rule-based" judge of Table 8.
- `MLLMJudge`: a multimodal LM answers a yes/no question about (query text, candidate image);
  relevant iff logit("yes") > logit("no"), as the paper does with Qwen3-VL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

JUDGE_TEMPLATE = (
    "Determine whether the given query text is relevant to the given aerial image tile. "
    "Query: {query} Answer yes or no."
)


@dataclass(frozen=True)
class JudgePair:
    """One (query, candidate) pair: the query text, the tile it was written for (if known),
    the candidate tile's metadata and its RGB image (3, H, W) in [0, 1]."""

    query: str
    query_tile: Any
    candidate: Any
    image: Tensor


class Judge(Protocol):
    def __call__(self, pairs: Sequence[JudgePair]) -> list[bool]:
        """True where the candidate is relevant to the query."""
        ...


class LabelJudge:
    """Relevant iff graded label relevance >= `min_grade` (0..3 scale of `relevance`)."""

    def __init__(self, min_grade: int = 2, relevance: Callable[[Any, Any], int] | None = None):
        if relevance is None:
            from retrieval.captions import relevance
        self.min_grade, self.relevance = min_grade, relevance

    def __call__(self, pairs: Sequence[JudgePair]) -> list[bool]:
        if any(p.query_tile is None for p in pairs):
            raise ValueError(
                "LabelJudge needs the query's source tile; use MLLMJudge for free text"
            )
        return [self.relevance(p.query_tile, p.candidate) >= self.min_grade for p in pairs]


class MLLMJudge:
    """Yes/no next-token judge over any `Backbone` (a real MLLM in practice)."""

    def __init__(self, backbone: Any, template: str = JUDGE_TEMPLATE, max_text_tokens: int = 96):
        self.backbone, self.template, self.max_text_tokens = backbone, template, max_text_tokens
        self.answers = [backbone.token_id("yes"), backbone.token_id("no")]

    @torch.no_grad()
    def logits(self, pairs: Sequence[JudgePair]) -> Tensor:
        """(N, 2) [logit yes, logit no] per pair."""
        images = torch.stack([p.image for p in pairs]).unsqueeze(1)
        prompts = [self.template.format(query=p.query) for p in pairs]
        logits = self.backbone.next_token_logits(
            images, prompts, self.max_text_tokens, self.answers
        )
        return logits.float()

    def __call__(self, pairs: Sequence[JudgePair]) -> list[bool]:
        yes_no = self.logits(pairs)
        return (yes_no[:, 0] > yes_no[:, 1]).tolist()
