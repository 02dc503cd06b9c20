"""Honest retrieval evaluation: hand-written queries graded by label rules, chance beside every
number, bootstrap intervals over queries, tiles streamed.

Text → tile: the queries of a query file (`retrieval/queries/eval.yaml` by default, written
apart from the caption grammar, `retrieval.queries`) are ranked over two pools of a build:
`index` (every tile, what `geoseg search` sees) and `unseen` (tiles of splits other than
`train`, which training never read). Per query: precision@10, hit@1/5/10, nDCG@10, each with
its chance level (random ranking) and, for P@10, its ceiling (a perfect ranking).

Tile → tile (`--like`): every tile of a pool queries the others; the share of its top 10 with
the same dominant class, against the chance of drawing one (its class's share of the rest of
the pool), overall and per class.

Models are embedder folders, `train-retrieval` runs (with a reranker: a second row, its top 5
reranked) or `open_clip:ARCH:PRETRAINED` (a zero-shot baseline); a model that fuses tile
documents gets a row with its top `RESCORE_TOP` re-scored by document phrase
(`retrieval.rescore`). Tiles are read, embedded and dropped batch by batch; rankings come from
faiss (top k, O(n·k) memory, no n×n matrix).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg.builder.writers import write_bytes_atomic, write_json
from geoseg.device import AUTO, resolve_device
from retrieval.amounts import (
    LABEL_STATS,
    amount_tiers,
    label_shares,
    nearest_class,
    parse_amounts,
    reference_shares,
)
from retrieval.data import TileInfo, load_tiles, tile_rgb
from retrieval.index import (
    embed_tile_batch,
    make_faiss,
    open_embedder,
    tile_document,
    uses_documents,
)
from retrieval.negation import embed_search_queries
from retrieval.queries import (
    EVAL_QUERIES,
    HIT_KS,
    PRECISION_K,
    load_queries,
    query_metrics,
    relevance_matrix,
    summarise,
)
from retrieval.rerank import RERANK_TOP, load_reranker, rerank_order
from retrieval.rescore import RESCORE_TOP, rescore_order

POOLS = ("index", "unseen")
LIKE_K = 10
PLAIN = {"reranker": False, "rescored": False, "amounts": False}
"""Row flags: the faiss ranking as is (a reranker row reorders its top 5, a re-scored row its
top `RESCORE_TOP`, an amounts row ranks the tiles known to meet the query's amounts and
measures first, `retrieval.amounts`: with re-scoring, `geoseg search`'s default)."""


def pool_mask(tiles: Sequence[TileInfo], pool: str) -> np.ndarray:
    """Tiles of a pool: `index` = all, `unseen` = not in the training split."""
    if pool == "index":
        return np.ones(len(tiles), bool)
    return np.array([t.split != "train" for t in tiles])


def embed_pool(
    embedder: Any, data: Path, tiles: Sequence[TileInfo], batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, dim) float32 tile vectors and (N, C) image-predicted class shares (None without a
    composition head), embedded as `geoseg index` does, streamed: memory holds one batch of
    images, not the pool."""
    out = [
        embed_tile_batch(embedder, data, tiles[i : i + batch_size])
        for i in range(0, len(tiles), batch_size)
    ]
    vectors = np.ascontiguousarray(np.concatenate([v for v, _ in out]), dtype=np.float32)
    return vectors, None if out[0][1] is None else np.concatenate([s for _, s in out])


def top_ranked(
    vectors: np.ndarray, queries: np.ndarray, k: int, exclude_self: bool = False
) -> np.ndarray:
    """(Q, k) pool rows best first, through faiss; `exclude_self`: query i is pool row i and is
    left out of its own ranking."""
    index = make_faiss(vectors, "flat")
    depth = min(len(vectors), k + int(exclude_self))
    _, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)
    if exclude_self:
        rows = np.stack([r[r != i][: depth - 1] for i, r in enumerate(rows)])
    return rows


def like_metrics(vectors: np.ndarray, tiles: Sequence[TileInfo]) -> dict[str, Any]:
    """Tile → tile: same-dominant-class share of each tile's top 10 vs chance, by class."""
    classes = np.array([t.dominant or "" for t in tiles])
    rows = top_ranked(vectors, vectors, LIKE_K, exclude_self=True)
    same = (classes[rows] == classes[:, None]).mean(1)
    counts = {c: int((classes == c).sum()) for c in set(classes)}
    chance = np.array([(counts[c] - 1) / (len(tiles) - 1) for c in classes])
    by_class = {
        c: {
            "tiles": counts[c],
            "same_class@10": float(same[classes == c].mean()),
            "chance": float(chance[classes == c].mean()),
        }
        for c in sorted(counts)
    }
    macro = float(np.mean([v["same_class@10"] for v in by_class.values()]))
    macro_chance = float(np.mean([v["chance"] for v in by_class.values()]))
    return {
        "same_class@10": float(same.mean()),
        "chance": float(chance.mean()),
        "macro_same_class@10": macro,
        "macro_chance": macro_chance,
        # the lift over chance, averaged over classes: the pooled share cannot show it when one
        # class dominates (85 % ground caps the pooled ratio near 1.2x even for a perfect ranking)
        "mean_lift": float(
            np.mean([v["same_class@10"] / v["chance"] for v in by_class.values() if v["chance"]])
        ),
        "by_class": by_class,
    }


def evaluate_retrieval(
    data: Path,
    models: Sequence[str | Path],
    out: Path,
    *,
    queries: Path = EVAL_QUERIES,
    seed: int = 0,
    batch_size: int = 32,
    device: str | torch.device = AUTO,
) -> list[dict[str, Any]]:
    """One row per model and pool (and per reranked model); writes out/metrics.json, table.md."""
    device = resolve_device(device)
    data = Path(data)
    tiles = load_tiles(data)
    specs = load_queries(queries)
    texts = [q.text for q in specs]
    relevant = relevance_matrix(specs, tiles)
    rows: list[dict[str, Any]] = []
    for pool in POOLS:
        mask = pool_mask(tiles, pool)
        rel = relevant[:, mask]
        answerable = rel.any(1)
        rows.append(_chance_row(pool, rel[answerable], seed))
    for model in models:
        ref, reranker_dir = _model_paths(model)
        embedder = open_embedder(ref, device=device)
        vectors, shares = embed_pool(embedder, data, tiles, batch_size)
        with torch.inference_mode():
            qvec = embed_search_queries(embedder, texts).float().cpu().numpy()
        for pool in POOLS:
            mask = pool_mask(tiles, pool)
            rel, pool_tiles = relevant[:, mask], [t for t, m in zip(tiles, mask, strict=True) if m]
            ranked = top_ranked(vectors[mask], qvec, PRECISION_K)
            base = {"model": str(model), "pool": pool, "tiles": int(mask.sum())}
            base["visual_tokens"] = int(embedder.visual_tokens())
            rows.append(base | PLAIN | _text_rows(specs, ranked, rel, seed))
            rows[-1]["like"] = like_metrics(vectors[mask], pool_tiles)
            if reranker_dir is not None:
                reranked = _rerank(reranker_dir, texts, ranked, data, pool_tiles, device)
                rows.append(
                    base | PLAIN | {"reranker": True} | _text_rows(specs, reranked, rel, seed)
                )
            rescoring = uses_documents(embedder)
            if rescoring:
                rescored = _rescore(embedder, qvec, vectors[mask], pool_tiles)
                rows.append(
                    base | PLAIN | {"rescored": True} | _text_rows(specs, rescored, rel, seed)
                )
            predicted = (
                {}
                if shares is None
                else dict(zip(embedder.composition.classes, shares[mask].T, strict=True))
            )
            labels = _label_shares(pool_tiles) if rescoring else {}
            if predicted or labels:
                with torch.inference_mode():
                    amounted = _amounts(
                        embedder,
                        texts,
                        qvec,
                        vectors[mask],
                        reference_shares(labels, predicted),
                        pool_tiles,
                        rescoring,
                    )
                flags = {"rescored": rescoring, "amounts": True}
                rows.append(base | PLAIN | flags | _text_rows(specs, amounted, rel, seed))
        del embedder
    summary = {
        "data": str(data),
        "queries_file": str(queries),
        "queries": len(specs),
        "seed": seed,
        "rows": rows,
    }
    out = Path(out)
    write_json(out / "metrics.json", summary)
    table = markdown_table(rows)
    write_bytes_atomic(out / "table.md", lambda p: p.write_text(table))
    return rows


def _model_paths(model: str | Path) -> tuple[str, Path | None]:
    """(embedder reference, reranker folder or None) of a model argument."""
    text = str(model)
    if text.startswith("open_clip:"):
        return text, None
    path = Path(model)
    folder = path / "embedder" if (path / "embedder").is_dir() else path
    reranker = path / "reranker"
    return str(folder), reranker if reranker.is_dir() else None


def _text_rows(specs: Sequence[Any], ranked: np.ndarray, rel: np.ndarray, seed: int) -> dict:
    answerable = rel.any(1)
    per_query = [
        {"id": q.id, "relevant": int(r.sum())} | query_metrics(rk, r)
        for q, rk, r in zip(specs, ranked, rel, strict=True)
        if r.any()
    ]
    return {
        "answerable": int(answerable.sum()),
        "unanswerable": [q.id for q, a in zip(specs, answerable, strict=True) if not a],
        "summary": summarise(per_query, seed),
        "per_query": per_query,
    }


def _chance_row(pool: str, rel: np.ndarray, seed: int) -> dict[str, Any]:
    """A uniformly random ranking (expected values, so its interval is over queries only)."""
    n = rel.shape[1]
    per_query = []
    for r in rel:
        m = query_metrics(np.arange(min(n, PRECISION_K)), r)
        per_query.append({k: m.get(f"chance_{k}", v) for k, v in m.items()})
    return {
        "model": "random ranking (chance)",
        "pool": pool,
        "tiles": n,
        **PLAIN,
        "answerable": len(rel),
        "summary": summarise(per_query, seed),
    }


def _rescore(
    embedder: Any, queries: np.ndarray, vectors: np.ndarray, pool: Sequence[TileInfo]
) -> np.ndarray:
    """Each query's faiss top `RESCORE_TOP` re-ordered by its tiles' best document phrase
    (`retrieval.rescore`, as `geoseg search` does), top 10 kept."""
    candidates = top_ranked(vectors, queries, RESCORE_TOP)
    documents = [tile_document(t) for t in pool]
    return np.stack(
        [
            rows[rescore_order(embedder, q, vectors[rows] @ q, [documents[i] for i in rows])]
            for q, rows in zip(queries, candidates, strict=True)
        ]
    )[:, :PRECISION_K]


def _label_shares(pool: Sequence[TileInfo]) -> dict[str, np.ndarray]:
    """Class -> (N,) labelled shares of the pool's tiles (0 for a tile without labels), ground
    split into bare and green (`retrieval.amounts.label_shares`)."""
    classes = dict.fromkeys(c for t in pool for c in t.classes)
    fractions = {c: np.array([t.class_fractions.get(c, 0.0) for t in pool]) for c in classes}
    stats = {k: np.array([t.stats.get(k) for t in pool], dtype=np.float64) for k in LABEL_STATS}
    return label_shares(fractions, stats)


def _amounts(
    embedder: Any,
    texts: Sequence[str],
    queries: np.ndarray,
    vectors: np.ndarray,
    reference: tuple[dict[str, np.ndarray], np.ndarray],
    pool: Sequence[TileInfo],
    rescoring: bool,
) -> np.ndarray:
    """Each query's top 10 as `geoseg search` ranks it with amounts: the pool tiles whose
    shares (`retrieval.amounts.reference_shares`) meet the query's amounts first, then the
    rest, each group's top `RESCORE_TOP` (re-scored when `rescoring`)."""
    classify = nearest_class(embedder)
    documents = [tile_document(t) for t in pool] if rescoring else []
    shares, tolerance = reference
    out = []
    for text, q in zip(texts, queries, strict=True):
        tiers = amount_tiers(shares, parse_amounts(text, classify), tolerance)
        groups = (
            [np.arange(len(pool))]
            if tiers is None
            else [np.flatnonzero(tiers == tier) for tier in range(3)]
        )
        ranked: list[int] = []
        for rows in groups:
            top = rows[np.argsort(-(vectors[rows] @ q), kind="stable")[:RESCORE_TOP]]
            if rescoring and len(top):
                docs = [documents[i] for i in top]
                top = top[rescore_order(embedder, q, vectors[top] @ q, docs)]
            ranked.extend(top.tolist())
        out.append(ranked[:PRECISION_K])
    return np.array(out)


def _rerank(
    path: Path,
    texts: list[str],
    ranked: np.ndarray,
    data: Path,
    pool: Sequence[TileInfo],
    device: torch.device,
) -> np.ndarray:
    """Each query's ranking with its top `RERANK_TOP` re-ordered by the reranker."""
    reranker = load_reranker(path, device=device)
    out = ranked.copy()
    for q, text in enumerate(texts):
        head = ranked[q, :RERANK_TOP]
        images = torch.stack([tile_rgb(data, pool[i].tile_id) for i in head]).to(device)
        out[q, :RERANK_TOP] = head[rerank_order(reranker, text, images)[0]]
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Text → tile table (mean [95 % CI], chance in its own row) and the tile → tile table."""
    keys = [f"p@{PRECISION_K}", *[f"hit@{k}" for k in HIT_KS], f"ndcg@{PRECISION_K}"]
    lines = [
        "| model | pool (tiles) | queries | " + " | ".join(keys) + " |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for r in rows:
        name = r["model"] + (" + reranker top-5" if r["reranker"] else "")
        name += f" + phrase re-scoring top-{RESCORE_TOP}" if r["rescored"] else ""
        name += " + amounts" if r.get("amounts") else ""
        cells = [name, f"{r['pool']} ({r['tiles']})", str(r["answerable"])]
        for k in keys:
            s = r["summary"][k]
            lo, hi = s["ci95"]
            cells.append(f"{s['mean']:.3f} [{lo:.2f}, {hi:.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    first = next((r for r in rows if "summary" in r), None)
    if first is not None:
        ceiling = {
            r["pool"]: r["summary"][keys[0]].get("ceiling")
            for r in rows
            if r["model"] != "random ranking (chance)"
        }
        lines.append("")
        lines.append(
            "P@10 ceiling (a perfect ranking; few relevant tiles cap it): "
            + ", ".join(f"{p} {c:.3f}" for p, c in ceiling.items() if c is not None)
        )
    like_rows = [r for r in rows if "like" in r]
    if like_rows:
        lines += [
            "",
            "| model | pool | same class in top 10 | chance | mean lift over classes "
            "| by class: same@10 / chance |",
            "|---|---|---|---|---|---|",
        ]
        for r in like_rows:
            lk = r["like"]
            per = "; ".join(
                f"{c or 'none'} ({v['tiles']}): {v['same_class@10']:.2f} / {v['chance']:.2f}"
                for c, v in lk["by_class"].items()
            )
            same, chance = f"{lk['same_class@10']:.3f}", f"{lk['chance']:.3f}"
            lift = f"{lk['mean_lift']:.2f}x"
            lines.append(f"| {r['model']} | {r['pool']} | {same} | {chance} | {lift} | {per} |")
    return "\n".join(lines) + "\n"
