"""Training captions and graded relevance, derived from a tile's labels and statistics.

Nobody has captioned NAIP tiles for us, but each tile knows its LiDAR classes, heights, NDVI,
terrain, colour and the shape of its tree and building masks (`retrieval.data.TileInfo`). Those
facts are first put into a few discrete categories (`facts`); a caption is a random phrasing of
the categories (grammar in docs/retrieval.md, "Captions"), and `relevance` compares the
categories, so a caption never claims what the relevance grade would not reward.

The words live in a `Vocabulary`, one per class set: `N3C` is the instance for the N3C labels
(others / ground / tree / building), refined by the raw ASPRS codes the labels fold together
(water 9 and bridge deck 17 are `others`, like low vegetation 3; road surface 11 is unlabelled)
so water and bridges are named as what they are. A tile of another class set (a `geoseg prepare`
benchmark build) is described by its class shares in its class names (`vocabulary_for`).

Evaluation never uses this module's words: its queries are a separate file written by hand
(`retrieval/queries/`), graded by their own label rules (`retrieval.queries`).

>>> captions(tile, np.random.default_rng(0), n=2)   # a Sierra Nevada tile of the sample
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache

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

ELEVATION_LEVELS: tuple[tuple[str, float], ...] = (
    ("mountain", 1500.0),
    ("hill", 500.0),
    ("middle", 200.0),
    ("lowland", -1e9),
)
"""Median ground elevation (m above the survey's vertical datum, ~sea level for 3DEP and IGN
LiDAR) -> category; `middle` is not mentioned."""

TERRAIN_LEVELS: tuple[tuple[str, float], ...] = (("steep", 10.0), ("gentle", 4.0), ("flat", -1.0))
"""Mean ground slope (degrees) -> terrain category (first bound the slope reaches)."""

PRESENT = 0.1
"""A class counts as a visible part of the scene (heights, relevance checks) from this share."""


@dataclass(frozen=True)
class Facts:
    """Discrete description of a tile: what captions say and relevance compares."""

    shares: dict[str, str]  # kind -> SHARE_LEVELS key, kinds ordered by share (desc)
    heights: dict[str, str]  # tree/building -> HEIGHT_LEVELS key, where present and known
    height_m: dict[str, float]
    vigour: str | None  # sparse / moderate / lush (NDVI), None without NIR
    terrain: str | None  # flat / gentle / steep (mean ground slope), None without ground
    layout: tuple[str, ...] = ()  # tree_line / scattered_trees / forest_gaps / buildings_in_trees
    colour: tuple[str, ...] = ()  # green / brown / grey / dark / bright
    texture: str | None = None  # smooth / coarse
    elevation: str | None = None  # mountain / hill / lowland (median ground elevation)


def kind_shares(tile: TileInfo) -> dict[str, float]:
    """Labelled-pixel shares of the surface kinds captions name: the N3C classes with `others`
    split into low vegetation / water / bridge by its ASPRS point shares, and road surface
    (ASPRS 11, outside the N3C labels) by its share of the points. In another class set, whose
    labels come from a benchmark's reference rather than ASPRS codes: its class shares."""
    shares = {c: tile.class_fractions.get(c, 0.0) for c in tile.classes}
    if tile.classes != CLASSES:
        return shares
    others = shares.pop("others", 0.0)
    water = tile.stats.get("others_water") or 0.0
    bridge = tile.stats.get("others_bridge") or 0.0
    shares["low_vegetation"] = others * max(0.0, 1.0 - water - bridge)
    shares["water"] = others * water
    shares["bridge"] = others * bridge
    shares["road"] = tile.stats.get("road_points") or 0.0
    return shares


