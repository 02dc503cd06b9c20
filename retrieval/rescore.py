"""Document-phrase re-scoring of a text query's top candidates.

An indexed tile vector fuses the tile's image with the *mean* of its document's phrases
(`retrieval.captions.document`), so one phrase that says exactly what a query asks ("scattered
single trees") is diluted by the tile's other facets. Re-scoring gives it a say: faiss's top
`RESCORE_TOP` tiles for a text query are re-ordered by

    z(faiss score) + z(best phrase score)

where a tile's best phrase score is the largest dot product of the query vector with the text
embeddings of its document's phrases, and z standardises a score over the query's candidates
(a tile without a document, imagery without labels, scores 0 there). Only the candidates are
touched: O(k) phrase look-ups per query, the phrase vectors cached by the embedder (phrases
repeat across tiles), so it scales with the index like faiss's top-k itself. The vector score
stays the hit's score; only the order changes.

It needs an embedder that fuses documents (`uses_documents`): an image-only index has no
documents to consult. `geoseg evaluate-retrieval` reports it as its own row per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from retrieval.embedder import Document

RESCORE_TOP = 50
"""Candidates re-scored per text query, in evaluation and by default in `geoseg search` (where
0 turns it off); docs/retrieval.md has the measurement."""


def rescore_order(
    embedder: Any, query: np.ndarray, scores: np.ndarray, documents: Sequence[Document | None]
) -> np.ndarray:
    """Candidate positions best first: `scores` (K,) are the candidates' faiss scores for the
    query vector `query` (dim,), `documents` their tile documents (None: no labels)."""
    phrases = list(dict.fromkeys(p for d in documents if d for _, ps in d for p in ps))
    best = np.full(len(documents), np.nan)
    if phrases:
        sims = dict(zip(phrases, embedder.phrase_vectors(phrases).numpy() @ query, strict=True))
        for i, d in enumerate(documents):
            if d:
                best[i] = max(sims[p] for _, ps in d for p in ps)
    return np.argsort(-(_standardised(scores) + _standardised(best)), kind="stable")


def _standardised(values: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the known values; unknown (NaN) and constant values give 0."""
    values = np.asarray(values, dtype=np.float64)
    known = ~np.isnan(values)
    out = np.zeros(len(values))
    if known.any() and values[known].std() > 0:
        out[known] = (values[known] - values[known].mean()) / values[known].std()
    return out
