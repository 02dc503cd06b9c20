"""`TileEmbedder`: an MLLM backbone read as an embedder (Magic-MM-Embedding, papers.md part 2).

Input = task instruction + visual context + text, for queries and candidates alike; the
embedding is the L2-normalised hidden state of the last token, and scores are dot products. The
instruction templates are part of the saved config (and so of the fingerprint): an index built
with one wording must not be queried with another.

A saved embedder is a folder: `config.yaml` (backbone spec + templates), `model.safetensors`
(all weights, the stage-1 LM head included) and `tokenizer/`. It is written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from geoseg.device import AUTO, resolve_device
from retrieval.amounts import CompositionHead
from retrieval.backbones import Backbone, create_backbone

TEMPLATES: dict[str, str] = {
    "query": "Find an aerial image tile that matches the given description: {text}",
    "tile": "Represent the given aerial image tile.",
    "tile_text": "Represent the given aerial image tile with its description: {text}",
    "text": "Represent the given description of an aerial image tile: {text}",
}
"""Instructions in the style of the paper's Tables 11-12: the query and the candidate kinds."""

CONFIG_KEYS = ("backbone", "templates", "max_text_tokens", "document_weight")

Document = list[tuple[float, tuple[str, ...]]]
"""A tile document (`retrieval.captions.document`): weighted facets, each a set of phrases."""


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; it replaces `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def weights_digest(module: nn.Module) -> str:
    """sha256 of every tensor of `module`'s state, in key order (dtype-agnostic byte view)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class TileEmbedder(nn.Module):
    """Embeds tiles (optionally with text) and text queries into one L2-normalised space.

    In training mode the embed methods build a graph; in eval mode (what `load_embedder`
    returns) they run without gradients.

    `document_weight` > 0: an indexed tile is embedded as the Magic-MM "image + text" candidate
    of its tile document (`embed_tiles(..., documents=)`): the image vector and the document
    vector (its facts written out, through the same text tower) are fused by this weight.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        templates: dict[str, str] | None = None,
        max_text_tokens: int = 64,
        document_weight: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= document_weight < 1.0:
            raise ValueError(f"document_weight must be in [0, 1), not {document_weight}")
        self.backbone = backbone
        self.templates = {**TEMPLATES, **(templates or {})}
        self.max_text_tokens = max_text_tokens
        self.document_weight = document_weight
        self._phrases: dict[str, Tensor] = {}
        self.composition: CompositionHead | None = None
        """Image vector -> class shares (`retrieval.amounts`), when the folder has one."""

    def train(self, mode: bool = True) -> TileEmbedder:
        """Also forgets cached phrase vectors: training changes nothing of a frozen text tower,
        but a trainable one would leave them stale."""
        self._phrases.clear()
        return super().train(mode)

    @property
    def dim(self) -> int:
        return self.backbone.hidden_size

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def compression(self) -> int:
        return self.backbone.compression

    def visual_tokens(self) -> int:
        """Tokens per tile the language model sees (after compression)."""
        return self.backbone.image_token_count()

    def config(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.spec(),
            "templates": dict(self.templates),
            "max_text_tokens": self.max_text_tokens,
            "document_weight": self.document_weight,
        }

    @property
    def fingerprint(self) -> str:
        """Stable hash of config + weights (recomputed on access: hashes all weights)."""
        digest = hashlib.sha256(yaml.safe_dump(self.config(), sort_keys=True).encode())
        digest.update(weights_digest(self).encode())
        return digest.hexdigest()[:16]

    def embed(
        self,
        images: Tensor | None,
        texts: list[str],
        template: str,
        features: Tensor | None = None,
    ) -> Tensor:
        """Embed `[images (B, M, 3, H, W) or None; template filled with each text]`; `features`
        (B, M, tokens, C) = the backbone's precomputed `visual_features` instead of images."""
        prompts = [self.templates[template].format(text=t) for t in texts]
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            hidden = self.backbone.hidden(images, prompts, self.max_text_tokens, features)
        return F.normalize(hidden.float(), dim=-1)

    def embed_tiles(
        self,
        images: Tensor,
        texts: list[str] | None = None,
        documents: list[Document | None] | None = None,
    ) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] [+ a text per tile in the sequence] [+ a tile document
        per tile, fused by `document_weight`; None for a tile without one (no labels): its image
        vector alone] -> (B, dim), L2-normalised."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) RGB tiles, got shape {tuple(images.shape)}")
        if texts is None:
            vectors = self.embed(images.unsqueeze(1), [""] * images.shape[0], "tile")
        else:
            vectors = self.embed(images.unsqueeze(1), texts, "tile_text")
        return vectors if documents is None else self.fuse_documents(vectors, documents)

    def fuse_documents(self, vectors: Tensor, documents: list[Document | None]) -> Tensor:
        """(B, dim) image vectors fused with their tiles' documents by `document_weight` (a
        tile without a document keeps its image vector)."""
        if not self.document_weight:
            return vectors
        if len(documents) != len(vectors):
            raise ValueError(f"{len(documents)} documents for {len(vectors)} tiles")
        w = self.document_weight
        fused = [
            v if d is None else F.normalize((1 - w) * v + w * self.embed_document(d).to(v), dim=0)
            for v, d in zip(vectors, documents, strict=True)
        ]
        return torch.stack(fused)

    @torch.no_grad()
    def embed_document(self, document: Document) -> Tensor:
        """(dim,) vector of a tile document: each facet is the mean of its phrases' text
        embeddings (`embed_texts`, cached: phrases repeat across tiles), normalised; the
        document is the weighted sum of its facets, normalised."""
        facets = [
            weight * F.normalize(self.phrase_vectors(phrases).mean(0), dim=0)
            for weight, phrases in document
        ]
        return F.normalize(torch.stack(facets).sum(0), dim=0)

    @torch.no_grad()
    def phrase_vectors(self, phrases: Sequence[str]) -> Tensor:
        """(P, dim) CPU float32 `embed_texts` vectors of document phrases, cached by phrase."""
        new = list(dict.fromkeys(p for p in phrases if p not in self._phrases))
        for i in range(0, len(new), 64):
            chunk = new[i : i + 64]
            self._phrases |= dict(zip(chunk, self.embed_texts(chunk).float().cpu(), strict=True))
        return torch.stack([self._phrases[p] for p in phrases])

    def tile_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, tokens, C) frozen visual features, for training
        loops that reuse them (`embed_features`); only when `backbone.caches_vision`."""
        with torch.no_grad():
            return self.backbone.visual_features(self.backbone.preprocess(images))

    def embed_features(self, features: Tensor) -> Tensor:
        """`embed_tiles` from precomputed `tile_features` (B, tokens, C) -> (B, dim)."""
        return self.embed(None, [""] * features.shape[0], "tile", features.unsqueeze(1))

    def embed_queries(self, texts: list[str]) -> Tensor:
        """Text queries (query instruction applied here) -> (B, dim), L2-normalised."""
        if not texts or any(not t.strip() for t in texts):
            raise ValueError("empty query text")
        return self.embed(None, texts, "query")

    def embed_texts(self, texts: list[str]) -> Tensor:
        """Text *candidates* (the candidate-side text template) -> (B, dim)."""
        return self.embed(None, texts, "text")

    def save(self, path: Path) -> None:
        """Write the embedder folder atomically (config.yaml, model.safetensors, tokenizer/)."""
        save_folder(self, self.config(), Path(path))


def save_folder(module: nn.Module, config: dict[str, Any], path: Path) -> None:
    """config.yaml + model.safetensors + tokenizer/ of a module holding a `backbone`."""
    with atomic_dir(path) as tmp:
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        save_model(module, str(tmp / "model.safetensors"))
        module.backbone.tokenizer.save_pretrained(tmp / "tokenizer")


def read_folder(path: Path) -> tuple[dict[str, Any], Backbone]:
    """The config and a backbone with random weights of a `save_folder` folder (load the
    weights with `load_model` once the owning module exists)."""
    from transformers import AutoTokenizer

    config = yaml.safe_load((path / "config.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    return config, create_backbone(config["backbone"], tokenizer=tokenizer)


def create_embedder(config: dict[str, Any]) -> TileEmbedder:
    """A new embedder from a config: `backbone` (spec; pretrained weights where it names
    them, random init otherwise), optional `templates`, `max_text_tokens`."""
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown embedder config keys {sorted(unknown)}; use {CONFIG_KEYS}")
    backbone = create_backbone(config.get("backbone") or {"kind": "default"})
    return TileEmbedder(
        backbone,
        templates=config.get("templates"),
        max_text_tokens=config.get("max_text_tokens", 64),
        document_weight=config.get("document_weight", 0.0),
    )


def load_embedder(path_or_hf_id: str | Path, device: str | torch.device = AUTO) -> Any:
    """A saved embedder folder, a raw HF MLLM (id or folder) wrapped with default settings, or
    an `open_clip:ARCH:PRETRAINED` zero-shot model, on `device` (`resolve_device`)."""
    run_on = resolve_device(device)
    from retrieval.backbones.openclip import OpenCLIPEmbedder, is_open_clip

    if is_open_clip(path_or_hf_id):
        return OpenCLIPEmbedder(str(path_or_hf_id)).to(run_on).eval()
    folder = Path(path_or_hf_id)
    if (folder / "config.yaml").is_file():
        config, backbone = read_folder(folder)
        embedder = TileEmbedder(
            backbone,
            templates=config["templates"],
            max_text_tokens=config["max_text_tokens"],
            document_weight=config.get("document_weight", 0.0),
        )
        load_model(embedder, str(folder / "model.safetensors"))
        embedder.composition = CompositionHead.load(folder)
    elif folder.exists() and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is neither an embedder folder nor an HF model folder")
    else:
        from retrieval.backbones.hf import pretrained_spec

        embedder = create_embedder({"backbone": pretrained_spec(str(path_or_hf_id))})
    return embedder.to(run_on).eval()
