"""Captions, evaluation queries and graded relevance, all derived from a tile's labels and stats.

Nobody has captioned NAIP tiles for us, but each tile knows its LiDAR classes, heights, NDVI and
terrain (`retrieval.data.TileInfo`). Those facts are first put into a few discrete categories
(`facts`); captions and queries are phrasings of the categories, and relevance compares the
categories, so a caption never claims what the relevance grade would not reward.

Training captions (`captions`) and held-out queries (`query_for`) use different templates and
partly different words, so evaluation measures whether the embedder learnt the facts, not the
sentences:

>>> captions(tile, np.random.default_rng(0), n=2)   # a Sierra Nevada tile of the sample
['Aerial view of a lot of towering forest with a lot of bare ground.',
 'An orthophoto tile showing a large share of woodland up to about 31 m tall with a large share
 of bare soil.']
>>> query_for(tile, np.random.default_rng(1))
'places with tall forest and lots of open land on flat terrain'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.data import CLASSES, TileInfo

SHARE_LEVELS: tuple[tuple[str, float], ...] = (
    ("most", 0.6),
    ("much", 0.3),
    ("some", 0.1),
    ("few", 0.02),
)
"""Share category -> lower bound of the labelled-pixel fraction; below the last: not mentioned."""

HEIGHT_LEVELS: dict[str, tuple[tuple[str, float], ...]] = {
    "tree": (("tall", 20.0), ("mid", 8.0), ("short", 0.0)),
    "building": (("tall", 15.0), ("mid", 7.0), ("low", 0.0)),
}
"""95th-percentile height above ground (m) -> category (first bound the height reaches)."""

PRESENT = 0.1
"""A class counts as a visible part of the scene (heights, relevance checks) from this share."""


@dataclass(frozen=True)
class Facts:
    """Discrete description of a tile: what captions say and relevance compares."""

    shares: dict[str, str]  # class -> SHARE_LEVELS key, classes ordered by share (desc)
    heights: dict[str, str]  # tree/building -> HEIGHT_LEVELS key, where present and known
    height_m: dict[str, float]
    vigour: str | None  # sparse / moderate / lush (NDVI), None without NIR
    terrain: str | None  # flat / gentle / steep (mean ground slope), None without ground


def facts(tile: TileInfo) -> Facts:
    """The categories of one tile (see the module docstring)."""
    ordered = sorted(CLASSES, key=lambda c: -tile.class_fractions.get(c, 0.0))
    shares = {}
    for c in ordered:
        level = _level(tile.class_fractions.get(c, 0.0), SHARE_LEVELS)
        if level is not None:
            shares[c] = level
    heights, height_m = {}, {}
    for c, levels in HEIGHT_LEVELS.items():
        h = tile.stats.get(f"{c}_height_p95")
        if h is not None and tile.class_fractions.get(c, 0.0) >= PRESENT:
            heights[c] = _level(h, levels)
            height_m[c] = h
    ndvi, slope = tile.stats.get("ndvi_mean"), tile.stats.get("slope_deg")
    vigour = (
        None
        if ndvi is None
        else "lush"
        if ndvi >= 0.35
        else "moderate"
        if ndvi >= 0.15
        else "sparse"
    )
    terrain = (
        None if slope is None else "steep" if slope >= 10 else "gentle" if slope >= 4 else "flat"
    )
    return Facts(shares, heights, height_m, vigour, terrain)


def _level(value: float, levels: tuple[tuple[str, float], ...]) -> str | None:
    return next((name for name, bound in levels if value >= bound), None)


# --- training captions -------------------------------------------------------------------------

CAPTION_WORDS = {
    "building": ("buildings", "houses", "rooftops", "built structures"),
    "tree": ("trees", "tree canopy", "woodland", "forest"),
    "ground": ("bare ground", "open ground", "bare soil", "cleared land"),
    "others": ("low vegetation", "grass and shrubs", "low plants", "scrub"),
}
CAPTION_SHARES = {
    "most": ("mostly {w}", "dominated by {w}", "{w} covering most of the tile"),
    "much": ("a lot of {w}", "a large share of {w}", "plenty of {w}"),
    "some": ("some {w}", "patches of {w}", "a moderate amount of {w}"),
    "few": ("scattered {w}", "a few patches of {w}", "a sprinkling of {w}"),
}
CAPTION_HEIGHTS = {
    "tree": {
        "tall": ("tall", "towering"),
        "mid": ("mature", "mid-height"),
        "short": ("short", "young"),
    },
    "building": {
        "tall": ("tall", "high-rise"),
        "mid": ("multi-storey", "mid-rise"),
        "low": ("low", "single-storey"),
    },
}
CAPTION_VIGOUR = {
    "lush": ("lush, vigorous vegetation", "very green"),
    "moderate": ("moderately green", "some healthy vegetation"),
    "sparse": ("little green vegetation", "dry, sparse greenery"),
}
CAPTION_TERRAIN = {
    "flat": ("on flat terrain", "on level ground"),
    "gentle": ("on gently sloping terrain", "on rolling terrain"),
    "steep": ("on steep terrain", "on a steep slope"),
}
CAPTION_FRAMES = (
    "Aerial view of {body}{terrain}{vigour}.",
    "{Body}{terrain}{vigour}.",
    "An orthophoto tile showing {body}{terrain}{vigour}.",
    "Top-down image: {body}{terrain}{vigour}.",
)


def captions(tile: TileInfo, rng: np.random.Generator, n: int = 1) -> list[str]:
    """`n` training captions of a tile with varied phrasing; deterministic for a given `rng`."""
    f = facts(tile)
    return [_caption(f, rng) for _ in range(n)]


def _caption(f: Facts, rng: np.random.Generator) -> str:
    parts = []
    for i, (cls, share) in enumerate(f.shares.items()):
        word = _pick(rng, CAPTION_WORDS[cls])
        if cls in f.heights:
            if rng.random() < 0.5:
                word = f"{_pick(rng, CAPTION_HEIGHTS[cls][f.heights[cls]])} {word}"
            else:
                word = f"{word} up to about {f.height_m[cls]:.0f} m tall"
        # The dominant class keeps its quantifier only sometimes: "tall tree canopy" alone is a
        # natural caption of a forest tile.
        if i == 0 and share == "most" and rng.random() < 0.5:
            parts.append(word)
        else:
            parts.append(_pick(rng, CAPTION_SHARES[share]).format(w=word))
    if not parts:
        parts = ["an area without labelled land cover"]
    body = parts[0] if len(parts) == 1 else f"{parts[0]} with " + " and ".join(parts[1:])
    if len(parts) > 1 and rng.random() < 0.5:
        body = f"{parts[0]}, plus " + ", ".join(parts[1:])
    terrain = (
        f" {_pick(rng, CAPTION_TERRAIN[f.terrain])}" if f.terrain and rng.random() < 0.7 else ""
    )
    vigour = f"; {_pick(rng, CAPTION_VIGOUR[f.vigour])}" if f.vigour and rng.random() < 0.6 else ""
    frame = _pick(rng, CAPTION_FRAMES)
    return frame.format(body=body, Body=body[0].upper() + body[1:], terrain=terrain, vigour=vigour)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


# --- held-out evaluation queries ---------------------------------------------------------------

QUERY_WORDS = {
    "building": ("buildings", "built-up area", "structures"),
    "tree": ("trees", "forest", "wooded area"),
    "ground": ("bare ground", "bare soil", "open land"),
    "others": ("low vegetation", "grassland", "shrubland"),
}
QUERY_HEIGHTS = {
    "tree": {"tall": "tall", "mid": "medium-height", "short": "low"},
    "building": {"tall": "tall", "mid": "mid-size", "low": "small"},
}
QUERY_SHARES = {"much": "lots of", "some": "some", "few": "a few patches of"}
QUERY_PREFIXES = ("", "places with ", "areas of ", "find ")
QUERY_TERRAIN = {"flat": "flat", "gentle": "sloping", "steep": "steep"}


def query_for(tile: TileInfo, rng: np.random.Generator) -> str:
    """A short search-style query describing a held-out tile (evaluation only, never trained on).

    Names the dominant class (with its height category), optionally the second class and the
    terrain: what a user would type, and exactly what `relevance` grades.
    """
    f = facts(tile)
    classes = list(f.shares)
    if not classes:
        return "areas without land cover labels"

    def phrase(cls: str) -> str:
        word = _pick(rng, QUERY_WORDS[cls])
        height = QUERY_HEIGHTS.get(cls, {}).get(f.heights.get(cls, ""))
        return f"{height} {word}" if height else word

    text = _pick(rng, QUERY_PREFIXES) + phrase(classes[0])
    if len(classes) > 1 and f.shares[classes[1]] in QUERY_SHARES:
        text += f" and {QUERY_SHARES[f.shares[classes[1]]]} {phrase(classes[1])}"
    if f.terrain and rng.random() < 0.5:
        text += f" on {QUERY_TERRAIN[f.terrain]} terrain"
    return text


# --- graded relevance --------------------------------------------------------------------------


def relevance(query: TileInfo, candidate: TileInfo) -> int:
    """How well `candidate` answers a query describing `query`: 0 (no) .. 3 (fully).

    3: same dominant class, class mix within 0.15 total variation, every class that makes up
       >= 10 % of the query present in the candidate, and no known height/terrain category that
       disagrees; 2: same dominant class, mix within 0.3, classes present;
    1: same dominant class, or a mix within 0.35; 0 otherwise. Used for nDCG grades and by the
    label judge, so it only reads labels and statistics, never pixels.
    """
    fq, fc = facts(query), facts(candidate)
    if not fq.shares or not fc.shares:
        return 0
    tv = 0.5 * sum(
        abs(query.class_fractions.get(c, 0.0) - candidate.class_fractions.get(c, 0.0))
        for c in CLASSES
    )
    if query.dominant != candidate.dominant:
        return 1 if tv <= 0.35 else 0
    present = all(
        candidate.class_fractions.get(c, 0.0) >= SHARE_LEVELS[-1][1]
        for c in CLASSES
        if query.class_fractions.get(c, 0.0) >= PRESENT
    )
    attributes_agree = all(fc.heights.get(c, h) == h for c, h in fq.heights.items()) and (
        fq.terrain is None or fc.terrain is None or fq.terrain == fc.terrain
    )
    if tv <= 0.15 and present and attributes_agree:
        return 3
    if tv <= 0.3 and present:
        return 2
    return 1
