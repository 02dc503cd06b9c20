"""Amounts in typed queries ("a few trees", "mostly woods", "about 40 % forest", "no trees"),
answered from the IMAGE, never from the tiles' labels.

A sentence encoder hardly separates "a handful of trees" from "dense forest": both are about
trees. `geoseg search --amounts` therefore reads amounts off the query text and checks them
against each tile's class shares as *predicted from its image*. It is an option, off by default:
on the development queries it helped only on tiles the head was fitted on (docs/retrieval.md,
"Amounts in queries"); `geoseg evaluate-retrieval` reports it as its own row.

- `CompositionHead`: a ridge regression from a tile's image vector (`embed_tiles`, before any
  document is fused) to its labelled class fractions, fitted on the training split at the end of
  `train-retrieval` (`fit_composition`; lambda by leave-one-out on that split) and saved beside
  the embedder (`composition.npz`). `geoseg index` stores its per-tile predictions as `pred_<class>`
  columns; search reads those, never the `frac_<class>` label columns (evaluation grades with them).
- `parse_amounts`: (class, low, high) share ranges of a query. A negated kind ("no trees",
  "treeless", `retrieval.negation`) must stay below a trace; an amount cue governs the nearest
  class word after it (else before it) in its clause. Cues are the caption grammar's own share
  words (`captions.SHARE_LEVELS`: "scattered", "patches of", "a large share of", "mostly", ...)
  plus common quantifiers ("a few", "a couple", "sparse", "dense", "majority", ...), fractions
  ("half", "a third") and percentages, with "less than"/"more than"/"about". Class words are the
  grammar's kind words; a cue followed by a word the grammar does not know ("oaks") takes the
  class whose words the text tower puts nearest.
- `in_range`: the tiles whose predicted shares lie in every range (± `TOLERANCE`). Search ranks
  them first, then the rest, each group as before (faiss top-k, document-phrase re-scoring); the
  restriction is a faiss selector in `geoseg search`, so it scales like any other filter.

Queries without an amount or a negated kind are ranked exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.captions import N3C, SHARE_LEVELS
from retrieval.negation import split_negation

COMPOSITION_FILE = "composition.npz"
TOLERANCE = 0.05
"""A predicted share counts as in a range within this margin (the head's error on unseen tiles
is about 0.04, docs/retrieval.md)."""
TRACE = 0.02
"""A negated kind's share stays below this (the grammar's lowest share level)."""
LAMBDAS = (0.01, 0.1, 1.0, 10.0)

_LEVELS = dict(SHARE_LEVELS)
_RANGE = {
    "most": (_LEVELS["most"], 1.0),
    "much": (_LEVELS["much"], _LEVELS["most"]),
    "some": (_LEVELS["some"], _LEVELS["much"]),
    "few": (_LEVELS["few"], _LEVELS["some"]),
}
"""Share level -> range, from the caption grammar's bounds."""
_CUES = {
    "most": (
        "mostly", "nearly all", "almost all", "filling the frame", "covering most", "dense",
        "densely", "thick", "thickly", "heavy", "heavily", "closed", "continuous", "solid",
        "unbroken", "entirely", "fully", "completely", "totally", "predominantly", "largely",
    ),
    "much": ("a lot of", "a large share of", "plenty of", "extensive", "lots of", "many"),
    "some": ("some", "patches of", "a moderate amount of", "a few areas of", "partly",
             "partially", "moderate", "lightly"),
    "few": ("scattered", "a few patches of", "a sprinkling of", "small bits of", "sprinkled",
            "a few", "few", "a handful of", "handful", "a couple of", "couple", "one or two",
            "two or three", "isolated", "lone", "single", "solitary", "sparse", "sparsely",
            "thin", "thinly", "occasional", "dotted", "here and there", "little"),
}  # fmt: skip
"""Amount words -> share level: the grammar's share phrases (`captions.N3C.shares` with the kind
left out) and common English quantifiers; longest match first."""
_FRACTIONS = {
    "half": 0.5,
    "a third": 1 / 3,
    "a quarter": 0.25,
    "three quarters": 0.75,
    "three-quarters": 0.75,
    "a tenth": 0.1,
    "two thirds": 2 / 3,
    "majority": 0.5,
}
_BELOW = r"less than|under|below|at most|up to|no more than"
_ABOVE = r"more than|over|above|at least|no less than"
_ABOUT = r"about|around|roughly|approximately|nearly|almost|some|~"
_NUMBER = r"(?P<pct>\d+(?:\.\d+)?)\s*(?:%|percent|per cent)"
_FRACTION = "|".join(sorted(map(re.escape, _FRACTIONS), key=len, reverse=True))
_QUANT = re.compile(
    rf"(?:(?P<below>{_BELOW})|(?P<above>{_ABOVE})|(?P<about>{_ABOUT}))?\s*"
    rf"(?:{_NUMBER}|(?P<frac>{_FRACTION})\b)",
    re.IGNORECASE,
)
_CUE = re.compile(
    r"\b(?P<cue>"
    + "|".join(sorted((re.escape(c) for cs in _CUES.values() for c in cs), key=len, reverse=True))
    + r")\b",
    re.IGNORECASE,
)
_CLAUSE = re.compile(r"[,;]|\b(?:and|but|with|in|on|of it|near|beside|among)\b", re.IGNORECASE)
"""Where the phrase an amount governs ends (looking ahead)."""
_SENTENCE = re.compile(r"[,;]|\b(?:and|but|with)\b", re.IGNORECASE)
"""Where it ends looking back ("woods on about half of it")."""
_WORD = re.compile(r"[a-z]+", re.IGNORECASE)
_KIND_CLASS = {
    "tree": "tree",
    "building": "building",
    "low_vegetation": "others",
    "ground_bare": "ground",
    "ground_green": "ground",
    "ground": "ground",
}
_GENERIC = frozenset(
    {"a", "an", "and", "area", "the", "or", "open", "bare", "green", "low", "cleared", "field"}
)
"""Words of kind phrases that name no class on their own."""


