"""`train_retrieval`: the Magic-MM-Embedding recipe on a geoseg build (papers.md part 2, §2.3).

Stages (each resumable: a finished stage is a folder under RUN/stages/ and is skipped on rerun):

1. generative - next-token restoration of a tile caption given the tile (full fine-tuning).
2. contrastive - InfoNCE (τ = 0.03) with in-batch negatives (warm-up), then global hard-negative
   mining over all training tiles (2 negatives from ranks 50-100, clipped for small corpora, see
   `retrieval.mining`) and retraining with them. LoRA on the language model optional.
3. judge - the stage-2 model ranks all training tiles per caption; a `Judge` labels the top-20;
   retraining adds 12 judge-verified hard negatives per query (GT stays the only positive).
4. reranker - initialised from stage 1, trained pointwise (yes/no) + listwise (position) on the
   judged data; written to RUN/reranker/.

Only `split == "train"` tiles are read: val/test tiles are never seen, so the evaluation on the
test split is held out. Captions are redrawn every step (varied phrasing); mining and judging
use one fixed caption per tile. RUN/embedder/ is the latest finished embedder stage.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from geoseg.builder.writers import write_bytes_atomic
from geoseg.device import resolve_device
from retrieval.amounts import CompositionHead, fit_composition
from retrieval.embedder import TileEmbedder, atomic_dir, create_embedder, load_embedder
from retrieval.judge import Judge, JudgePair, LabelJudge, MLLMJudge
from retrieval.losses import info_nce, listwise_loss, pointwise_loss
from retrieval.mining import mine_hard_negatives, top_k
from retrieval.rerank import Reranker

STAGES = ("generative", "contrastive", "judge", "reranker")
CAPTION_PROMPT = "Describe the given aerial image tile."

DEFAULTS: dict[str, Any] = {
    "model": {"backbone": {"kind": "default"}, "max_text_tokens": 48},
    "generative": {"steps": 200, "lr": 1.0e-4, "batch_size": 16},
    "contrastive": {
        "steps": 200,
        "retrain_steps": 200,
        "lr": 2.0e-4,
        "batch_size": 32,
        "hard_negatives": 2,
        "mine_ranks": [50, 100],
        "lora": False,
    },
    "judge": {
        "steps": 200,
        "lr": 2.0e-4,
        "batch_size": 8,
        "top_k": 20,
        "hard_negatives": 12,
        "judge": "label",
        "min_grade": 2,
        "judge_model": None,
        "lora": False,
    },
    "reranker": {"steps": 200, "lr": 4.0e-5, "batch_size": 8, "list_negatives": [2, 5]},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": None},
    "train": {
        "seed": 0,
        "device": "auto",
        "grad_clip": 1.0,
        "log_every": 10,
        "cache_images": 4096,
        "augment": 8,
        "caption_bank": 16,
    },
    "teacher": {"model": None, "weight": 1.0, "tau": 0.05},
}


def resolve_config(config: str | Path | dict[str, Any], max_steps: int | None) -> dict[str, Any]:
    """Defaults <- config (unknown keys are errors); `max_steps` caps every stage's steps."""
    given = config if isinstance(config, dict) else yaml.safe_load(Path(config).read_text())
    resolved = copy.deepcopy(DEFAULTS)
    for section, values in (given or {}).items():
        if section not in resolved:
            raise ValueError(f"unknown config section {section!r}; use {sorted(resolved)}")
        if section == "model":
            resolved[section] = {**resolved[section], **values}
            continue
        unknown = set(values) - set(resolved[section])
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in config section {section!r}")
        resolved[section].update(values)
    if max_steps is not None:
        for section in STAGES:
            for key in ("steps", "retrain_steps"):
                if key in resolved[section]:
                    resolved[section][key] = min(resolved[section][key], max_steps)
    return resolved


