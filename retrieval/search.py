"""Text / tile / image queries against a tile index, optional reranking, GeoJSON + thumbnails.

The embedder is loaded from the reference stored in the index (or one given explicitly) and its
fingerprint must match the index's: vectors of two models are not comparable. A tile query
(`like`) reuses the tile's stored vector, so it needs no model at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg.builder.writers import atomic_path
from geoseg.device import AUTO, resolve_device
from geoseg.plot import plot_thumbnails
from retrieval.amounts import amount_tiers, nearest_class, parse_amounts, reference_shares
from retrieval.data import read_rgb, tile_rgb
from retrieval.index import (
    Filters,
    SearchIndexError,
    TileIndex,
    open_embedder,
    tile_document,
    uses_documents,
)
from retrieval.negation import embed_search_queries
from retrieval.rerank import RERANK_TOP, load_reranker, rerank_order
from retrieval.rescore import RESCORE_TOP, rescore_order


@dataclass
class Hit:
    """One ranked result; `score` is the embedding dot product, `rerank` the reranker's."""

    rank: int
    tile_id: str
    score: float
    properties: dict[str, Any]
    geometry: dict[str, Any]
    rerank: float | None = None


@dataclass
class Query:
    """Exactly one of text / like (tile id) / image (GeoTIFF path)."""

    text: str | None = None
    like: str | None = None
    image: Path | None = None
    filters: Filters = field(default_factory=Filters)

    def validate(self) -> None:
        given = [v for v in (self.text, self.like, self.image) if v is not None]
        if len(given) != 1:
            raise SearchIndexError("give exactly one of a text query, --like TILE_ID, --image FILE")
        if self.text is not None and not self.text.strip():
            raise SearchIndexError("empty query text")
        if self.image is not None and not Path(self.image).is_file():
            raise SearchIndexError(f"image {self.image} not found")


def search(
    index: TileIndex,
    query: Query,
    k: int = 20,
    *,
    model: str | Path | None = None,
    reranker: str | Path | None = None,
    rescore: int = RESCORE_TOP,
    amounts: bool = True,
    device: str | torch.device = AUTO,
) -> list[Hit]:
    """Top-k tiles for a query; a text query's top max(k, `rescore`) are re-ordered by their best
    document phrase (`retrieval.rescore`; 0 = off, image-only indexes have no documents); with
    `amounts` (default), the tiles known to meet the amounts and measures a text query states
    ("a few trees", "no buildings", "trees over 30 m", "flat") come first, then those that may
    (a fact unknown), then the rest, each group ranked as above (`retrieval.amounts`: label facts
    in an index that fuses documents, image-predicted shares otherwise); with `reranker`, the
    top-5 are then re-ordered by its scores."""
    query.validate()
    device = resolve_device(device)
    if k < 1:
        raise SearchIndexError("k must be >= 1")
    if reranker is not None and query.text is None:
        raise SearchIndexError("reranking needs a text query")
    if rescore < 0:
        raise SearchIndexError("rescore must be >= 0")
    exclude: tuple[str, ...] = ()
    rescoring = False
    tiers = None
    if query.like is not None:
        vector = index.vector(query.like)
        exclude = (query.like,)
    else:
        embedder = open_embedder(model or index.meta["model"], device=device)
        index.check_model(embedder.fingerprint)
        with torch.inference_mode():
            if query.text is not None:
                vector = embed_search_queries(embedder, [query.text.strip()])[0]
                rescoring = rescore > 0 and uses_documents(embedder)
                asked = parse_amounts(query.text, nearest_class(embedder)) if amounts else ()
                if asked:
                    labels = index.label_facts if uses_documents(embedder) else {}
                    shares, tolerance = reference_shares(labels, index.predicted_shares())
                    tiers = amount_tiers(shares, asked, tolerance)
            else:
                vector = embedder.embed_tiles(read_rgb(Path(query.image))[None].to(device))[0]
        vector = vector.float().cpu().numpy()
    depth = max(k, rescore) if rescoring else k
    groups = tiered_pairs(index, vector, depth, query.filters, exclude, tiers)
    if rescoring:
        groups = [_rescored(index, embedder, vector, g) for g in groups]
    pairs = [p for g in groups for p in g]
    hits = [_hit(index, rank, row, score) for rank, (row, score) in enumerate(pairs[:k], 1)]
    if reranker is not None and hits:
        hits = rerank(index, query.text or "", hits, reranker, device)
    return hits