def _forms(word: str) -> set[str]:
    """A word and its plain stems: "wooded" -> wood, "treed" -> tree, "woodland" -> wood."""
    word = word.lower()
    forms = {word}
    for suffix in ("land", "ed", "es", "s", "d"):
        if (
            word.endswith(suffix)
            and len(word) - len(suffix) >= 4
            and (suffix != "d" or word.endswith("ed"))
        ):
            forms.add(word[: -len(suffix)])
    return forms


def class_words() -> dict[str, str]:
    """Kind word (and its stems) -> N3C class, from the caption grammar's kind and forest
    words; a word of several kinds keeps the first ("grass": ground before low vegetation)."""
    out: dict[str, str] = {}
    for table in (N3C.kinds, N3C.large):
        for kind, phrases in table.items():
            cls = _KIND_CLASS.get(kind)
            for word in (w for p in phrases for w in _WORD.findall(p)) if cls else ():
                for form in _forms(word) if word.lower() not in _GENERIC else ():
                    out.setdefault(form, cls)
    return out


@dataclass(frozen=True)
class Amount:
    """The share of `cls` a query asks for: low <= share <= high."""

    cls: str
    low: float
    high: float


def parse_amounts(text: str, classify: Any = None) -> tuple[Amount, ...]:
    """Share ranges a query asks for. `classify(phrase) -> class` names the class of a phrase
    without a grammar kind word (`retrieval.amounts.nearest_class`); None: such cues are dropped.

    >>> parse_amounts("a few trees in a field")
    (Amount(cls='tree', low=0.02, high=0.1),)
    >>> parse_amounts("no trees at all")
    (Amount(cls='tree', low=0.0, high=0.02),)
    """
    words = class_words()
    asked, negated = split_negation(text)
    out: list[Amount] = []
    for phrase in negated:  # by kind word only: "nothing planted" names no class
        cls = _class_of(phrase, words, None)
        if cls is not None:
            out.append(Amount(cls, 0.0, TRACE))
    spans: list[tuple[int, int, float, float]] = []
    for m in _QUANT.finditer(asked):
        value = float(m["pct"]) / 100 if m["pct"] else _FRACTIONS[m["frac"].lower()]
        if m["below"]:
            low, high = 0.0, value
        elif m["above"] or (m["frac"] and m["frac"].lower() == "majority"):
            low, high = value, 1.0
        else:
            low, high = max(0.0, value - 0.15), min(1.0, value + 0.15)
        spans.append((m.start(), m.end(), low, high))
    for m in _CUE.finditer(asked):
        if any(s <= m.start() < e for s, e, _, _ in spans):
            continue
        level = next(k for k, cs in _CUES.items() if m["cue"].lower() in cs)
        spans.append((m.start(), m.end(), *_RANGE[level]))
    asks: dict[str, tuple[float, float]] = {}  # several cues on one class: the widest range
    for start, end, low, high in sorted(spans):
        after = _CLAUSE.split(asked[end:], maxsplit=1)[0]
        before = _SENTENCE.split(asked[:start])[-1]
        cls = _class_of(after, words, None) or _class_of(before, words, None)
        if cls is None and after.strip():
            cls = _class_of(after, words, classify)
        if cls is not None:
            asks[cls] = (
                (min(low, asks[cls][0]), max(high, asks[cls][1])) if cls in asks else (low, high)
            )
    return tuple(dict.fromkeys(out + [Amount(c, low, high) for c, (low, high) in asks.items()]))


