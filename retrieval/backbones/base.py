"""What every retrieval backbone offers: one multimodal sequence model, three ways to read it.

A backbone turns (images, text) into a token sequence `[visual tokens of each image; text;
summary token]` and runs its language model over it. The embedder reads the hidden state of the
last real token (`hidden`), stage 1 and the reranker read next-token predictions (`lm_loss`,
`next_token_logits`). Keeping the sequence layout in one place means the embedder, the judge and
the reranker can never disagree on where the image tokens go or which token is "last".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("last", "mean")
"""How a sequence becomes one vector: the last real token (an LLM's summary position, the
paper's choice) or the mean over real tokens (what sentence encoders such as MiniLM learnt)."""


def pad_batch(seqs: list[list[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    """Pad id lists to one (B, L) tensor on `side` ("left" | "right"); returns (ids, mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def last_positions(mask: Tensor) -> Tensor:
    """Index of the last real token per row, for right *and* left padding.

    Taking `mask.sum() - 1` is only right for right padding and `-1` only for left padding; the
    position of the last 1 is right for both.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values


def last_token_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, L, H) hidden states -> (B, H) state of the last real token (see `last_positions`)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_positions(mask)]


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, L, H) -> (B, H) mean over the real tokens (padding on either side is ignored)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def position_ids(mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


class Backbone(nn.Module):
    """Base class: preprocessing, sequence layout and the generic next-token helpers.

    Subclasses set `tokenizer`, `hidden_size`, `image_size`, `compression`, `mean`/`std` and
    implement `image_token_count`, `_image_slot` (ids standing for one image), `_forward`
    (hidden states), `lm_logits` (next-token head) and `spec()`.
    """

    tokenizer: Any
    hidden_size: int
    image_size: int
    compression: int
    lora_targets: tuple[str, ...] = ()
    lm_attr: str = ""  # dotted path of the language model (LoRA wraps it)
    pooling: str = "last"
    caches_vision: bool = False
    """True when `visual_features` is frozen, so training may compute it once per tile."""

    def visual_features(self, pixels: Tensor) -> Tensor:
        """(N, 3, H, W) preprocessed pixels -> (N, tokens, C) uncompressed visual tokens."""
        raise NotImplementedError(f"{type(self).__name__} computes visual tokens internally")

    def image_token_count(self) -> int:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """The constructor arguments (YAML-able) that rebuild this backbone with random weights."""
        raise NotImplementedError

    def _image_slot(self) -> list[int]:
        raise NotImplementedError

    def _forward(
        self,
        ids: Tensor,
        mask: Tensor,
        pixels: Tensor | None,
        causal_start: Tensor | None,
        features: Tensor | None = None,
    ) -> Tensor:
        """Last-layer hidden states (B, L, H). Tokens at or after `causal_start` (B,) see only
        earlier tokens (stage-1 targets); None = the model's own attention pattern. `features`
        (B, M, tokens, C) = precomputed `visual_features` instead of `pixels`."""
        raise NotImplementedError

    def lm_logits(self, hidden: Tensor, token_ids: list[int] | None = None) -> Tensor:
        """Next-token logits of hidden states (..., H) over the vocabulary or `token_ids` only
        (the judge and reranker need 2-6 tokens, not a 30k-150k vocabulary)."""
        raise NotImplementedError

    def _prefix_ids(self) -> list[int]:
        return []

    def summary_id(self) -> int:
        """The appended token whose hidden state is the embedding ([SEP] or the LM's EOS)."""
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def token_id(self, word: str) -> int:
        """First token of `word` (the yes/no and position answers are single tokens)."""
        return self.tokenizer(word, add_special_tokens=False).input_ids[0]

    def preprocess(self, images: Tensor) -> Tensor:
        """(..., 3, H, W) RGB in [0, 1] -> resized to image_size and normalised."""
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:]).float()
        if flat.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            flat = F.interpolate(flat, size=size, mode="bilinear", antialias=True)
        mean = torch.tensor(self.mean, device=flat.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=flat.device).view(1, 3, 1, 1)
        flat = (flat - mean) / std
        return flat.reshape(*lead, *flat.shape[1:])

    def _text_ids(self, text: str, limit: int) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids[:limit]

    def _sequences(self, n_images: int, texts: list[str], limit: int) -> list[list[int]]:
        slot = self._image_slot() * n_images
        return [self._prefix_ids() + slot + self._text_ids(t, limit) for t in texts]

    def _run(
        self,
        images: Tensor | None,
        seqs: list[list[int]],
        target_lengths: list[int] | None = None,
        features: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(hidden (B, L, H), mask (B, L)) of padded `seqs` with `images` (B, M, 3, H, W) or
        their precomputed `features` (B, M, tokens, C)."""
        device = next(self.parameters()).device
        ids, mask = pad_batch(seqs, self.tokenizer.pad_token_id, self.tokenizer.padding_side)
        ids, mask = ids.to(device), mask.to(device)
        causal_start = None
        if target_lengths is not None:
            causal_start = last_positions(mask) + 1 - torch.tensor(target_lengths, device=device)
        pixels = None if images is None else self.preprocess(images.to(device))
        if features is not None:
            return self._forward(ids, mask, None, causal_start, features.to(device)), mask
        return self._forward(ids, mask, pixels, causal_start), mask

    def hidden(
        self,
        images: Tensor | None,
        texts: list[str],
        max_text_tokens: int,
        features: Tensor | None = None,
    ) -> Tensor:
        """The sequence `[images; text; summary token]` pooled (`pooling`): (B, hidden).
        `features` (B, M, tokens, C) may stand in for `images` (see `visual_features`)."""
        source = images if features is None else features
        n = 0 if source is None else source.shape[1]
        seqs = [[*s, self.summary_id()] for s in self._sequences(n, texts, max_text_tokens)]
        hidden, mask = self._run(images, seqs, features=features)
        if self.pooling == "mean":
            return mean_pool(hidden, mask)
        return last_token_pool(hidden, mask)

    def next_token_logits(
        self,
        images: Tensor | None,
        prompts: list[str],
        max_text_tokens: int,
        token_ids: list[int] | None = None,
    ) -> Tensor:
        """(B, V) logits of the token after `[images; prompt]`, or (B, len(token_ids))."""
        n = 0 if images is None else images.shape[1]
        hidden, mask = self._run(images, self._sequences(n, prompts, max_text_tokens))
        return self.lm_logits(last_token_pool(hidden, mask), token_ids)

    def lm_loss(
        self, images: Tensor | None, prompts: list[str], targets: list[str], max_text_tokens: int
    ) -> Tensor:
        """Next-token cross-entropy of `targets` (+ summary token) given `[images; prompt]`."""
        n = 0 if images is None else images.shape[1]
        prompt_seqs = self._sequences(n, prompts, max_text_tokens)
        target_seqs = [[*self._text_ids(t, max_text_tokens), self.summary_id()] for t in targets]
        seqs = [p + t for p, t in zip(prompt_seqs, target_seqs, strict=True)]
        hidden, mask = self._run(images, seqs, [len(t) for t in target_seqs])
        # the state at position i predicts token i + 1: gather only the predicting positions
        ends = last_positions(mask) + 1
        rows, cols, labels = [], [], []
        for row, target in enumerate(target_seqs):
            end = int(ends[row])
            rows += [row] * len(target)
            cols += range(end - len(target) - 1, end - 1)
            labels += target
        logits = self.lm_logits(hidden[torch.tensor(rows), torch.tensor(cols)])
        return F.cross_entropy(logits.float(), torch.tensor(labels, device=logits.device))
