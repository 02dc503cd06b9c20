"""Amounts and measures in typed queries ("a few trees", "about 40 % forest", "no buildings",
"trees over 30 m", "flat", "bare soil"), checked on what the archive knows about each tile.

A sentence encoder hardly separates "a handful of trees" from "dense forest" (both are about
trees) and cannot compare numbers at all. Search (on by default; `geoseg search --no-amounts`)
therefore reads them off the query text and ranks first the tiles known to meet them, then the
tiles with an unknown fact, then the rest, each group ranked as without them (faiss top-k,
document-phrase re-scoring); a group is a faiss selector, so it scales like any other filter.

What a tile is checked on (`reference_shares`):
- in an index that fuses tile documents, which already reads the archive's LiDAR labels, NIR
  and DEM into its vectors: the tile's label facts (`label_shares`: class shares, ground split
  into barren / vegetated by NDVI, tree height p95, mean ground slope), exactly;
- in an image-only index, and for tiles without labels: the class shares predicted from the
  image by `CompositionHead`, a ridge regression from the image vector to the labelled class
  fractions, fitted on the training split by `train-retrieval` (`fit_composition`; lambda by
  leave-one-out) and stored by `geoseg index` as `pred_<class>` columns, within ± `TOLERANCE`.

`parse_amounts` gives (fact, low, high) ranges. A negated kind ("no trees", "treeless",
`retrieval.negation`) must stay below a trace; an amount cue governs the nearest class word after
it (else before it) in its clause. Cues are the caption grammar's share words
(`captions.SHARE_LEVELS`: "scattered", "patches of", "mostly", ...) plus common quantifiers ("a
few", "a couple", "sparse", "majority", ...), cover words ("dense", "closed", "entirely": >=
`FULL`), fractions ("half", "a third") and percentages, with "less than"/"more than"/"about". A
kind named without an amount must be there ("rooftops", "scrubland"). Class words are the
grammar's kind words and common ones (`KIND_WORDS`: "pine", "barn", "chaparral"); a cue before a
word neither knows ("acacias") takes the class whose words the text tower puts nearest.
Measures: heights in metres ("over 40 m") or the grammar's height words before a tree word
("tall trees"), slope from its terrain words and common ones ("flat", "rolling", "steep",
"hilly", `TERRAIN_WORDS`), on the grammar's category bounds. docs/retrieval.md ("Amounts and
measures") has the measurement that made this the default.

Queries without an amount, a measure, a kind word or a negated kind are ranked as before.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.captions import HEIGHT_LEVELS, N3C, SHARE_LEVELS, TERRAIN_LEVELS
from retrieval.negation import split_negation

COMPOSITION_FILE = "composition.npz"
TOLERANCE = 0.05
"""A predicted share counts as in a range within this margin (the head's error on unseen tiles
is about 0.04, docs/retrieval.md)."""
TRACE = 0.02
"""A negated kind's share stays below this (the grammar's lowest share level)."""
BARREN_NDVI = 0.1
GREEN_NDVI = 0.2
"""NDVI of barren ground (rock, sand, bare soil: 0.1 or less) and of the lowest vegetated
cover (shrubs, grassland: from about 0.2), after the USGS's reading of NDVI; ground in between
is neither "bare soil" nor "green pasture" to an amount."""
THERE = 1e-6
"""A kind a query names without an amount ("rooftops", "scrubland") must be there at all."""
LAMBDAS = (0.01, 0.1, 1.0, 10.0)

_LEVELS = dict(SHARE_LEVELS)
FULL = 0.7
"""Lower bound of "dense", "closed", "entirely" (a cover, not a majority: the "very dense"
canopy class of forest surveys starts at 70 %)."""
_RANGE = {
    "full": (FULL, 1.0),
    "most": (_LEVELS["most"], 1.0),
    "much": (_LEVELS["much"], _LEVELS["most"]),
    "some": (_LEVELS["some"], _LEVELS["much"]),
    "few": (_LEVELS["few"], _LEVELS["some"]),
}
"""Share level -> range, from the caption grammar's bounds."""
_CUES = {
    "full": (
        "dense", "densely", "thick", "thickly", "heavy", "heavily", "closed", "continuous",
        "solid", "unbroken", "entirely", "fully", "completely", "totally", "packed",
        "packed with", "virtually all", "overwhelmingly", "wall-to-wall", "blanketed",
        "blanketed with", "blanketed in", "carpeted", "carpeted with", "carpeted in",
        "uninterrupted", "complete", "impenetrable",
    ),
    "most": (
        "mostly", "nearly all", "almost all", "filling the frame", "covering most",
        "predominantly", "largely",
    ),
    "much": ("a lot of", "a large share of", "plenty of", "extensive", "lots of", "many"),
    "some": ("some", "patches of", "a moderate amount of", "a few areas of", "partly",
             "partially", "moderate", "lightly"),
    "few": ("scattered", "a few patches of", "a sprinkling of", "small bits of", "sprinkled",
            "a few", "few", "a handful of", "handful", "a couple of", "couple", "one or two",
            "two or three", "isolated", "lone", "single", "solitary", "sparse", "sparsely",
            "thin", "thinly", "occasional", "dotted", "here and there", "little", "barely",
            "scarcely", "hardly", "a sliver of", "sliver", "a trace of", "a touch of", "dusting",
            "smattering", "tiny number", "very few", "or two", "the odd", "speckled"),
}  # fmt: skip
"""Amount words -> share level: the grammar's share phrases (`captions.N3C.shares` with the kind
left out) and common English quantifiers ("or two" governs the word before it: "a tree or two");
longest match first."""
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
    "ground_bare": "ground_bare",
    "ground_green": "ground_green",
    "ground": "ground",
}
"""Grammar kind -> the class an amount of it is checked on; LiDAR ground split into bare and
green as the captions split it (`label_shares`)."""
KIND_WORDS = {
    "tree": (
        "conifer", "coniferous", "pine", "fir", "firs", "spruce", "cedar", "sequoia", "redwood",
        "oak", "oaks", "evergreen", "timber", "timberland", "grove", "copse", "woodlot",
    ),
    "ground_bare": (
        "plowed", "ploughed", "disked", "harrowed", "barren", "mud", "sand", "stubble",
    ),
    "ground_green": (
        "hay", "hayfield", "alfalfa", "grassland", "lawn", "paddock", "pastureland",
        "meadowland",
    ),
    "building": (
        "barn", "shed", "house", "home", "farmhouse", "farmstead", "cottage", "cabin",
        "dwelling", "residence", "roof", "rooftop", "structure", "outbuilding", "warehouse",
        "garage", "silo", "homestead",
    ),
    "others": ("shrub", "bush", "chaparral", "thicket", "undergrowth", "understory"),
}  # fmt: skip
"""Common words for the grammar's kinds beyond its own ("pine", "barn", "chaparral"); with the
grammar's kind words they are the class words (`class_words`)."""
_GENERIC = frozenset(
    {
        "a", "an", "and", "area", "the", "or", "open", "bare", "green", "low", "cleared",
        "field", "farmland", "vegetation", "plants", "crop", "crops", "cropland",
    }
)  # fmt: skip
"""Words of kind phrases that name no class on their own ("farmland" and "cropland" are bare or
green, trees are vegetation too)."""


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
    """Kind word (and its stems) -> class, from the caption grammar's kind and forest words,
    then `KIND_WORDS`; a word of several kinds keeps the first ("grass": ground before low
    vegetation)."""
    out: dict[str, str] = {}
    for table in (N3C.kinds, N3C.large):
        for kind, phrases in table.items():
            cls = _KIND_CLASS.get(kind)
            for word in (w for p in phrases for w in _WORD.findall(p)) if cls else ():
                for form in _forms(word) if word.lower() not in _GENERIC else ():
                    out.setdefault(form, cls)
    for cls, kind_words in KIND_WORDS.items():
        for word in kind_words:
            for form in _forms(word):
                out.setdefault(form, cls)
    return out