def _class_of(phrase: str, words: dict[str, str], classify: Any) -> str | None:
    for word in _WORD.findall(phrase):
        for form in sorted(_forms(word), key=len, reverse=True):
            if form in words:
                return words[form]
    if classify is not None and _WORD.search(phrase):
        return classify(phrase.strip())
    return None


def nearest_class(embedder: Any) -> Any:
    """`classify` for `parse_amounts`: the class whose grammar kind words (mean text embedding,
    computed on first use) are nearest to a phrase's text embedding."""
    by_class: dict[str, list[str]] = {}
    for table in (N3C.kinds, N3C.large):
        for kind, phrases in table.items():
            if kind in _KIND_CLASS:
                by_class.setdefault(_KIND_CLASS[kind], []).extend(phrases)
    classes = sorted(by_class)
    prototypes: list[np.ndarray] = []

    def classify(phrase: str) -> str:
        if not prototypes:
            prototypes.extend(
                embedder.embed_queries(by_class[c]).float().mean(0).cpu().numpy() for c in classes
            )
        vector = embedder.embed_queries([phrase])[0].float().cpu().numpy()
        return classes[int(np.argmax(np.stack(prototypes) @ vector))]

    return classify


@dataclass(frozen=True)
class CompositionHead:
    """Ridge regression image vector (dim,) -> class shares; `weights` (dim + 1, C)."""

    classes: tuple[str, ...]
    weights: np.ndarray
    lam: float

    def predict(self, vectors: np.ndarray) -> np.ndarray:
        """(N, dim) image vectors -> (N, C) predicted shares (unclipped)."""
        vectors = np.asarray(vectors, dtype=np.float64)
        return np.c_[vectors, np.ones(len(vectors))] @ self.weights

    def save(self, folder: Path) -> None:
        from geoseg.builder.writers import atomic_path

        with atomic_path(Path(folder) / COMPOSITION_FILE) as tmp, open(tmp, "wb") as f:
            np.savez(f, classes=np.array(self.classes), weights=self.weights, lam=self.lam)

    @classmethod
    def load(cls, folder: Path) -> CompositionHead | None:
        path = Path(folder) / COMPOSITION_FILE
        if not path.is_file():
            return None
        z = np.load(path)
        return cls(tuple(str(c) for c in z["classes"]), z["weights"], float(z["lam"]))


def fit_composition(
    vectors: np.ndarray,
    shares: np.ndarray,
    classes: Sequence[str],
    views: Sequence[np.ndarray] = (),
) -> CompositionHead:
    """Ridge fit (N, dim) -> (N, C), lambda from `LAMBDAS` by closed-form leave-one-out error on
    `vectors`; `views`: more (N, dim) vectors of the same tiles (flips, rotations: the same class
    shares), fitted with that lambda too."""
    x = np.c_[np.asarray(vectors, dtype=np.float64), np.ones(len(vectors))]
    y = np.asarray(shares, dtype=np.float64)
    errors = []
    for lam in LAMBDAS:
        inverse = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
        hat = np.einsum("ij,jk,ik->i", x, inverse, x)
        loo = (y - x @ (inverse @ x.T @ y)) / (1 - hat)[:, None]
        errors.append(float((loo**2).mean()))
    lam = LAMBDAS[int(np.argmin(errors))]
    x = np.concatenate([x, *(np.c_[v, np.ones(len(v))] for v in views)])
    y = np.concatenate([y] * (1 + len(views)))
    weights = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)
    return CompositionHead(tuple(classes), weights, lam)


def in_range(predicted: dict[str, np.ndarray], amounts: Sequence[Amount]) -> np.ndarray | None:
    """(N,) bool: tiles whose predicted shares (class -> (N,)) meet every amount ± TOLERANCE;
    None when nothing applies (no amounts, or no predictions for their classes)."""
    usable = [a for a in amounts if a.cls in predicted]
    if not usable:
        return None
    keep = np.ones(len(next(iter(predicted.values()))), bool)
    for a in usable:
        share = predicted[a.cls]
        keep &= (share >= a.low - TOLERANCE) & (share <= a.high + TOLERANCE)
    return keep
