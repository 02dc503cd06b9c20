"""Retrieval backbones: the offline default (CNN + MiniLM) and Hugging Face MLLMs, all with VTC."""

from __future__ import annotations

from typing import Any

from retrieval.backbones.base import Backbone

KINDS = ("default", "internvl", "idefics3", "qwen2_vl")


def create_backbone(spec: dict[str, Any], tokenizer: Any = None) -> Backbone:
    """Build a backbone from its `spec()` (or a config's `backbone` section).

    `kind` picks the class; the remaining keys are its constructor arguments. The HF classes are
    imported only when asked for, so the default path never pays for them.
    """
    args = dict(spec)
    kind = args.pop("kind", "default")
    if kind == "default":
        from retrieval.backbones.default import OfflineBackbone

        return OfflineBackbone(**args, tokenizer=tokenizer)
    if kind in KINDS:
        from retrieval.backbones.hf import HFBackbone

        return HFBackbone(**args, tokenizer=tokenizer)
    raise ValueError(f"unknown backbone kind {kind!r}; choose from {list(KINDS)}")