class Run:
    """Shared state of one training run: tiles, images, captions, log, device."""

    def __init__(self, cfg: dict[str, Any], data: Path, out: Path):
        from retrieval.captions import captions
        from retrieval.data import load_tiles, tile_rgb

        self.cfg, self.data, self.out = cfg, data, out
        train = cfg["train"]
        self.device = resolve_device(train["device"])
        self.rng = np.random.default_rng(train["seed"])
        torch.manual_seed(train["seed"])
        self.tiles = load_tiles(data, "train")
        if len(self.tiles) < 2:
            raise ValueError(f"{data} has {len(self.tiles)} training tiles; need at least 2")
        self._captions = captions
        # (3, H, W) RGB of training tile i; the most recent `cache_images` stay in memory
        self.image = lru_cache(maxsize=train["cache_images"])(
            lambda i: tile_rgb(data, self.tiles[i].tile_id)
        )
        # one fixed caption per tile: the queries that mining and the judge rank for
        fixed = np.random.default_rng(train["seed"] + 1)
        self.fixed_captions = [captions(t, fixed)[0] for t in self.tiles]
        self._features: dict[tuple[int, int], Tensor] = {}
        self._bank: dict[int, tuple[Tensor, list[str]]] = {}
        self.teacher = Teacher(cfg["teacher"], self) if cfg["teacher"]["model"] else None

    def views(self, indices: Sequence[int]) -> list[int]:
        """A random dihedral view (flips, 90° turns: an aerial tile has no "up") per tile, out
        of the first `train.augment`."""
        return [int(self.rng.integers(self.cfg["train"]["augment"])) for _ in indices]

    def tile_vectors(
        self, embedder: TileEmbedder, indices: Sequence[int], views: Sequence[int] | None = None
    ) -> Tensor:
        """(N, dim) embeddings of training tiles, each in its `views` entry (None: as it is).
        A frozen vision tower's features are computed once per (tile, view) and reused."""
        views = list(views) if views is not None else [0] * len(indices)
        keys = [(int(i), v) for i, v in zip(indices, views, strict=True)]
        if not embedder.backbone.caches_vision:
            images = self.images([i for i, _ in keys], embedder.image_size)
            return embedder.embed_tiles(
                torch.stack([dihedral(x, v) for x, (_, v) in zip(images, keys, strict=True)])
            )
        missing = [k for k in dict.fromkeys(keys) if k not in self._features]
        for start in range(0, len(missing), 32):
            chunk = missing[start : start + 32]
            images = self.images([i for i, _ in chunk], embedder.image_size)
            turned = torch.stack([dihedral(x, v) for x, (_, v) in zip(images, chunk, strict=True)])
            self._features |= dict(zip(chunk, embedder.tile_features(turned), strict=True))
        return embedder.embed_features(torch.stack([self._features[k] for k in keys]))

    def images(self, indices: Sequence[int], size: int) -> Tensor:
        """(N, 3, size, size) RGB of training tiles (resized here so batches stack)."""
        resized = [
            torch.nn.functional.interpolate(
                self.image(int(i))[None], size=(size, size), mode="bilinear", antialias=True
            )[0]
            for i in indices
        ]
        return torch.stack(resized).to(self.device)

    def captions(self, indices: Sequence[int]) -> list[str]:
        return [self._captions(self.tiles[i], self.rng)[0] for i in indices]

    def caption_vectors(
        self, embedder: TileEmbedder, indices: Sequence[int]
    ) -> tuple[Tensor, list[str]]:
        """(N, dim) query embeddings of fresh captions of the tiles, and the captions. A frozen
        text side (`freeze_lm`, no LoRA adapters) gives the same vector for the same caption, so
        each tile gets a bank of `train.caption_bank` captions embedded once, and a step draws
        from it."""
        if _text_learns(embedder):
            texts = self.captions(indices)
            return embedder.embed_queries(texts), texts
        size = self.cfg["train"]["caption_bank"]
        todo = [i for i in dict.fromkeys(int(i) for i in indices) if i not in self._bank]
        if todo:
            texts = [c for i in todo for c in self._captions(self.tiles[i], self.rng, n=size)]
            with torch.no_grad():
                vectors = torch.cat(
                    [embedder.embed_queries(texts[j : j + 64]) for j in range(0, len(texts), 64)]
                )
            for k, i in enumerate(todo):
                part = slice(k * size, (k + 1) * size)
                self._bank[i] = (vectors[part], texts[part])
        picks = [(self._bank[int(i)], int(self.rng.integers(size))) for i in indices]
        return torch.stack([v[p] for (v, _), p in picks]), [t[p] for (_, t), p in picks]

    def batches(self, batch_size: int, steps: int) -> Iterator[np.ndarray]:
        """`steps` batches of distinct tiles (in-batch negatives must not repeat the positive)."""
        size = min(batch_size, len(self.tiles))
        for _ in range(steps):
            yield self.rng.choice(len(self.tiles), size, replace=False)

    def ids(self, indices: Sequence[int]) -> list[str]:
        return [self.tiles[i].tile_id for i in indices]

    def log(self, **record: Any) -> None:
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def dihedral(image: Tensor, view: int) -> Tensor:
    """View 0-7 of a (C, H, W) image under the dihedral group: 0 = unchanged, 1-3 = turned by
    90°·view, 4-7 = the same after a left-right flip."""
    if view >= 4:
        image = image.flip(-1)
    return torch.rot90(image, view % 4, dims=(-2, -1))


