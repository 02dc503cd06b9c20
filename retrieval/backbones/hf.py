"""Hugging Face MLLMs as retrieval backbones, with VTC patched in (no fork of their code).

Two families, both with a ViT → connector → causal LM layout:

- **InternVL3 "-hf"** (`InternVLForConditionalGeneration`, the paper's backbone): the ViT grid
  goes through `pixel_shuffle` before the projector. We wrap that method on the *instance* so the
  grid is bilinearly down-sampled by s first: 448 px → 32×32 → 16×16 → shuffle → 64 tokens
  (256 uncompressed), exactly the paper's InternVL3-VTC.
- **SmolVLM / Idefics3** (`Idefics3ForConditionalGeneration`): a forward pre-hook on the
  connector compresses the SigLIP patch tokens before its own pixel shuffle.
- **Qwen2-VL** (`Qwen2VLForConditionalGeneration`: GME-Qwen2-VL, VLM2Vec-Qwen2VL and other
  universal embedders built on it). Its M-RoPE positions and placeholder counts are derived from
  `image_grid_thw`, so VTC changes the grid the *language model* is told (H/s × W/s patches)
  while the vision tower still runs on the real grid: its `forward` is wrapped on the instance to
  restore the real grid, and a pre-hook on its patch merger bilinearly down-samples the patch
  features (kept in Qwen's merge-window order) to the compressed grid before the 2×2 merge.

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
    "qwen2_vl": {
        "model_type": "qwen2_vl",
        "mean": (0.48145466, 0.4578275, 0.40821073),  # Qwen2-VL's processor uses CLIP's
        "std": (0.26862954, 0.26130258, 0.27577711),
        "wrap": ("<|vision_start|>", "<|vision_end|>"),
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


def qwen_patches(pixels: Tensor, patch: int, temporal: int, merge: int) -> Tensor:
    """(N, 3, H, W) normalised images -> Qwen2-VL `pixel_values` (N·h·w, 3·temporal·patch²):
    each image repeated `temporal` times (a still frame), cut into patches listed merge window
    by merge window, as Qwen2-VL's image processor lays them out."""
    n, c, height, width = pixels.shape
    gh, gw = height // patch, width // patch
    x = pixels.unsqueeze(1).expand(n, temporal, c, height, width)
    x = x.reshape(n, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # n, gh/m, gw/m, m, m, c, t, p, p
    return x.reshape(n * gh * gw, c * temporal * patch * patch)


def _window_to_grid(tokens: Tensor, h: int, w: int, m: int) -> Tensor:
    """Qwen merge-window order (h/m, w/m, m, m) -> row-major grid (1, h, w, C)."""
    c = tokens.shape[-1]
    return tokens.view(h // m, w // m, m, m, c).permute(0, 2, 1, 3, 4).reshape(1, h, w, c)


def _grid_to_window(grid: Tensor, m: int) -> Tensor:
    _, h, w, c = grid.shape
    return grid.view(h // m, m, w // m, m, c).permute(0, 2, 1, 3, 4).reshape(h * w, c)


def compress_qwen_tokens(tokens: Tensor, grids: Tensor, s: int, merge: int) -> Tensor:
    """Patch features of several images (real `grids` (N, 3) t, h, w) -> each image's grid
    bilinearly down-sampled by s, back in merge-window order."""
    out, start = [], 0
    for t, h, w in grids.tolist():
        for _ in range(t):
            part = tokens[start : start + h * w]
            start += h * w
            small = downsample_grid(_window_to_grid(part, h, w, merge), s)
            out.append(_grid_to_window(small, merge))
    return torch.cat(out)


def patch_compression(model: Any, family: str, s: int) -> None:
    """Insert VTC between `model`'s vision encoder and connector, in place."""
    inner = model.model
    if family == "qwen2_vl":
        visual, merge = inner.visual, inner.visual.spatial_merge_size
        run_visual = visual.forward

        def forward(hidden_states: Tensor, grid_thw: Tensor, **kwargs: Any) -> Any:
            real = grid_thw.clone()
            real[:, 1:] *= s
            hook = visual.merger.register_forward_pre_hook(
                lambda _m, args: (compress_qwen_tokens(args[0], real, s, merge), *args[1:])
            )
            try:
                return run_visual(hidden_states, grid_thw=real, **kwargs)
            finally:
                hook.remove()

        visual.forward = forward
        return
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
        self.native_size = _first(getattr(vision, "image_size", 448))  # Qwen2-VL: dynamic
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

    def _llm_grid(self) -> int:
        """Side of the patch grid the language model is told about (after compression)."""
        return self.image_size // self.patch_size // self.compression

    def image_token_count(self) -> int:
        grid = self.image_size // self.patch_size
        spatial = compressed_count((grid, grid), self.compression)
        config = self.model.config
        if self.family == "qwen2_vl":
            merge = config.vision_config.spatial_merge_size
            if self._llm_grid() % merge:
                raise ValueError(
                    f"Qwen2-VL grid {grid} / compression {self.compression} is not a multiple "
                    f"of its {merge}x{merge} patch merge; choose another image_size"
                )
            return spatial // merge**2
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
        self,
        ids: Tensor,
        mask: Tensor,
        pixels: Tensor | None,
        causal_start: Tensor | None,
        features: Tensor | None = None,
    ) -> Tensor:
        """Causal LM: stage-1 targets are already causal, so `causal_start` is not needed."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.family == "qwen2_vl":
            return self.model.model(**kwargs | self._qwen_inputs(ids, pixels)).last_hidden_state
        kwargs["position_ids"] = position_ids(mask)
        if pixels is not None:
            pixels = pixels.to(self.model.dtype)
            kwargs["pixel_values"] = pixels.flatten(0, 1) if self.family == "internvl" else pixels
        return self.model.model(**kwargs).last_hidden_state

    def _qwen_inputs(self, ids: Tensor, pixels: Tensor | None) -> dict[str, Any]:
        """Qwen2-VL's image inputs: flattened patches, the *compressed* grid per image (for
        M-RoPE and placeholders; `patch_compression` restores the real one for the vision
        tower) and the token types M-RoPE needs. Without images the model counts positions."""
        if pixels is None:
            return {}
        vision = self.model.config.vision_config
        flat = pixels.flatten(0, 1).to(self.model.dtype)
        side = self._llm_grid()
        grid = torch.tensor([[1, side, side]] * flat.shape[0], device=ids.device)
        patches = qwen_patches(
            flat, self.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
        )
        types = (ids == self.model.config.image_token_id).int()
        return {"pixel_values": patches, "image_grid_thw": grid, "mm_token_type_ids": types}

    def lm_logits(self, hidden: Tensor, token_ids: list[int] | None = None) -> Tensor:
        head = self.model.get_output_embeddings()
        weight = head.weight if token_ids is None else head.weight[token_ids]
        bias = head.bias if head.bias is None or token_ids is None else head.bias[token_ids]
        return torch.nn.functional.linear(hidden, weight, bias)