def tiered_pairs(
    index: TileIndex,
    vector: np.ndarray,
    depth: int,
    filters: Filters,
    exclude: tuple[str, ...] = (),
    tiers: np.ndarray | None = None,
) -> list[list[tuple[int, float]]]:
    """faiss's top `depth` (row, score) for a query vector within the filters, as ranking
    groups: one, or with amount tiers (`retrieval.amounts.amount_tiers`) tiers 0 and 1 each
    through a faiss selector, then tier 2 from the unrestricted top `depth`."""
    pairs = index.search(vector[None], depth, filters, exclude=exclude)[0]
    if tiers is None:
        return [pairs]
    groups = [
        index.search(vector[None], depth, filters, exclude=exclude, within=tiers == t)[0]
        for t in (0, 1)
    ]
    return [*groups, [p for p in pairs if tiers[p[0]] == 2]]


def _rescored(
    index: TileIndex, embedder: Any, vector: np.ndarray, pairs: list[tuple[int, float]]
) -> list[tuple[int, float]]:
    """(row, score) candidates re-ordered by their best document phrase (`retrieval.rescore`)."""
    if not pairs:
        return pairs
    documents = [tile_document(index.tile_info(row)) for row, _ in pairs]
    scores = np.array([score for _, score in pairs])
    return [pairs[i] for i in rescore_order(embedder, vector, scores, documents)]


def _hit(index: TileIndex, rank: int, row: int, score: float) -> Hit:
    record = index.tiles.iloc[row]
    props = {
        k: _plain(v)
        for k, v in record.items()
        if k != "geometry" and not (isinstance(v, float) and np.isnan(v))
    }
    geometry = json.loads(json.dumps(record.geometry.__geo_interface__))
    return Hit(rank, record["tile_id"], score, props, geometry)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def rerank(
    index: TileIndex,
    text: str,
    hits: list[Hit],
    path: str | Path,
    device: str | torch.device = AUTO,
) -> list[Hit]:
    """Re-order the top `RERANK_TOP` hits by the reranker's relevance score."""
    device = resolve_device(device)
    reranker = load_reranker(path, device=device)
    head = hits[:RERANK_TOP]
    images = torch.stack([tile_rgb(index.data, h.tile_id) for h in head]).to(device)
    order, scores = rerank_order(reranker, text, images)
    for h, s in zip(head, scores, strict=True):
        h.rerank = float(s)
    ordered = [head[i] for i in order] + hits[RERANK_TOP:]
    for rank, h in enumerate(ordered, 1):
        h.rank = rank
    return ordered


def write_geojson(hits: list[Hit], path: Path, query: dict[str, Any]) -> None:
    """Ranked hits as a GeoJSON FeatureCollection (lon/lat tile outlines), written atomically."""
    collection = {
        "type": "FeatureCollection",
        "query": query,
        "features": [
            {
                "type": "Feature",
                "id": h.tile_id,
                "geometry": h.geometry,
                "properties": {"rank": h.rank, "score": h.score, "rerank_score": h.rerank}
                | h.properties,
            }
            for h in hits
        ],
    }
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(collection) + "\n")


def write_thumbnails(hits: list[Hit], data: Path, path: Path, title: str, cols: int = 5) -> None:
    """A PNG grid of the hits' RGB tiles with rank, score and tile id."""
    titles = [f"#{h.rank} {h.score:.3f}\n{h.tile_id}" for h in hits]
    fig = plot_thumbnails(data, [h.tile_id for h in hits], titles, cols=cols)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