def _text_learns(embedder: TileEmbedder) -> bool:
    """Whether a training step changes caption embeddings: an unfrozen language model, or LoRA
    adapters (`contrastive.lora`, `judge.lora`) on a frozen one."""
    backbone = embedder.backbone
    if not getattr(backbone, "freeze_lm", False):
        return True
    return any(p.requires_grad for p in backbone.get_submodule(backbone.lm_attr).parameters())


def _optimise(
    run: Run,
    stage: str,
    module: torch.nn.Module,
    steps: int,
    lr: float,
    loss_fn: Callable[[np.ndarray], Tensor],
    batch_size: int,
) -> None:
    """AdamW over the trainable parameters, gradient clipping, a log line every log_every."""
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr)
    every = run.cfg["train"]["log_every"]
    for step, batch in enumerate(run.batches(batch_size, steps), start=1):
        loss = loss_fn(batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, run.cfg["train"]["grad_clip"])
        optimiser.step()
        if step % every == 0 or step == steps:
            run.log(stage=stage, step=step, loss=round(loss.item(), 5))


@torch.no_grad()
def _embed_all(run: Run, embedder: TileEmbedder, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """(fixed-caption query vectors, tile vectors) of every training tile, in chunks: mining and
    judging search them through faiss (`retrieval.mining`), never as an n×n score matrix."""
    embedder.eval()
    n = len(run.tiles)
    tiles = [run.tile_vectors(embedder, range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    queries = [
        embedder.embed_queries(run.fixed_captions[i : i + chunk]) for i in range(0, n, chunk)
    ]
    return torch.cat(queries), torch.cat(tiles)


def _contrastive_loss(
    run: Run, embedder: TileEmbedder, negatives: Tensor | None, mask: Tensor | None
) -> Callable[[np.ndarray], Tensor]:
    """InfoNCE of fresh captions vs their tiles, + per-query hard negatives (Q, K) if given,
    + the teacher's relational distillation when a teacher is configured."""

    def loss(batch: np.ndarray) -> Tensor:
        q, texts = run.caption_vectors(embedder, batch)
        views = run.views(batch)
        c = run.tile_vectors(embedder, batch, views)
        extra = torch.zeros((), device=c.device)
        if run.teacher is not None:
            extra = run.teacher.loss(q, c, batch, views, texts)
        if negatives is None:
            return info_nce(q, c) + extra
        hard_ids = negatives[batch].flatten().tolist()
        hard = run.tile_vectors(embedder, hard_ids, run.views(hard_ids))
        hard_mask = None if mask is None else mask[batch].to(run.device)
        hard = hard.view(len(batch), negatives.shape[1], -1)
        return info_nce(q, c, hard, hard_mask=hard_mask) + extra

    return loss


class Teacher:
    """An OpenCLIP model (`teacher.model: open_clip:ARCH:PRETRAINED`) distilled into the
    embedder: for each batch the student's caption-to-tile score distribution (rows and
    columns, softmax at τ = losses.TAU) is pulled towards the teacher's (its own image and text
    embeddings of the same tiles and captions, softmax at `teacher.tau`) by KL divergence. It
    compares similarities, not vectors, so the two embedding spaces may differ in size; the
    student inherits what the teacher knows about words the captions never use. Teacher
    vectors are computed once per (tile, view) and caption."""

    def __init__(self, cfg: dict[str, Any], run: Run):
        from retrieval.backbones.openclip import OpenCLIPEmbedder

        self.model = OpenCLIPEmbedder(cfg["model"]).to(run.device).eval()
        self.weight, self.tau, self.run = cfg["weight"], cfg["tau"], run
        self._images: dict[tuple[int, int], Tensor] = {}
        self._texts: dict[str, Tensor] = {}

    @torch.no_grad()
    def _vectors(
        self, batch: Sequence[int], views: Sequence[int], texts: list[str]
    ) -> tuple[Tensor, Tensor]:
        keys = [(int(i), v) for i, v in zip(batch, views, strict=True)]
        todo = [k for k in dict.fromkeys(keys) if k not in self._images]
        if todo:
            images = self.run.images([i for i, _ in todo], self.model.image_size)
            images = torch.stack([dihedral(x, v) for x, (_, v) in zip(images, todo, strict=True)])
            self._images |= dict(zip(todo, self.model.embed_tiles(images), strict=True))
        new = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if new:
            self._texts |= dict(zip(new, self.model.embed_texts(new), strict=True))
        return torch.stack([self._texts[t] for t in texts]), torch.stack(
            [self._images[k] for k in keys]
        )

    def loss(
        self, q: Tensor, c: Tensor, batch: Sequence[int], views: Sequence[int], texts: list[str]
    ) -> Tensor:
        from retrieval.losses import TAU, relational_kd

        tq, tc = self._vectors(batch, views, texts)
        return self.weight * relational_kd(q @ c.T / TAU, (tq @ tc.T / self.tau).to(q.device))


def apply_lora(embedder: TileEmbedder, lora: dict[str, Any]) -> Callable[[], None]:
    """Wrap the backbone's language model in peft LoRA adapters (the LM's own weights freeze,
    the vision encoder and connector stay trainable); returns the step that merges them back."""
    from peft import LoraConfig, get_peft_model

    backbone = embedder.backbone
    parent_path, _, name = backbone.lm_attr.rpartition(".")
    parent = backbone.get_submodule(parent_path) if parent_path else backbone
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["targets"] or backbone.lora_targets),
    )
    setattr(parent, name, get_peft_model(getattr(parent, name), config))

    def merge() -> None:
        setattr(parent, name, getattr(parent, name).merge_and_unload())

    return merge


def _maybe_lora(run: Run, embedder: TileEmbedder, enabled: bool) -> Callable[[], None]:
    if not enabled:
        return lambda: None
    run._bank.clear()  # caption vectors of the text side before its adapters learn
    return apply_lora(embedder, run.cfg["lora"])


def _stage_generative(run: Run, embedder: TileEmbedder, folder: Path) -> None:
    cfg = run.cfg["generative"]
    backbone = embedder.backbone

    def loss(batch: np.ndarray) -> Tensor:
        images = run.images(batch, embedder.image_size).unsqueeze(1)
        prompts = [CAPTION_PROMPT] * len(batch)
        return backbone.lm_loss(images, prompts, run.captions(batch), embedder.max_text_tokens)

    _optimise(run, "generative", embedder, cfg["steps"], cfg["lr"], loss, cfg["batch_size"])
    embedder.save(folder / "embedder")


def _stage_contrastive(run: Run, embedder: TileEmbedder, folder: Path) -> None:
    cfg = run.cfg["contrastive"]
    merge = _maybe_lora(run, embedder, cfg["lora"])
    train = _contrastive_loss(run, embedder, None, None)
    _optimise(run, "contrastive", embedder, cfg["steps"], cfg["lr"], train, cfg["batch_size"])
    queries, tiles = _embed_all(run, embedder)
    positives = np.arange(len(run.tiles))
    lo, hi = cfg["mine_ranks"]
    mined = mine_hard_negatives(queries, tiles, positives, run.rng, cfg["hard_negatives"], lo, hi)
    run.log(stage="contrastive", mined=int(mined.numel()), per_query=int(mined.shape[1]))
    retrain = _contrastive_loss(run, embedder, mined, None)
    steps, lr, bs = cfg["retrain_steps"], cfg["lr"], cfg["batch_size"]
    _optimise(run, "contrastive-hnm", embedder, steps, lr, retrain, bs)
    merge()
    mined_ids = {run.tiles[q].tile_id: run.ids(row) for q, row in enumerate(mined.tolist())}
    (folder / "mined.json").write_text(json.dumps(mined_ids, indent=1))
    embedder.save(folder / "embedder")


def make_judge(run: Run) -> Judge:
    """The configured judge: `label` (offline) or `mllm` (judge_model = an HF id or path)."""
    cfg = run.cfg["judge"]
    if cfg["judge"] == "label":
        return LabelJudge(cfg["min_grade"])
    if cfg["judge"] == "mllm":
        if not cfg["judge_model"]:
            raise ValueError("judge: mllm needs judge.judge_model (an HF MLLM id or folder)")
        from retrieval.backbones import create_backbone
        from retrieval.backbones.hf import pretrained_spec

        spec = pretrained_spec(cfg["judge_model"], compression=1)
        return MLLMJudge(create_backbone(spec).to(run.device).eval())
    raise ValueError(f"unknown judge {cfg['judge']!r}; use 'label' or 'mllm'")


def _judge_candidates(
    run: Run, embedder: TileEmbedder, judge: Judge
) -> dict[int, dict[str, list[int]]]:
    """Top-K per query judged: relevant ones (reranker positives) and hard negatives, by tile
    index and in rank order."""
    cfg = run.cfg["judge"]
    queries, tiles = _embed_all(run, embedder)
    ranked = top_k(queries, tiles, np.arange(len(run.tiles)), cfg["top_k"])
    judged: dict[int, dict[str, list[int]]] = {}
    for q, row in enumerate(ranked.tolist()):
        pairs = [
            JudgePair(run.fixed_captions[q], run.tiles[q], run.tiles[c], run.image(c)) for c in row
        ]
        verdicts = judge(pairs)
        judged[q] = {
            "positives": [c for c, ok in zip(row, verdicts, strict=True) if ok],
            "negatives": [c for c, ok in zip(row, verdicts, strict=True) if not ok],
        }
    return judged


def _padded_negatives(
    judged: dict[int, dict[str, list[int]]], run: Run, k: int
) -> tuple[Tensor, Tensor]:
    """(Q, k) judged negatives per query in rank order, cycled when fewer; mask False where none."""
    negatives = torch.zeros((len(run.tiles), k), dtype=torch.long)
    mask = torch.zeros((len(run.tiles), k), dtype=torch.bool)
    for q in range(len(run.tiles)):
        found = judged[q]["negatives"]
        if found:
            negatives[q] = torch.tensor([found[i % len(found)] for i in range(k)])
            mask[q, : min(k, len(found))] = True
    return negatives, mask


def _stage_judge(run: Run, embedder: TileEmbedder, folder: Path) -> None:
    cfg = run.cfg["judge"]
    judged = _judge_candidates(run, embedder, make_judge(run))
    n_pos = sum(len(v["positives"]) for v in judged.values())
    n_neg = sum(len(v["negatives"]) for v in judged.values())
    run.log(stage="judge", judged_positive=n_pos, judged_negative=n_neg)
    negatives, mask = _padded_negatives(judged, run, cfg["hard_negatives"])
    merge = _maybe_lora(run, embedder, cfg["lora"])
    train = _contrastive_loss(run, embedder, negatives, mask)
    _optimise(run, "judge", embedder, cfg["steps"], cfg["lr"], train, cfg["batch_size"])
    merge()
    by_id = {
        run.tiles[q].tile_id: {kind: run.ids(found) for kind, found in entry.items()}
        for q, entry in judged.items()
    }
    (folder / "judged.json").write_text(json.dumps(by_id, indent=1))
    embedder.save(folder / "embedder")


def _stage_reranker(run: Run, embedder: TileEmbedder, folder: Path) -> None:
    """Pointwise + listwise training; positives = GT ∪ judge positives, negatives = judged."""
    cfg = run.cfg["reranker"]
    judged_path = run.out / "stages" / "judge" / "judged.json"
    judged = json.loads(judged_path.read_text()) if judged_path.is_file() else {}
    index = {t.tile_id: i for i, t in enumerate(run.tiles)}
    reranker = Reranker(embedder.backbone, embedder.max_text_tokens).to(run.device)
    n = len(run.tiles)
    lo, hi = cfg["list_negatives"]

    def pools(q: int) -> tuple[list[int], list[int]]:
        entry = judged.get(run.tiles[q].tile_id, {})
        negatives = [index[t] for t in entry.get("negatives", [])]
        positives = [index[t] for t in entry.get("positives", [])]
        return [q, *positives], negatives or [c for c in range(n) if c != q]

    def loss(batch: np.ndarray) -> Tensor:
        size = embedder.image_size
        queries = run.captions(batch)
        pos, neg, lists, where = [], [], [], []
        m = int(run.rng.integers(lo, hi + 1))
        for q in batch:
            positives, negatives = pools(int(q))
            pos.append(int(run.rng.choice(positives)))
            neg.append(int(run.rng.choice(negatives)))
            listed = list(run.rng.choice(negatives, m, replace=len(negatives) < m))
            k = int(run.rng.integers(0, m + 1))
            lists.append([*listed[:k], q, *listed[k:]])
            where.append(k)
        pairs = run.images(pos + neg, size)
        relevant = torch.tensor([True] * len(batch) + [False] * len(batch), device=run.device)
        point = pointwise_loss(reranker.yes_no(queries + queries, pairs), relevant)
        images = run.images([c for row in lists for c in row], size).view(
            len(batch), m + 1, 3, size, size
        )
        target = torch.tensor(where, device=run.device)
        return point + listwise_loss(reranker.positions(queries, images), target)

    _optimise(run, "reranker", reranker, cfg["steps"], cfg["lr"], loss, cfg["batch_size"])
    reranker.save(folder / "reranker")


STAGE_FUNCTIONS = {
    "generative": _stage_generative,
    "contrastive": _stage_contrastive,
    "judge": _stage_judge,
    "reranker": _stage_reranker,
}


def train_retrieval(
    config: str | Path | dict[str, Any],
    data: Path,
    out: Path,
    *,
    max_steps: int | None = None,
    stages: Sequence[str] = STAGES,
) -> Path:
    """Run the requested stages in order; returns `out`.

    Writes out/config.yaml (refuses an `out` holding a run with another config), out/log.jsonl,
    out/stages/<stage>/ (one atomic folder per finished stage; finished stages are skipped),
    out/embedder/ (the latest embedder stage, load_embedder-able) and out/reranker/.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {list(STAGES)}")
    cfg = resolve_config(config, max_steps)
    out = Path(out)
    run = Run(cfg, Path(data), out)  # bad data fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) != cfg:
        raise ValueError(f"{out} holds a run with another config; use a new --out")
    write_bytes_atomic(saved, lambda p: p.write_text(yaml.safe_dump(cfg, sort_keys=False)))
    for stage in [s for s in STAGES if s in stages]:
        folder = out / "stages" / stage
        if folder.is_dir():
            run.log(stage=stage, skipped="finished earlier")
            continue
        if not any(cfg[stage].get(k) for k in ("steps", "retrain_steps")):
            run.log(stage=stage, skipped="0 steps configured")
            continue
        embedder = _start_model(run, stage)
        start = time.time()
        with atomic_dir(folder) as tmp:
            STAGE_FUNCTIONS[stage](run, embedder, tmp)
        run.log(stage=stage, done=True, seconds=round(time.time() - start, 1))
    _publish(out)
    if (out / "embedder").is_dir():
        head = _fit_composition(run, out / "embedder")
        run.log(stage="composition", lam=head.lam, classes=list(head.classes))
    return out


@torch.inference_mode()
def _fit_composition(run: Run, folder: Path) -> CompositionHead:
    """Fit the published embedder's composition head (`retrieval.amounts`: image vector ->
    class shares) on the training tiles' labels, each tile also flipped and rotated (the same
    shares), and save it beside the embedder."""
    embedder = load_embedder(folder, run.device)
    batches = np.array_split(np.arange(len(run.tiles)), -(-len(run.tiles) // 32))
    views = (0, 4, 6, 1)  # `dihedral`: as is, flipped left-right, flipped up-down, turned 90°
    per_view: list[list[Tensor]] = [[] for _ in views]
    for b in batches:
        images = torch.stack([run.image(j) for j in b]).to(run.device)  # read once, all views
        for got, view in zip(per_view, views, strict=True):
            got.append(embedder.embed_tiles(dihedral(images, view)).float().cpu())
    vectors = [torch.cat(v).numpy() for v in per_view]
    classes = run.tiles[0].classes
    shares = np.array([[t.class_fractions.get(c, 0.0) for c in classes] for t in run.tiles])
    head = fit_composition(vectors[0], shares, classes, views=vectors[1:])
    head.save(folder)
    return head


def _start_model(run: Run, stage: str) -> TileEmbedder:
    """The model a stage starts from: the reranker from stage 1, the others from the latest
    finished earlier stage, else a fresh `create_embedder(model)`."""
    earlier = ["generative"] if stage == "reranker" else STAGES[: STAGES.index(stage)]
    for name in reversed(earlier):
        folder = run.out / "stages" / name / "embedder"
        if folder.is_dir():
            return load_embedder(folder, run.device)
    return create_embedder(run.cfg["model"]).to(run.device)


def _publish(out: Path) -> None:
    """Copy the latest embedder stage to out/embedder and the reranker to out/reranker."""
    import shutil

    for name in ("judge", "contrastive", "generative"):
        source = out / "stages" / name / "embedder"
        if source.is_dir():
            with atomic_dir(out / "embedder") as tmp:
                shutil.copytree(source, tmp, dirs_exist_ok=True)
            break
    reranker = out / "stages" / "reranker" / "reranker"
    if reranker.is_dir():
        with atomic_dir(out / "reranker") as tmp:
            shutil.copytree(reranker, tmp, dirs_exist_ok=True)
