"""Amounts in queries (`retrieval.amounts`): parsing, the facts they are checked on (labels or
the image composition head), tiers."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.amounts import (
    FULL,
    THERE,
    TOLERANCE,
    TRACE,
    Amount,
    CompositionHead,
    amount_tiers,
    class_words,
    fit_composition,
    label_shares,
    parse_amounts,
    reference_shares,
)

INF = float("inf")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a few trees in a field", [("tree", 0.02, 0.1)]),
        ("scattered trees", [("tree", 0.02, 0.1)]),
        ("sparsely treed", [("tree", 0.02, 0.1)]),
        ("mostly woods", [("tree", 0.6, 1.0)]),
        ("dense forest", [("tree", FULL, 1.0)]),  # a cover, not a majority
        ("a large share of bare soil", [("ground_bare", 0.3, 0.6)]),
        ("some shrubs", [("others", 0.1, 0.3)]),
        ("more than half woodland", [("tree", 0.5, 1.0)]),
        ("at most 25 % trees", [("tree", 0.0, 0.25)]),
        ("about 40% forest", [("tree", 0.25, 0.55)]),
        ("woods on about half of it", [("tree", 0.35, 0.65)]),
        ("no trees at all", [("tree", 0.0, TRACE)]),
        ("treeless plain", [("tree", 0.0, TRACE), ("slope", 0.0, 4.0)]),
        ("forest with no houses", [("building", 0.0, TRACE), ("tree", THERE, 1.0)]),
        ("some trees here and there", [("tree", 0.02, 0.3)]),  # several cues: the widest range
        ("dirt, nothing grown", [("ground_bare", THERE, 1.0)]),  # "nothing grown": no class
        # a kind named without an amount must be there; "farmland", "vegetation" name none
        ("forest", [("tree", THERE, 1.0)]),
        ("green pasture", [("ground_green", THERE, 1.0)]),
        ("farmland full of vegetation", []),
        # LiDAR measures: heights in metres or the grammar's height words before a tree word,
        # slope from the grammar's terrain words
        ("trees over 40 m high", [("tree_height", 40.0, INF), ("tree", THERE, 1.0)]),
        ("saplings under 10 metres", [("tree_height", 0.0, 10.0)]),
        ("tall trees", [("tree_height", 20.0, INF), ("tree", THERE, 1.0)]),
        ("young woods", [("tree_height", 0.0, 8.0), ("tree", THERE, 1.0)]),
        ("a tall barn", [("building", THERE, 1.0)]),  # a height word before no tree word
        ("flat valley floor", [("slope", 0.0, 4.0)]),
        ("steep canyon", [("slope", 10.0, INF)]),
        ("rolling hills", [("slope", 4.0, 10.0)]),  # words that agree: their ranges intersect
        ("hilly country", [("slope", 4.0, INF)]),
        ("flat hills", []),  # words that disagree say nothing
        # common words beyond the grammar's
        ("just a tree or two", [("tree", 0.02, 0.1)]),
        ("barely wooded", [("tree", 0.02, 0.1)]),
        ("packed with conifers", [("tree", FULL, 1.0)]),
        ("a barn", [("building", THERE, 1.0)]),
        ("harrowed cropland", [("ground_bare", THERE, 1.0)]),  # "cropland" is bare or green
        ("pasture and dirt patches", []),  # ground of both kinds: no bare / green ask
        # a kind asked for and negated: the negation qualifies part of the scene
        ("timber interrupted by treeless gaps", [("tree", THERE, 1.0)]),
    ],
)
def test_amounts_are_read_off_the_query(text, expected):
    assert parse_amounts(text) == tuple(Amount(*e) for e in expected)


def test_a_cue_on_an_unknown_word_asks_the_classifier():
    asked: list[str] = []

    def classify(phrase: str) -> str:
        asked.append(phrase)
        return "tree"

    assert parse_amounts("a few acacias") == ()
    assert parse_amounts("a few acacias", classify) == (Amount("tree", 0.02, 0.1),)
    assert asked == ["acacias"]


def test_class_words_come_from_the_grammar_and_skip_generic_words():
    words = class_words()
    assert words["trees"] == words["wooded"] == words["forest"] == "tree"
    assert words["houses"] == "building" and words["ground"] == "ground"
    assert words["soil"] == words["dirt"] == "ground_bare" and words["pasture"] == "ground_green"
    assert words["shrubs"] == "others"
    assert not {"open", "and", "bare", "area", "farmland", "vegetation", "plants"} & set(words)
    assert words["pine"] == words["firs"] == "tree" and words["barn"] == "building"
    assert words["chaparral"] == "others" and words["hayfield"] == "ground_green"


def test_composition_head_fits_by_leave_one_out_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8))
    y = np.c_[x[:, 0] * 0.1 + 0.5, x[:, 1] * 0.05 + 0.2]
    head = fit_composition(x, y, ("tree", "ground"))
    assert head.lam == 0.01  # noiseless linear data: the least shrinkage wins
    np.testing.assert_allclose(head.predict(x), y, atol=0.01)
    head.save(tmp_path)
    loaded = CompositionHead.load(tmp_path)
    assert loaded is not None and loaded.classes == ("tree", "ground")
    np.testing.assert_allclose(loaded.predict(x), head.predict(x))
    assert CompositionHead.load(tmp_path / "none") is None
    # more views of the same tiles (flips, rotations) are fitted with the lambda of the plain ones
    views = [x + rng.normal(scale=0.01, size=x.shape) for _ in range(3)]
    both = fit_composition(x, y, ("tree", "ground"), views=views)
    assert both.lam == head.lam and both.weights.shape == head.weights.shape
    np.testing.assert_allclose(both.predict(views[0]), y, atol=0.02)


def test_tiers_known_to_meet_unknown_and_contradicting():
    shares = {"tree": np.array([0.8, 0.05, 0.0, 0.3, 0.1 + TOLERANCE, np.nan])}
    assert amount_tiers(shares, [Amount("tree", 0.02, 0.1)]).tolist() == [2, 0, 0, 2, 0, 1]
    exact = amount_tiers(shares, [Amount("tree", 0.02, 0.1)], tolerance=0.0)
    assert exact.tolist() == [2, 0, 2, 2, 2, 1]
    assert amount_tiers(shares, []) is None
    assert amount_tiers(shares, [Amount("building", 0.0, TRACE)]) is None  # no such shares
    # a contradiction outranks an unknown value
    both = {"tree": np.array([0.05, np.nan]), "slope": np.array([20.0, 20.0])}
    tiers = amount_tiers(both, [Amount("tree", 0.02, 0.1), Amount("slope", 0.0, 4.0)], 0.0)
    assert tiers.tolist() == [2, 2]


def test_label_facts_split_ground_by_ndvi_and_keep_heights_where_there_are_trees():
    fractions = {
        "ground": np.array([1.0, 1.0, 1.0, 0.4]),
        "tree": np.array([0.0, 0.0, 0.0, 0.6]),
    }
    stats = {
        "ndvi_mean": np.array([0.05, 0.15, 0.4, np.nan]),  # barren, neither, green, no NIR
        "tree_height_p95": np.array([np.nan, np.nan, 3.0, 31.0]),
        "slope_deg": np.array([1.0, 2.0, 3.0, 12.0]),
    }
    facts = label_shares(fractions, stats)
    np.testing.assert_array_equal(facts["ground_bare"], [1.0, 0.0, 0.0, np.nan])
    np.testing.assert_array_equal(facts["ground_green"], [0.0, 0.0, 1.0, np.nan])
    np.testing.assert_array_equal(facts["tree_height"], [np.nan, np.nan, np.nan, 31.0])
    np.testing.assert_array_equal(facts["slope"], stats["slope_deg"])


def test_labelled_tiles_are_checked_exactly_and_the_others_on_their_predictions():
    labels = {"tree": np.array([0.05, 0.0]), "ground": np.array([0.95, 0.0])}  # 2nd: no labels
    predicted = {"tree": np.array([0.5, 0.12])}
    shares, tolerance = reference_shares(labels, predicted)
    np.testing.assert_array_equal(shares["tree"], [0.05, 0.12])
    np.testing.assert_array_equal(tolerance, [0.0, TOLERANCE])
    assert np.isnan(shares["ground"][1])  # nothing predicted for it: unknown
    assert amount_tiers(shares, [Amount("tree", 0.02, 0.1)], tolerance).tolist() == [0, 0]
    # an image-only index passes no labels: every tile on its prediction
    shares, tolerance = reference_shares({}, predicted)
    np.testing.assert_array_equal(shares["tree"], predicted["tree"])
    assert set(tolerance) == {TOLERANCE}
