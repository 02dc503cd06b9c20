"""The hand-written query sets: rule language, independence from the caption grammar, metrics
with chance levels and bootstrap intervals."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

from retrieval.captions import N3C
from retrieval.data import TileInfo
from retrieval.negation import embed_search_queries, split_negation
from retrieval.queries import (
    DEV_QUERIES,
    EVAL_QUERIES,
    QUERY_DIR,
    Rule,
    bootstrap_ci,
    load_queries,
    query_metrics,
    relevance_matrix,
    rule_facts,
    summarise,
)


def tile(fractions: dict[str, float], **stats: float | None) -> TileInfo:
    return TileInfo("t", "test", (0, 0, 1, 1), "EPSG:32611", 2022, fractions, dict(stats))


STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "by",
        "with",
        "and",
        "or",
        "to",
        "at",
        "as",
        "is",
        "are",
        "between",
    ]
)


def bigrams(text: str) -> set[tuple[str, str]]:
    """Pairs of consecutive content words (a pair with a stop word, "in a", is no phrase)."""
    words = re.findall(r"[a-z]+(?:-[a-z]+)*", text.lower())
    return {p for p in itertools.pairwise(words) if not set(p) & STOPWORDS}


def grammar_phrases() -> list[str]:
    """Every phrase of the N3C caption grammar."""
    out: list[str] = list(N3C.frames)
    for table in (N3C.kinds, N3C.large, N3C.shares, N3C.vigour, N3C.terrain, N3C.layout):
        out += [p for v in table.values() for p in v]
    out += [p for v in N3C.colour.values() for p in v] + [
        p for v in N3C.texture.values() for p in v
    ]
    out += [p for h in N3C.heights.values() for v in h.values() for p in v]
    return out


FRESH_SETS = tuple(QUERY_DIR / f"eval{n}.yaml" for n in range(2, 8))
"""The held-out sets written after eval.yaml, oldest first."""


def test_query_files_parse_and_are_disjoint():
    evaluation, dev = load_queries(EVAL_QUERIES), load_queries(DEV_QUERIES)
    fresh = [load_queries(p) for p in FRESH_SETS]
    assert len(evaluation) >= 25 and all(len(f) >= 25 for f in fresh) and len(dev) >= 8
    dev += [q for path in sorted(QUERY_DIR.glob("dev?*.yaml")) for q in load_queries(path)]
    assert not {q.text for q in evaluation} & {q.text for q in dev}
    # eval2.yaml ... eval7.yaml, each written after the sets before it, share no two-word
    # phrase with any of them
    earlier = evaluation + dev
    for queries in fresh:
        others = set().union(*(bigrams(q.text) for q in earlier))
        for q in queries:
            assert not bigrams(q.text) & others, q.text
        earlier += queries


@pytest.mark.parametrize(
    "path",
    [EVAL_QUERIES, *FRESH_SETS],
    ids=lambda path: path.stem,
)
def test_evaluation_queries_share_no_phrase_with_the_caption_grammar(path):
    """ "No shared phrases": no two consecutive words of an evaluation query occur together in
    any caption phrase (single words such as "trees" cannot be avoided)."""
    grammar = set().union(*(bigrams(p) for p in grammar_phrases()))
    for q in load_queries(path):
        assert not bigrams(q.text) & grammar, q.text


def test_rules_read_label_facts_and_unknown_facts_never_match():
    forest = tile({"tree": 0.7, "ground": 0.3}, tree_height_p95=31.0, slope_deg=3.0)
    facts = rule_facts(forest)
    assert Rule.parse("tree >= 0.5 and tree_height >= 20")(facts)
    assert not Rule.parse("tree >= 0.5 and tree_height >= 40")(facts)
    assert Rule.parse("ground + tree > 0.99 or building > 0")(facts)
    # NDVI is unknown without NIR: neither "ndvi < 0.05" nor its negation holds
    assert not Rule.parse("ndvi < 0.05")(facts) and not Rule.parse("ndvi >= 0.05")(facts)
    assert Rule.parse("not ndvi < 0.05")(facts)  # `not` of an unknown comparison is explicit
    assert rule_facts(tile({"ground": 1.0}))["tree_height"] == 0.0


@pytest.mark.parametrize(
    "source", ["__import__('os')", "tree.real > 0", "tree > 'a'", "[tree][0] > 0", "tree >"]
)
def test_rules_are_parsed_not_evaluated(source):
    with pytest.raises(ValueError):
        Rule.parse(source)


def test_unknown_fact_names_are_errors():
    with pytest.raises(ValueError, match="unknown facts"):
        Rule.parse("forest_share > 0")(rule_facts(tile({"tree": 1.0})))


def test_relevance_matrix_of_the_query_set():
    tiles = [tile({"tree": 0.8, "ground": 0.2}, tree_height_p95=30.0), tile({"ground": 1.0})]
    specs = load_queries(EVAL_QUERIES)
    matrix = relevance_matrix(specs, tiles)
    by_id = dict(zip([q.id for q in specs], matrix, strict=True))
    assert by_id["forest"].tolist() == [True, False]
    assert by_id["treeless"].tolist() == [False, True]


def test_metrics_and_chance_levels_match_hand_computed_values():
    relevant = np.zeros(20, bool)
    relevant[[0, 5, 12]] = True
    ranked = np.array([5, 1, 2, 0, 3, 4, 6, 7, 8, 9, 12])
    m = query_metrics(ranked, relevant)
    assert m["p@10"] == pytest.approx(0.2) and m["chance_p@10"] == pytest.approx(3 / 20)
    assert m["ceiling_p@10"] == pytest.approx(0.3)
    assert m["hit@1"] == 1.0 and m["chance_hit@1"] == pytest.approx(3 / 20)
    assert m["chance_hit@5"] == pytest.approx(1 - math.comb(17, 5) / math.comb(20, 5))
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / idcg)
    summary = summarise([m, m | {"p@10": 0.4}])
    assert summary["p@10"]["mean"] == pytest.approx(0.3)
    assert summary["p@10"]["chance"] == pytest.approx(0.15)
    assert summary["p@10"]["ceiling"] == pytest.approx(0.3)


def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    values = np.random.default_rng(0).random(40)
    lo, hi = bootstrap_ci(values, seed=3)
    assert lo < values.mean() < hi and (lo, hi) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci([0.5] * 5) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("text", "asked", "negated"),
    [
        ("no trees at all", "", ("trees",)),
        ("forest with no houses", "forest", ("houses",)),
        ("fields without any trees", "fields", ("trees",)),
        ("open land, not forest", "open land", ("forest",)),
        ("land free of trees", "land", ("trees",)),
        ("treeless plain", "plain", ("tree",)),
        ("No trees or houses", "", ("trees", "houses")),
        ("ground not covered with trees", "ground", ("covered with trees",)),
        ("fields without trees and a road", "fields and a road", ("trees",)),
        ("area devoid of vegetation", "area", ("vegetation",)),
        ("pasture with the trees absent", "pasture", ("the trees",)),
        ("cropland, hedges missing", "cropland", ("hedges",)),
        ("weed-free cropland", "cropland", ("weed",)),
        ("grassland, zero shrubs", "grassland", ("shrubs",)),
        ("slope bare of vegetation", "slope", ("vegetation",)),
        ("meadow clear of brush and a road", "meadow and a road", ("brush",)),
        ("clear water", "clear water", ()),
        ("bare ground", "bare ground", ()),
        ("dense woods", "dense woods", ()),
        ("endless fields", "endless fields", ()),
        ("snow-covered ground", "snow-covered ground", ()),
    ],
)
def test_negation_is_split_from_what_a_query_asks(text, asked, negated):
    assert split_negation(text) == (asked, negated)


class BagOfWords:
    """A text tower that reads words and ignores their order, as MiniLM reads "no trees"."""

    WORDS = ("no", "trees", "fields", "houses", "forest", "with")

    def embed_queries(self, texts: list[str]) -> torch.Tensor:
        counts = [[t.split().count(w) + 1e-3 for w in self.WORDS] for t in texts]
        return torch.nn.functional.normalize(torch.tensor(counts), dim=-1)


def test_a_negated_query_ranks_what_it_negates_last():
    model = BagOfWords()
    tiles = model.embed_queries(["trees", "fields", "forest houses", "forest"])

    def ranking(vectors: torch.Tensor) -> list[int]:
        return (tiles @ vectors[0]).argsort(descending=True).tolist()

    assert ranking(model.embed_queries(["no trees"]))[0] == 0  # the failure being fixed
    assert ranking(embed_search_queries(model, ["no trees"]))[-1] == 0
    assert ranking(model.embed_queries(["forest with no houses"]))[0] == 2
    assert ranking(embed_search_queries(model, ["forest with no houses"]))[0] == 3
    plain = embed_search_queries(model, ["fields", "no trees"])[0]
    assert torch.allclose(plain, model.embed_queries(["fields"])[0])