def facts(tile: TileInfo) -> Facts:
    """The categories of one tile (see the module docstring)."""
    shares_f = kind_shares(tile)
    shares = {}
    for kind in sorted(shares_f, key=lambda k: -shares_f[k]):
        level = _level(shares_f[kind], SHARE_LEVELS)
        if level is not None:
            shares[kind] = level
    heights, height_m = {}, {}
    for c, levels in HEIGHT_LEVELS.items():
        h = tile.stats.get(f"{c}_height_p95")
        if h is not None and tile.class_fractions.get(c, 0.0) >= PRESENT:
            heights[c] = _level(h, levels)
            height_m[c] = h
    s = tile.stats
    ndvi, slope = s.get("ndvi_mean"), s.get("slope_deg")
    vigour = (
        None if ndvi is None else _level(ndvi, (("lush", 0.35), ("moderate", 0.15), ("sparse", -9)))
    )
    terrain = None if slope is None else _level(slope, TERRAIN_LEVELS)
    elevation = s.get("elevation_m")
    return Facts(
        shares,
        heights,
        height_m,
        vigour,
        terrain,
        _layout(shares_f, s),
        _colours(s),
        None
        if s.get("texture") is None
        else _level(s["texture"], (("coarse", 10), ("smooth", -1))),
        None if elevation is None else _level(elevation, ELEVATION_LEVELS),
    )


def _layout(shares: Mapping[str, float], s: Mapping[str, float | None]) -> tuple[str, ...]:
    tree, building = shares.get("tree", 0.0), shares.get("building", 0.0)
    open_land = shares.get("ground", 0.0) + shares.get("low_vegetation", 0.0)
    out = []
    if 0.02 <= tree < 0.4 and open_land >= 0.5 and (s.get("tree_elongation") or 0) >= 2.5:
        out.append("tree_line")
    if 0.02 <= tree < 0.3 and (s.get("tree_patches") or 0) >= 4:
        out.append("scattered_trees")
    if tree >= 0.5 and open_land >= 0.15:
        out.append("forest_gaps")
    if building >= 0.02 and (s.get("building_tree_contact") or 0) >= 0.3:
        out.append("buildings_in_trees")
    if shares.get("bridge", 0.0) >= 0.01 and shares.get("water", 0.0) >= 0.01:
        out.append("bridge_over_water")
    return tuple(out)


def _colours(s: Mapping[str, float | None]) -> tuple[str, ...]:
    """Colour words from the RGB chromaticity and brightness (thresholds in docs/retrieval.md)."""
    if s.get("brightness") is None:
        return ()
    out = []
    if (s.get("green_share") or 0) >= 0.355 and (s.get("green_share") or 0) > (
        s.get("red_share") or 0
    ):
        out.append("green")
    elif (s.get("red_share") or 0) >= 0.35:
        out.append("brown")
    elif (
        max(abs((s.get(k) or 0) - 1 / 3) for k in ("red_share", "green_share", "blue_share")) < 0.01
    ):
        out.append("grey")
    b = s["brightness"]
    if b < 0.3:
        out.append("dark")
    elif b >= 0.55:
        out.append("bright")
    return tuple(out)


def _level(value: float, levels: tuple[tuple[str, float], ...]) -> str | None:
    return next((name for name, bound in levels if value >= bound), None)


