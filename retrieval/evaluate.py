"""Text → tile retrieval quality on held-out tiles: Recall@1/5/10 and nDCG@5, graded by labels.

Protocol: one query per test-split tile (`captions.query_for`, templates never used in
training), ranked against every tile that training never saw (all splits but `train`). A
candidate's relevance to a query is `captions.relevance(query tile, candidate)`, 0..3.

- Recall@K: share of queries with a fully relevant (grade 3) tile among the top K. The query's
  own tile is always grade 3, so this is the usual "ground truth in the top K", made fair for
  the many look-alike tiles of a land-cover archive.
- nDCG@5: gain 2^grade − 1, log2 discount, normalised by the ideal order of all candidates.

Each model is evaluated as embedder alone (E) and, when it has a reranker, embedder + reranker
on the top 5 (E+R), so one table compares compression factors and the reranker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg.builder.writers import write_bytes_atomic, write_json
from geoseg.device import AUTO, resolve_device
from retrieval.captions import query_for, relevance
from retrieval.data import TileInfo, load_tiles, tile_rgb
from retrieval.index import open_embedder
from retrieval.rerank import RERANK_TOP, load_reranker, rerank_order

RECALL_KS = (1, 5, 10)
NDCG_K = 5
FULLY_RELEVANT = 3


def recall_at_k(ranked: Sequence[Sequence[int]], k: int) -> float:
    """Share of queries whose top k holds a grade-3 candidate (`ranked`: grades in rank order)."""
    return float(np.mean([any(g >= FULLY_RELEVANT for g in r[:k]) for r in ranked]))


def ndcg_at_k(ranked: Sequence[int], pool: Sequence[int], k: int) -> float:
    """nDCG@k of one ranking; `pool` = grades of all candidates (for the ideal ranking)."""

    def dcg(grades: Sequence[int]) -> float:
        return sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(grades[:k]))

    ideal = dcg(sorted(pool, reverse=True))
    return dcg(ranked) / ideal if ideal > 0 else 0.0


@dataclass(frozen=True)
class Candidates:
    """Held-out tiles with their images, embedded once per model."""

    tiles: list[TileInfo]
    images: torch.Tensor


def held_out(data: Path, query_split: str = "test") -> tuple[list[TileInfo], Candidates]:
    tiles = load_tiles(data)
    queries = [t for t in tiles if t.split == query_split]
    if not queries:
        raise ValueError(f"{data} has no {query_split!r} tiles to query with")
    pool = [t for t in tiles if t.split != "train"]
    images = torch.stack([tile_rgb(data, t.tile_id) for t in pool])
    return queries, Candidates(pool, images)


def evaluate_retrieval(
    data: Path,
    models: Sequence[Path],
    out: Path,
    *,
    split: str = "test",
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device = AUTO,
) -> list[dict[str, Any]]:
    """One row per model (and per model + its reranker); writes out/metrics.json and table.md.

    A model is an embedder folder or a `train-retrieval` run folder (`embedder/`, and
    `reranker/` when trained).
    """
    device = resolve_device(device)
    queries, cands = held_out(Path(data), split)
    texts = [query_for(t, np.random.default_rng([seed, i])) for i, t in enumerate(queries)]
    grades = np.array([[relevance(q, c) for c in cands.tiles] for q in queries])
    rows = []
    for model in models:
        model = Path(model)
        folder = model / "embedder" if (model / "embedder").is_dir() else model
        embedder = open_embedder(folder, device=device)
        with torch.inference_mode():
            tiles = torch.cat(
                [
                    embedder.embed_tiles(cands.images[i : i + batch_size].to(device))
                    for i in range(0, len(cands.tiles), batch_size)
                ]
            )
            scores = (embedder.embed_queries(texts) @ tiles.T).float().cpu().numpy()
        order = np.argsort(-scores, axis=1, kind="stable")
        base = {"model": str(model), "visual_tokens": int(embedder.visual_tokens())}
        rows.append(base | {"reranker": False} | _metrics(order, grades))
        reranker_dir = model / "reranker"
        if reranker_dir.is_dir():
            reranked = _rerank(reranker_dir, texts, order, cands, device)
            rows.append(base | {"reranker": True} | _metrics(reranked, grades))
    out = Path(out)
    summary = {
        "queries": len(queries),
        "candidates": len(cands.tiles),
        "split": split,
        "seed": seed,
        "query_texts": dict(zip([q.tile_id for q in queries], texts, strict=True)),
        "rows": rows,
    }
    write_json(out / "metrics.json", summary)
    table = markdown_table(rows, len(queries), len(cands.tiles))
    write_bytes_atomic(out / "table.md", lambda p: p.write_text(table))
    return rows


def _metrics(order: np.ndarray, grades: np.ndarray) -> dict[str, float]:
    ranked = [grades[q, order[q]].tolist() for q in range(len(order))]
    metrics = {f"recall@{k}": recall_at_k(ranked, k) for k in RECALL_KS}
    metrics[f"ndcg@{NDCG_K}"] = float(
        np.mean([ndcg_at_k(r, grades[q].tolist(), NDCG_K) for q, r in enumerate(ranked)])
    )
    return metrics


def _rerank(
    path: Path, texts: list[str], order: np.ndarray, cands: Candidates, device: torch.device
) -> np.ndarray:
    """Each query's ranking with its top `RERANK_TOP` re-ordered by the reranker."""
    reranker = load_reranker(path, device=device)
    out = order.copy()
    for q, text in enumerate(texts):
        head = order[q, :RERANK_TOP]
        out[q, :RERANK_TOP] = head[rerank_order(reranker, text, cands.images[head].to(device))[0]]
    return out


def markdown_table(rows: list[dict[str, Any]], queries: int, candidates: int) -> str:
    keys = [f"recall@{k}" for k in RECALL_KS] + [f"ndcg@{NDCG_K}"]
    lines = [
        f"{queries} text queries (held-out test tiles) over {candidates} unseen tiles",
        "",
        "| model | visual tokens / tile | reranker | " + " | ".join(keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for r in rows:
        cells = [r["model"], str(r["visual_tokens"]), "top-5" if r["reranker"] else "—"]
        lines.append("| " + " | ".join(cells + [f"{r[k]:.3f}" for k in keys]) + " |")
    return "\n".join(lines) + "\n"
