"""Negation in typed queries: "no trees at all", "fields without trees", "treeless plain",
"tree-free farmland", "open acreage, trees absent".

A sentence encoder reads "no trees" as being about trees (MiniLM puts it next to "trees"), so a
negated query used to rank forests first. Search therefore splits a query into what it asks for
and what it negates, and embeds it as e(asked) - Σ e(negated), normalised: one vector, so the
faiss index, filters and scores work unchanged, and ranking by it is ranking by "similar to the
ask, unlike the negated". A query with nothing negated is embedded as typed.

Training never goes through this (captions are embedded by `embed_queries` directly).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_CUE = re.compile(
    r"\b(?:no|not|without|nothing|zero|minus|free (?:of|from)|(?:devoid|bare|empty|clear) of"
    r"|absence of|lacking)\s+(?:any\s+)?"
    r"(?P<negated>[^,;]*?)(?:\s+at all)?\s*(?=$|[,;]|\s(?:and|but)\b)",
    re.IGNORECASE,
)
"""A negation cue and the phrase it governs, up to punctuation, "and"/"but" or the end; "or"
continues it ("no trees or houses" negates both)."""
_POSTFIX = re.compile(
    r"(?:^|(?<=[,;])|\b(?:and|but|with)\b)\s*"
    r"(?P<negated>(?:(?!\b(?:and|but|with)\b)[^,;])*?)\s+(?:absent|missing)\b",
    re.IGNORECASE,
)
"""A phrase and a negation cue after it ("open acreage, trees absent"): the phrase runs back to the
start, punctuation or "and"/"but"/"with"."""
_OR = re.compile(r"\s+(?:or|nor)\s+", re.IGNORECASE)
_PRIVATIVE = re.compile(r"\b(?P<negated>\w{3,})(?:less|-free)\b", re.IGNORECASE)
"""'treeless', 'roofless', 'tree-free': the stem is negated."""
_NOT_PRIVATIVE = frozenset(
    {"regardless", "nevertheless", "endless", "countless", "timeless", "seamless", "useless"}
)
_DANGLING = re.compile(
    r"^[\s,;]*(?:(?:with|and|but|or)\b[\s,;]*)*|[\s,;]*(?:\b(?:with|and|but|or)[\s,;]*)*$",
    re.IGNORECASE,
)
"""Joining words left at either end once the negated phrases are cut out ("forest with")."""


def split_negation(text: str) -> tuple[str, tuple[str, ...]]:
    """(what the query asks for, the phrases it negates); ("", (...)) when it only negates.

    >>> split_negation("forest with no houses")
    ('forest', ('houses',))
    >>> split_negation("no trees at all")
    ('', ('trees',))
    """
    negated: list[str] = []

    def cut(match: re.Match[str]) -> str:
        if match[0].lower() in _NOT_PRIVATIVE:
            return match[0]
        negated.extend(_OR.split(match["negated"].strip()))
        return " "

    rest = _PRIVATIVE.sub(cut, _CUE.sub(cut, _POSTFIX.sub(cut, text)))
    negated = [n for n in negated if n]
    if not negated:
        return text.strip(), ()
    return " ".join(_DANGLING.sub("", rest).split()), tuple(negated)


def embed_search_queries(embedder: Any, texts: list[str]) -> Tensor:
    """(B, dim) vectors of typed queries for search and evaluation: `embedder.embed_queries`,
    with the embeddings of the phrases a query negates subtracted (module docstring)."""
    rows = []
    for text, vector in zip(texts, embedder.embed_queries(texts), strict=True):
        asked, negated = split_negation(text)
        if negated:
            like = embedder.embed_queries([asked])[0] if asked else 0.0
            vector = F.normalize(like - embedder.embed_queries(list(negated)).sum(0), dim=0)
        rows.append(vector)
    return torch.stack(rows)