# --- the grammar ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """The words of one class set: synonyms per surface kind and per fact category, clauses
    for layout, colour and texture, and sentence frames. Every tuple is a synonym set; a
    caption draws one member of each set it uses."""

    kinds: dict[str, tuple[str, ...]]
    large: dict[str, tuple[str, ...]]
    """Extra words for a kind that covers much or most of a tile ("forest" is not 5 % trees)."""
    shares: dict[str, tuple[str, ...]]
    heights: dict[str, dict[str, tuple[str, ...]]]
    vigour: dict[str, tuple[str, ...]]
    terrain: dict[str, tuple[str, ...]]
    layout: dict[str, tuple[str, ...]]
    colour: dict[str, tuple[str, ...]]
    texture: dict[str, tuple[str, ...]]
    elevation: dict[str, tuple[str, ...]]
    frames: tuple[str, ...]
    empty: str = "an area without labelled land cover"
    joins: tuple[str, ...] = field(default=(" with ", " and ", ", plus "))


N3C = Vocabulary(
    kinds={
        "building": ("buildings", "houses", "rooftops", "built structures", "homes", "sheds"),
        "tree": ("trees", "canopy", "tree crowns", "treetops"),
        "ground": ("open ground", "bare ground", "open land", "ground"),
        "ground_bare": (
            "bare soil",
            "bare earth",
            "bare ground",
            "dirt",
            "cleared land",
            "a bare field",
            "tilled land",
            "fallow land",
        ),
        "ground_green": ("grass field", "green field", "meadow", "pasture", "farmland"),
        "low_vegetation": ("low vegetation", "grass and shrubs", "low plants", "scrub", "brush"),
        "water": ("water", "open water", "a water surface", "a pond or river"),
        "bridge": ("a bridge deck", "a bridge", "an overpass"),
        "road": ("road surface", "a paved road", "asphalt road"),
    },
    large={"tree": ("forest", "woodland", "woods", "wooded area")},
    shares={
        "most": (
            "mostly {w}",
            "{w} filling the frame",
            "{w} covering most of the tile",
            "nearly all {w}",
        ),
        "much": ("a lot of {w}", "a large share of {w}", "plenty of {w}", "extensive {w}"),
        "some": ("some {w}", "patches of {w}", "a moderate amount of {w}", "a few areas of {w}"),
        "few": (
            "scattered {w}",
            "a few patches of {w}",
            "a sprinkling of {w}",
            "small bits of {w}",
        ),
    },
    heights={
        "tree": {
            "tall": ("tall", "towering", "mature tall"),
            "mid": ("mature", "mid-height", "medium"),
            "short": ("short", "young", "small"),
        },
        "building": {
            "tall": ("tall", "high-rise"),
            "mid": ("multi-storey", "mid-rise"),
            "low": ("low", "single-storey", "one-storey"),
        },
    },
    vigour={
        "lush": ("lush, vigorous vegetation", "very green", "healthy green cover"),
        "moderate": ("moderately green", "some healthy vegetation", "partly green cover"),
        "sparse": ("little green vegetation", "dry, sparse greenery", "hardly any living plants"),
    },
    terrain={
        "flat": ("on flat terrain", "on level ground", "on flat land"),
        "gentle": ("on gently sloping terrain", "on rolling terrain", "on a mild slope"),
        "steep": ("on steep terrain", "on a steep slope", "on a steep hillside"),
    },
    layout={
        "tree_line": (
            "a line of trees along a field edge",
            "a row of trees between fields",
            "a hedgerow of trees",
            "trees in a narrow strip",
        ),
        "scattered_trees": (
            "isolated trees dotted across open land",
            "scattered single trees",
            "small clumps of trees spread out",
        ),
        "forest_gaps": (
            "a forest with open gaps",
            "an open canopy with bare patches between the trees",
            "woods broken by clearings",
        ),
        "buildings_in_trees": (
            "buildings among trees",
            "houses nestled in trees",
            "rooftops ringed by canopy",
        ),
        "bridge_over_water": ("a bridge over water", "a bridge crossing a river"),
    },
    colour={
        "green": ("green", "greenish"),
        "brown": ("brown", "tan", "earth-coloured"),
        "grey": ("grey", "greyish"),
        "dark": ("dark", "dark-toned"),
        "bright": ("bright", "light-coloured", "pale"),
    },
    texture={
        "smooth": ("smooth, uniform texture", "even, featureless surface"),
        "coarse": ("rough, coarse texture", "busy, uneven texture"),
    },
    elevation={
        "mountain": ("in the mountains", "at high elevation", "high-altitude terrain"),
        "hill": ("in hill country", "in the uplands", "at moderate elevation"),
        "lowland": ("in the lowlands", "at low elevation", "low-lying land"),
    },
    frames=(
        "Aerial view of {body}{extras}.",
        "{Body}{extras}.",
        "An orthophoto tile showing {body}{extras}.",
        "Top-down image: {body}{extras}.",
        "Overhead photo of {body}{extras}.",
        "This tile shows {body}{extras}.",
        "A {tone}aerial image with {body}{extras}.",
        "Seen from above: {body}{extras}.",
    ),
)
"""The N3C instance of the caption grammar (docs/retrieval.md lists it in full)."""


@cache
def vocabulary_for(classes: tuple[str, ...]) -> Vocabulary:
    """The words for tiles of a class set: N3C's, or for another set class-share sentences in
    its class names ("mostly impervious surfaces with some building") plus the words that do
    not depend on the classes (heights of classes named tree / building, terrain, vigour,
    colour, texture); no N3C refinements, forest words or layout phrases."""
    if classes == CLASSES:
        return N3C
    return replace(N3C, kinds={c: (c.replace("_", " "),) for c in classes}, large={}, layout={})


def captions(
    tile: TileInfo, rng: np.random.Generator, n: int = 1, vocabulary: Vocabulary | None = None
) -> list[str]:
    """`n` training captions of a tile with varied phrasing; deterministic for a given `rng`.
    The vocabulary defaults to the tile's class set's (`vocabulary_for`)."""
    f = facts(tile)
    v = vocabulary or vocabulary_for(tile.classes)
    return [_caption(f, rng, v) for _ in range(n)]


DOCUMENT_WEIGHTS = {"dominant": 2.0, "kind": 1.0, "layout": 1.0, "attribute": 0.5}
"""Weight of each facet in a tile document: the dominant surface kind counts most; terrain,
elevation, vigour, texture and colour least (they describe, they do not define, a tile)."""
DOCUMENT_VERSION = 1
"""Bump when `document` or the Vocabulary's words change: indexes of older documents differ."""