@dataclass(frozen=True)
class Amount:
    """The range a query asks of a fact: `cls` is a class share (`tree`, `ground_bare`, ...)
    or a measure (`tree_height` in m, `slope` in degrees); low <= value <= high."""

    cls: str
    low: float
    high: float


def _level_ranges(levels: tuple[tuple[str, float], ...]) -> dict[str, tuple[float, float]]:
    """Category -> [low, high) from a captions level table (first bound reached, descending)."""
    highs = [math.inf] + [bound for _, bound in levels[:-1]]
    return {
        name: (max(bound, 0.0), high) for (name, bound), high in zip(levels, highs, strict=True)
    }


def _level_words(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Word -> category for the words of a grammar table that belong to one category only
    ("steep" -> steep; "slope", in "a mild slope" and "a steep slope", to none)."""
    seen: dict[str, set[str]] = {}
    for level, phrases in table.items():
        for word in (w.lower() for p in phrases for w in _WORD.findall(p)):
            seen.setdefault(word, set()).add(level)
    return {w: next(iter(ls)) for w, ls in seen.items() if len(ls) == 1 and w not in _STOP}


_STOP = frozenset({"a", "an", "on", "the", "terrain", "ground", "land", "height"})
_TREE_HEIGHTS = _level_ranges(HEIGHT_LEVELS["tree"])
_TERRAIN = _level_ranges(TERRAIN_LEVELS)
_TERRAIN["sloped"] = (_TERRAIN["gentle"][0], math.inf)
TERRAIN_WORDS = {
    **dict.fromkeys(("hilly", "hills", "foothills", "slopes", "incline", "sloped"), "sloped"),
    **dict.fromkeys(("rugged", "cliffs", "ravine", "canyon", "mountainous"), "steep"),
    **dict.fromkeys(("undulating",), "gentle"),
    **dict.fromkeys(("plain", "bottomland", "lowland"), "flat"),
}
"""Common terrain words beyond the grammar's ("flat", "rolling", "steep"): sloped = not flat."""
_HEIGHT_WORDS = _level_words(N3C.heights["tree"])
_TERRAIN_WORDS = _level_words(N3C.terrain) | TERRAIN_WORDS
_HEIGHT = re.compile(
    rf"(?:(?P<below>{_BELOW}|shorter than|lower than)|"
    rf"(?P<above>{_ABOVE}|taller than|higher than|exceeding|reaching))?\s*"
    r"(?P<m>\d+(?:\.\d+)?)\s*(?:m|meters?|metres?)\b",
    re.IGNORECASE,
)
"""A height in metres with an optional comparison ("over 40 m", "under 10 metres")."""


def _measures(asked: str, words: dict[str, str]) -> dict[str, tuple[float, float]]:
    """Ranges of the LiDAR measures a query states: tree height from a number of metres or the
    grammar's height words before a tree word ("tall trees", "young woods"), mean ground slope
    from the grammar's terrain words ("flat", "rolling", "steep")."""
    out: dict[str, tuple[float, float]] = {}
    for m in _HEIGHT.finditer(asked):
        value = float(m["m"])
        if m["below"]:
            out["tree_height"] = (0.0, value)
        elif m["above"]:
            out["tree_height"] = (value, math.inf)
        else:
            out["tree_height"] = (max(0.0, value - 5.0), value + 5.0)
    tokens = [w.lower() for w in _WORD.findall(asked)]
    for word, following in itertools.pairwise(tokens):
        if word in _HEIGHT_WORDS and "tree_height" not in out and words.get(following) == "tree":
            out["tree_height"] = _TREE_HEIGHTS[_HEIGHT_WORDS[word]]
    ranges = [_TERRAIN[_TERRAIN_WORDS[w]] for w in tokens if w in _TERRAIN_WORDS]
    low, high = max((r[0] for r in ranges), default=0.0), min((r[1] for r in ranges), default=0.0)
    if ranges and low < high:  # words that agree ("gentle hills"); contradictions say nothing
        out["slope"] = (low, high)
    return out


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
    asks |= _measures(asked, words)
    named = {c for c in (_class_of(w, words, None) for w in _WORD.findall(asked)) if c}
    # a kind both asked for and negated ("timber interrupted by treeless gaps"): the negation
    # qualifies part of the scene, so only the ask stands
    out = [a for a in out if a.cls not in named]
    for cls in sorted(named - set(asks)):  # a class named without an amount must be there
        asks[cls] = (THERE, 1.0)
    if {"ground_bare", "ground_green"} <= set(asks):  # "pasture and dirt": ground of both kinds
        del asks["ground_bare"], asks["ground_green"]
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


LABEL_STATS = ("ndvi_mean", "tree_height_p95", "slope_deg")
"""The tile statistics `label_shares` reads besides the class shares."""


def label_shares(
    fractions: dict[str, np.ndarray], stats: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """What amounts are checked against in a labelled archive, per tile (N,): the labelled
    class shares; `ground_bare` / `ground_green`, the ground share where the mean NDVI says
    barren (<= `BARREN_NDVI`) / vegetated (>= `GREEN_NDVI`), 0 otherwise, unknown (NaN) without
    NIR; `tree_height` (95th percentile, m, where there are trees) and `slope` (mean ground
    slope, degrees). `stats`: the `LABEL_STATS` arrays (NaN = unknown)."""
    out = dict(fractions)
    n = len(next(iter(fractions.values())))
    unknown = np.full(n, np.nan)
    ndvi, height, slope = (np.asarray(stats.get(k, unknown), np.float64) for k in LABEL_STATS)
    if "ground" in fractions:
        ground, known = fractions["ground"], ~np.isnan(ndvi)
        out["ground_bare"] = np.where(known, np.where(ndvi <= BARREN_NDVI, ground, 0.0), np.nan)
        out["ground_green"] = np.where(known, np.where(ndvi >= GREEN_NDVI, ground, 0.0), np.nan)
    if "tree" in fractions:
        out["tree_height"] = np.where(fractions["tree"] > 0, height, np.nan)
    out["slope"] = slope
    return out


def reference_shares(
    labels: dict[str, np.ndarray], predicted: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Class -> (N,) shares that amounts are checked against, and each tile's tolerance: a
    tile's labelled shares (exact, tolerance 0) where it has labels, else the shares predicted
    from its image (± `TOLERANCE`). Pass no `labels` for an index that reads no labels (an
    image-only embedder): its amounts then come from the image alone."""
    columns = {**predicted, **labels}
    if not columns:
        return {}, np.zeros(0)
    n = len(next(iter(columns.values())))
    unknown = np.full(n, np.nan)
    labelled = np.nansum(list(labels.values()), axis=0) > 0 if labels else np.zeros(n, bool)
    shares = {
        c: np.where(labelled, labels.get(c, unknown), predicted.get(c, unknown)) for c in columns
    }
    return shares, np.where(labelled, 0.0, TOLERANCE)


def amount_tiers(
    shares: dict[str, np.ndarray],
    amounts: Sequence[Amount],
    tolerance: float | np.ndarray = TOLERANCE,
) -> np.ndarray | None:
    """(N,) tier per tile for the amounts a query asks (shares: class -> (N,), NaN = unknown;
    `tolerance` per tile or one for all): 0 = known to meet every amount, 1 = meets every
    known one but some value is unknown (bare or green without NIR), 2 = contradicts one.
    Search ranks tier 0 first, then 1, then 2. None when nothing applies (no amounts, or no
    shares for their classes)."""
    usable = [a for a in amounts if a.cls in shares]
    if not usable:
        return None
    n = len(next(iter(shares.values())))
    unknown, outside = np.zeros(n, bool), np.zeros(n, bool)
    for a in usable:  # in place, O(n) per query; a NaN compares False, so it is never outside
        share = shares[a.cls]
        unknown |= np.isnan(share)
        outside |= share < a.low - tolerance
        outside |= share > a.high + tolerance
    tiers = unknown.astype(np.int8)
    tiers[outside] = 2
    return tiers
