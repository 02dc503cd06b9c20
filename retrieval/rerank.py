"""The reranker: a generative yes/no scorer initialised from the stage-1 model (§2.4).

Trained with L = L_point + L_list: pointwise, the next token after `[tile; query prompt]`
should be "yes" for relevant and "no" for irrelevant tiles; listwise, given 1 positive and
M in [2, 5] negatives in random order, the next token should be the positive's position
("1".."M+1"). At search time it scores the embedder's top-5 pointwise by logit(yes) - logit(no).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model
from torch import Tensor, nn

from geoseg.device import AUTO, resolve_device
from retrieval.backbones import Backbone
from retrieval.embedder import read_folder, save_folder

RERANK_TOP = 5
"""How many of the embedder's hits the reranker re-scores (the paper's top-5)."""

POINTWISE = "Is this aerial image tile relevant to the query: {query}? Answer yes or no."
LISTWISE = (
    "Which of the {m} aerial image tiles above matches the query: {query}? "
    "Answer with its position."
)


class Reranker(nn.Module):
    """Scores (query, tile) pairs with the backbone's next-token logits."""

    def __init__(self, backbone: Backbone, max_text_tokens: int = 64):
        super().__init__()
        self.backbone, self.max_text_tokens = backbone, max_text_tokens
        self.answers = [backbone.token_id("yes"), backbone.token_id("no")]

    def yes_no(self, queries: list[str], images: Tensor) -> Tensor:
        """(B, 2) [logit yes, logit no] for B (query, (3, H, W) tile) pairs."""
        prompts = [POINTWISE.format(query=q) for q in queries]
        logits = self.backbone.next_token_logits(
            images.unsqueeze(1), prompts, self.max_text_tokens, self.answers
        )
        return logits.float()

    def positions(self, queries: list[str], images: Tensor) -> Tensor:
        """(B, M) logits of the position tokens "1".."M" for B lists of M tiles (B, M, 3, H, W)."""
        m = images.shape[1]
        prompts = [LISTWISE.format(m=m, query=q) for q in queries]
        ids = [self.backbone.token_id(str(i + 1)) for i in range(m)]
        return self.backbone.next_token_logits(images, prompts, self.max_text_tokens, ids).float()

    def score(self, query: str, images: Tensor) -> Tensor:
        """(B,) relevance of B tiles (B, 3, H, W) in [0, 1] to one query; higher = better."""
        if not query.strip():
            raise ValueError("empty query text")
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            yes_no = self.yes_no([query] * images.shape[0], images)
        return yes_no[:, 0] - yes_no[:, 1]

    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone.spec(), "max_text_tokens": self.max_text_tokens}

    def save(self, path: Path) -> None:
        """Folder like an embedder's: config.yaml, model.safetensors, tokenizer/ (atomic)."""
        save_folder(self, self.config(), Path(path))


def rerank_order(reranker: Reranker, text: str, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(order, scores) of B tiles (B, 3, H, W) for one query: scores descending, ties stable."""
    with torch.inference_mode():
        scores = reranker.score(text, images).float().cpu().numpy()
    return np.argsort(-scores, kind="stable"), scores


def load_reranker(path: str | Path, device: str | torch.device = AUTO) -> Reranker:
    """A reranker folder written by `Reranker.save` (training writes RUN/reranker/)."""
    folder = Path(path)
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"{folder} is not a reranker folder (no config.yaml)")
    config, backbone = read_folder(folder)
    reranker = Reranker(backbone, max_text_tokens=config["max_text_tokens"])
    load_model(reranker, str(folder / "model.safetensors"))
    return reranker.to(resolve_device(device)).eval()