def document(
    tile: TileInfo, vocabulary: Vocabulary | None = None
) -> list[tuple[float, tuple[str, ...]]]:
    """The tile's facts as weighted facets, each facet the full synonym set of its phrases
    ("mostly trees", "trees filling the frame", ..., "tall forest", ...); deterministic.

    An index embeds every phrase with the text tower and a facet as the mean of its phrases, so
    the tile's document vector covers every wording the grammar knows instead of one random
    caption; phrases repeat across tiles, so an archive needs few distinct embeddings. The
    vocabulary defaults to the tile's class set's (`vocabulary_for`)."""
    f, v, w = facts(tile), vocabulary or vocabulary_for(tile.classes), DOCUMENT_WEIGHTS
    out: list[tuple[float, tuple[str, ...]]] = []
    for i, (kind, share) in enumerate(f.shares.items()):
        words = v.kinds[_refined(kind, f, v)]
        if share in ("most", "much"):
            words += v.large.get(kind, ())
        phrases = [template.format(w=word) for template in v.shares[share] for word in words]
        if kind in f.heights:
            phrases += [f"{h} {word}" for h in v.heights[kind][f.heights[kind]] for word in words]
        if i == 0 and share == "most":
            phrases += words
        out.append((w["dominant"] if i == 0 else w["kind"], tuple(phrases)))
    out += [(w["layout"], v.layout[key]) for key in f.layout if key in v.layout]
    for table, key in (
        (v.terrain, f.terrain),
        (v.elevation, f.elevation),
        (v.vigour, f.vigour),
        (v.texture, f.texture),
    ):
        if key in table:
            out.append((w["attribute"], table[key]))
    out += [(w["attribute"], v.colour[c]) for c in f.colour]
    return out or [(1.0, (v.empty,))]


