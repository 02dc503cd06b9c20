"""Hugging Face MLLMs as retrieval backbones, with VTC patched in (no fork of their code).

Two families, both with a ViT → connector → causal LM layout:

- **InternVL3 "-hf"** (`InternVLForConditionalGeneration`, the paper's backbone): the ViT grid
  goes through `pixel_shuffle` before the projector. We wrap that method on the *instance* so the
  grid is bilinearly down-sampled by s first: 448 px → 32×32 → 16×16 → shuffle → 64 tokens
  (256 uncompressed), exactly the paper's InternVL3-VTC.
- **SmolVLM / Idefics3** (`Idefics3ForConditionalGeneration`): a forward pre-hook on the
  connector compresses the SigLIP patch tokens before its own pixel shuffle.

We build token ids ourselves (one image placeholder per visual token, counted after
compression) instead of the HF processor, whose token counts know nothing about VTC. Images are
one tile each (InternVL MAX_NUM = 1 for natural images, as in the paper).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer

from retrieval.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, position_ids
from retrieval.compress import compress_tokens, compressed_count, downsample_grid

FAMILIES: dict[str, dict[str, Any]] = {
    "internvl": {
        "model_type": "internvl",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "wrap": ("<img>", "</img>"),
    },
    "idefics3": {
        "model_type": "idefics3",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "wrap": ("<fake_token_around_image>", "<fake_token_around_image>"),
    },
}


def _first(value: int | list[int] | tuple[int, ...]) -> int:
    return int(value[0]) if isinstance(value, list | tuple) else int(value)


def family_of(config: Any) -> str:
    """Backbone family of a transformers config (SmolVLM configs are Idefics3 underneath)."""
    kind = {"smolvlm": "idefics3"}.get(config.model_type, config.model_type)
    if kind not in FAMILIES:
        raise ValueError(f"unsupported model type {config.model_type!r}; use {sorted(FAMILIES)}")
    return kind


def pretrained_spec(path_or_id: str, compression: int = 2) -> dict[str, Any]:
    """Backbone spec of a pretrained HF MLLM (its family read from its config)."""
    family = family_of(AutoConfig.from_pretrained(path_or_id))
    return {"kind": family, "pretrained": path_or_id, "compression": compression}


def patch_compression(model: Any, family: str, s: int) -> None:
    """Insert VTC between `model`'s vision encoder and connector, in place."""
    inner = model.model
    if family == "internvl":
        shuffle = inner.pixel_shuffle

        def compressed_shuffle(features: Tensor, scale_factor: float = 0.5) -> Tensor:
            return shuffle(downsample_grid(features, s), scale_factor=scale_factor)

        inner.pixel_shuffle = compressed_shuffle
    else:
        inner.connector.register_forward_pre_hook(
            lambda _module, args: (compress_tokens(args[0], s), *args[1:])
        )


class HFBackbone(Backbone):
    """An InternVL3-hf or Idefics3/SmolVLM model with VTC; next-token logits from its LM head."""

    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    lm_attr = "model.model.language_model"

    def __init__(
        self,
        *,
        pretrained: str | None = None,
        hf_config: dict[str, Any] | None = None,
        tokenizer: Any = None,
        compression: int = 2,
        image_size: int | None = None,
        dtype: str = "float32",
    ):
        """`pretrained` (HF id or folder) loads weights; `hf_config` builds random weights
        (a saved embedder loads its own state afterwards; tests use tiny configs).
        `image_size` defaults to the vision encoder's native size (448 for InternVL3)."""
        super().__init__()
        from transformers import AutoModelForImageTextToText

        torch_dtype = getattr(torch, dtype)
        if hf_config is not None:
            config = AutoConfig.for_model(**hf_config)
            self.model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype)
        elif pretrained is not None:
            self.model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=torch_dtype)
        else:
            raise ValueError("an HF backbone needs `pretrained` (id or path) or `hf_config`")
        self.family = family_of(self.model.config)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(pretrained)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        vision = self.model.config.vision_config
        self.native_size = _first(vision.image_size)
        self.image_size = image_size or self.native_size
        self.patch_size = _first(vision.patch_size)
        self.compression, self.dtype_name = compression, dtype
        self.mean, self.std = FAMILIES[self.family]["mean"], FAMILIES[self.family]["std"]
        self.hidden_size = self.model.config.text_config.hidden_size
        self.image_token_count()  # fail now if the grid does not divide
        patch_compression(self.model, self.family, compression)

    def spec(self) -> dict[str, Any]:
        config = self.model.config.to_diff_dict()
        config.pop("transformers_version", None)
        return {
            "kind": self.family,
            "hf_config": config,
            "compression": self.compression,
            "image_size": self.image_size,
            "dtype": self.dtype_name,
        }

    def image_token_count(self) -> int:
        grid = self.image_size // self.patch_size
        spatial = compressed_count((grid, grid), self.compression)
        config = self.model.config
        if self.family == "internvl":
            return int(spatial * config.downsample_ratio**2)
        return spatial // config.scale_factor**2

    def _image_slot(self) -> list[int]:
        vocab = self.tokenizer.get_vocab()
        start, end = ([vocab[t]] if t in vocab else [] for t in FAMILIES[self.family]["wrap"])
        return start + [self.model.config.image_token_id] * self.image_token_count() + end

    def _prefix_ids(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [] if bos is None else [bos]

    def _forward(
        self, ids: Tensor, mask: Tensor, pixels: Tensor | None, causal_start: Tensor | None
    ) -> Tensor:
        """Causal LM: stage-1 targets are already causal, so `causal_start` is not needed."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        kwargs["position_ids"] = position_ids(mask)
        if pixels is not None:
            pixels = pixels.to(self.model.dtype)
            kwargs["pixel_values"] = pixels.flatten(0, 1) if self.family == "internvl" else pixels
        return self.model.model(**kwargs).last_hidden_state

    def lm_logits(self, hidden: Tensor, token_ids: list[int] | None = None) -> Tensor:
        head = self.model.get_output_embeddings()
        weight = head.weight if token_ids is None else head.weight[token_ids]
        bias = head.bias if head.bias is None or token_ids is None else head.bias[token_ids]
        return torch.nn.functional.linear(hidden, weight, bias)
