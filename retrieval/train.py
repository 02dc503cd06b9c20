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
    "train": {"seed": 0, "device": "auto", "grad_clip": 1.0, "log_every": 10, "cache_images": 4096},
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
def _score_all(run: Run, embedder: TileEmbedder) -> Tensor:
    """(Q, C) caption-query x tile scores over all training tiles with the fixed captions."""
    embedder.eval()
    n, chunk = len(run.tiles), 32
    tiles = [
        embedder.embed_tiles(run.images(range(i, min(i + chunk, n)), embedder.image_size))
        for i in range(0, n, chunk)
    ]
    queries = [
        embedder.embed_queries(run.fixed_captions[i : i + chunk]) for i in range(0, n, chunk)
    ]
    return torch.cat(queries) @ torch.cat(tiles).T


def _contrastive_loss(
    run: Run, embedder: TileEmbedder, negatives: Tensor | None, mask: Tensor | None
) -> Callable[[np.ndarray], Tensor]:
    """InfoNCE of fresh captions vs their tiles, + per-query hard negatives (Q, K) if given."""

    def loss(batch: np.ndarray) -> Tensor:
        size = embedder.image_size
        q = embedder.embed_queries(run.captions(batch))
        c = embedder.embed_tiles(run.images(batch, size))
        if negatives is None:
            return info_nce(q, c)
        hard_ids = negatives[batch]
        hard = embedder.embed_tiles(run.images(hard_ids.flatten().tolist(), size))
        hard_mask = None if mask is None else mask[batch].to(run.device)
        return info_nce(q, c, hard.view(len(batch), hard_ids.shape[1], -1), hard_mask=hard_mask)

    return loss


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
    return apply_lora(embedder, run.cfg["lora"]) if enabled else (lambda: None)


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
    scores = _score_all(run, embedder)
    positives = torch.arange(len(run.tiles))
    lo, hi = cfg["mine_ranks"]
    mined = mine_hard_negatives(scores, positives, run.rng, cfg["hard_negatives"], lo, hi)
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
    scores = _score_all(run, embedder)
    ranked = top_k(scores, torch.arange(len(run.tiles)), cfg["top_k"])
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
        embedder = _start_model(run, stage)
        start = time.time()
        with atomic_dir(folder) as tmp:
            STAGE_FUNCTIONS[stage](run, embedder, tmp)
        run.log(stage=stage, done=True, seconds=round(time.time() - start, 1))
    _publish(out)
    return out


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
