"""Amounts in queries (`retrieval.amounts`): parsing, the image composition head, ordering."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.amounts import (
    TOLERANCE,
    TRACE,
    Amount,
    CompositionHead,
    class_words,
    fit_composition,
    in_range,
    parse_amounts,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a few trees in a field", [("tree", 0.02, 0.1)]),
        ("scattered trees", [("tree", 0.02, 0.1)]),
        ("sparsely treed", [("tree", 0.02, 0.1)]),
        ("mostly woods", [("tree", 0.6, 1.0)]),
        ("dense forest", [("tree", 0.6, 1.0)]),
        ("a large share of bare soil", [("ground", 0.3, 0.6)]),
        ("some shrubs", [("others", 0.1, 0.3)]),
        ("more than half woodland", [("tree", 0.5, 1.0)]),
        ("at most 25 % trees", [("tree", 0.0, 0.25)]),
        ("about 40% forest", [("tree", 0.25, 0.55)]),
        ("woods on about half of it", [("tree", 0.35, 0.65)]),
        ("no trees at all", [("tree", 0.0, TRACE)]),
        ("treeless plain", [("tree", 0.0, TRACE)]),
        ("forest with no houses", [("building", 0.0, TRACE)]),
        ("some trees here and there", [("tree", 0.02, 0.3)]),  # several cues: the widest range
        ("dirt, nothing grown", []),  # a negated phrase without a kind word names no class
        ("forest", []),
        ("tall trees on a hillside", []),
    ],
)
def test_amounts_are_read_off_the_query(text, expected):
    assert parse_amounts(text) == tuple(Amount(*e) for e in expected)


def test_a_cue_on_an_unknown_word_asks_the_classifier():
    asked: list[str] = []

    def classify(phrase: str) -> str:
        asked.append(phrase)
        return "tree"

    assert parse_amounts("a few oaks") == ()
    assert parse_amounts("a few oaks", classify) == (Amount("tree", 0.02, 0.1),)
    assert asked == ["oaks"]


def test_class_words_come_from_the_grammar_and_skip_generic_words():
    words = class_words()
    assert words["trees"] == words["wooded"] == words["forest"] == "tree"
    assert words["houses"] == "building" and words["soil"] == "ground"
    assert words["shrubs"] == "others"
    assert not {"open", "and", "bare", "area"} & set(words)


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


def test_tiles_whose_predicted_shares_meet_every_amount():
    predicted = {"tree": np.array([0.8, 0.05, 0.0, 0.3, 0.1 + TOLERANCE])}
    keep = in_range(predicted, [Amount("tree", 0.02, 0.1)])
    assert keep.tolist() == [False, True, True, False, True]
    assert in_range(predicted, []) is None
    assert in_range(predicted, [Amount("building", 0.0, TRACE)]) is None  # nothing predicted
