"""OpenCLIP dual encoders (RemoteCLIP, GeoRSCLIP, SkyCLIP, ...) as zero-shot tile embedders.

A model reference is `open_clip:ARCH:PRETRAINED`:

- PRETRAINED a **checkpoint file** (`.pt`, `.pth`, `.bin`, `.safetensors`): the ARCH model of
  open_clip with these weights. The remote-sensing CLIPs ship three layouts, all accepted:
  RemoteCLIP a plain open_clip state dict (`visual.conv1.weight`, `transformer.resblocks.0...`);
  SkyCLIP an open_clip *training* checkpoint (`{"epoch", "state_dict": {"module.visual...`}`);
  GeoRSCLIP a state dict that may come wrapped by its Lightning dual-encoder (`{"state_dict":
  {"model.visual...}}`). Wrappers (`state_dict`, `model`) and prefixes (`module.`, `model.`,
  `clip.`, `_orig_mod.`) are peeled off until the keys are the model's; a key the model lacks
  or misses is an error that names it (a wrong ARCH shows up here, not as silent garbage).
- PRETRAINED an **open_clip tag** (`laion2b_s34b_b79k`, `openai`) or an **`hf-hub:` id**: open_clip
  resolves it (from its cache; this machine downloads nothing).

The embedder has the `TileEmbedder` interface used by index, search and evaluation (no training:
zero-shot), and serves `train-retrieval` as a distillation teacher (`retrieval.train`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PREFIX = "open_clip:"
QUERY_TEMPLATE = "an aerial photo of {text}"
"""CLIP-style prompt around a text query (the remote-sensing CLIPs were trained on captions of
aerial and satellite images)."""
WRAPPERS = ("state_dict", "model")
PREFIXES = ("module.", "model.", "clip.", "_orig_mod.")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")
"""Extra entries of OpenAI's JIT archives: not weights."""


def is_open_clip(ref: str | Path) -> bool:
    return str(ref).startswith(PREFIX)


def parse_ref(ref: str) -> tuple[str, str]:
    """`open_clip:ARCH:PRETRAINED` -> (ARCH, PRETRAINED); PRETRAINED may itself hold colons."""
    parts = str(ref)[len(PREFIX) :].split(":", 1)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValueError(
            f"bad OpenCLIP model {ref!r}; use open_clip:ARCH:PRETRAINED, e.g. "
            "open_clip:ViT-B-32:/models/RemoteCLIP-ViT-B-32.pt"
        )
    return parts[0], parts[1]


def create_open_clip(arch: str, pretrained: str) -> nn.Module:
    """The open_clip model of a parsed reference, weights loaded (see the module docstring)."""
    import open_clip

    if pretrained.startswith("hf-hub:"):
        return open_clip.create_model(pretrained)
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown OpenCLIP architecture {arch!r} (open_clip.list_models())")
    path = Path(pretrained).expanduser()
    if path.suffix in CHECKPOINT_SUFFIXES or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"OpenCLIP checkpoint {path} not found")
        model = open_clip.create_model(arch, pretrained=None)
        load_checkpoint(model, path)
        return model
    return open_clip.create_model(arch, pretrained=pretrained)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, wrappers peeled (no pickled code is executed)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: a pickled module, not weights
        raise ValueError(
            f"{path} is not a state dict that loads without running pickled code "
            f"({type(exc).__name__}); re-save it with torch.save(model.state_dict(), ...)"
        ) from exc
    while isinstance(obj, dict) and any(isinstance(obj.get(w), dict) for w in WRAPPERS):
        obj = next(obj[w] for w in WRAPPERS if isinstance(obj.get(w), dict))
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return {k: v for k, v in obj.items() if k not in IGNORED_KEYS}


def match_keys(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Strip `PREFIXES` while that makes more keys match the model's."""
    while True:
        hits = len(expected & set(state))
        best = None
        for prefix in PREFIXES:
            stripped = {k.removeprefix(prefix): v for k, v in state.items()}
            if len(expected & set(stripped)) > hits:
                best, hits = stripped, len(expected & set(stripped))
        if best is None:
            return state
        state = best


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a RemoteCLIP / GeoRSCLIP / SkyCLIP style checkpoint into an open_clip model."""
    model.load_state_dict(fit_state_dict(model, read_state_dict(path), str(path)), strict=False)


def fit_state_dict(model: nn.Module, state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """`state` with its keys matched to `model`'s; ValueError naming missing/unexpected keys."""
    expected = model.state_dict()
    state = match_keys(state, set(expected))
    if "logit_scale" in state and "logit_scale" in expected:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    optional = {"logit_bias"} if getattr(model, "logit_bias", None) is None else set()
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} does not fit this OpenCLIP architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:3]})"
        )
    return state


class OpenCLIPEmbedder(nn.Module):
    """An OpenCLIP model with the embedder interface (tiles and text queries, L2-normalised)."""

    def __init__(self, ref: str, model: nn.Module | None = None):
        super().__init__()
        import open_clip

        self.ref = ref
        arch, pretrained = parse_ref(ref)
        self.model = model if model is not None else create_open_clip(arch, pretrained)
        name = pretrained if pretrained.startswith("hf-hub:") else arch
        self.tokenizer = open_clip.get_tokenizer(name)
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(self.model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, list | tuple) else size)
        self.mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self.compression = 1

    @property
    def dim(self) -> int:
        return int(self.model.visual.output_dim)

    def visual_tokens(self) -> int:
        """Patch tokens of the ViT (no compression: a zero-shot baseline)."""
        grid = getattr(self.model.visual, "grid_size", None)
        return int(grid[0] * grid[1]) if grid else 0

    @property
    def fingerprint(self) -> str:
        from retrieval.embedder import weights_digest

        digest = hashlib.sha256(f"{PREFIX}{QUERY_TEMPLATE}".encode())
        digest.update(weights_digest(self.model).encode())
        return digest.hexdigest()[:16]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_tiles(self, images: Tensor, texts: list[str] | None = None) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, dim); CLIP has no tile+text input."""
        if texts is not None:
            raise ValueError("OpenCLIP embedders embed tiles without text")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) RGB tiles, got shape {tuple(images.shape)}")
        x = images.to(self._device()).float()
        size = (self.image_size, self.image_size)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True).clamp(0, 1)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            return F.normalize(self.model.encode_image((x - mean) / std).float(), dim=-1)

    def embed_queries(self, texts: list[str]) -> Tensor:
        if not texts or any(not t.strip() for t in texts):
            raise ValueError("empty query text")
        return self.embed_texts([QUERY_TEMPLATE.format(text=t.strip()) for t in texts])

    def embed_texts(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(texts).to(self._device())
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