def _caption(f: Facts, rng: np.random.Generator, v: Vocabulary) -> str:
    parts = []
    for i, (kind, share) in enumerate(f.shares.items()):
        words = v.kinds[_refined(kind, f, v)]
        if share in ("most", "much"):
            words += v.large.get(kind, ())
        word = _pick(rng, words)
        if kind in f.heights:
            if rng.random() < 0.5:
                word = f"{_pick(rng, v.heights[kind][f.heights[kind]])} {word}"
            else:
                word = f"{word} up to about {f.height_m[kind]:.0f} m tall"
        # The dominant kind keeps its quantifier only sometimes: "tall tree canopy" alone is a
        # natural caption of a forest tile.
        if i == 0 and share == "most" and rng.random() < 0.5:
            parts.append(word)
        else:
            parts.append(_pick(rng, v.shares[share]).format(w=word))
    if not parts:
        parts = [v.empty]
    body = parts[0]
    if len(parts) > 1:
        body += _pick(rng, v.joins) + " and ".join(parts[1:])
    extras = []
    for key in f.layout:
        if key in v.layout and rng.random() < 0.8:
            extras.append(_pick(rng, v.layout[key]))
    if f.terrain and rng.random() < 0.5:
        extras.append(_pick(rng, v.terrain[f.terrain]))
    if f.elevation in v.elevation and rng.random() < 0.5:
        extras.append(_pick(rng, v.elevation[f.elevation]))
    if f.vigour and rng.random() < 0.5:
        extras.append(_pick(rng, v.vigour[f.vigour]))
    if f.texture and rng.random() < 0.3:
        extras.append(_pick(rng, v.texture[f.texture]))
    rng.shuffle(extras)
    tone = ""
    if f.colour and rng.random() < 0.6:
        tone = " ".join(_pick(rng, v.colour[c]) for c in f.colour) + " "
    frame = _pick(rng, v.frames)
    if "{tone}" not in frame and tone and rng.random() < 0.5:
        extras.append(f"{tone.strip()} in colour")
    glue = "; " if rng.random() < 0.5 else ", "
    text = frame.format(
        body=body,
        Body=body[0].upper() + body[1:],
        extras="".join(glue + e for e in extras),
        tone=tone,
    )
    return text.replace("A a", "An a").replace("A e", "An e")


def _refined(kind: str, f: Facts, v: Vocabulary) -> str:
    """LiDAR "ground" is whatever is at ground level: green with NIR vigour (a field, a meadow),
    bare without, unknown (open ground) without NIR."""
    if kind != "ground" or f.vigour is None:
        return kind
    refined = "ground_bare" if f.vigour == "sparse" else "ground_green"
    return refined if refined in v.kinds else kind


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


# --- graded relevance (stage-3 label judge) ---------------------------------------------------


def relevance(query: TileInfo, candidate: TileInfo) -> int:
    """How well `candidate` answers a caption of `query`: 0 (no) .. 3 (fully).

    3: same dominant kind, kind mix within 0.15 total variation, every kind that makes up
       >= 10 % of the query present in the candidate, and no known height/terrain category that
       disagrees; 2: same dominant kind, mix within 0.3, kinds present;
    1: same dominant kind, or a mix within 0.35; 0 otherwise. The label judge of training uses
    it; evaluation does not (its queries have their own rules, `retrieval.queries`).
    """
    fq, fc = facts(query), facts(candidate)
    if not fq.shares or not fc.shares:
        return 0
    sq, sc = kind_shares(query), kind_shares(candidate)
    tv = 0.5 * sum(abs(sq[k] - sc[k]) for k in sq)
    if next(iter(fq.shares)) != next(iter(fc.shares)):
        return 1 if tv <= 0.35 else 0
    present = all(sc[k] >= SHARE_LEVELS[-1][1] for k in sq if sq[k] >= PRESENT)
    attributes_agree = all(fc.heights.get(c, h) == h for c, h in fq.heights.items()) and (
        fq.terrain is None or fc.terrain is None or fq.terrain == fc.terrain
    )
    if tv <= 0.15 and present and attributes_agree:
        return 3
    if tv <= 0.3 and present:
        return 2
    return 1
