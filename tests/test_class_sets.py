"""Class sets other than N3C: the ClassSet record, benchmark metrics, point labels/features."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from geoseg.classes import CLASS_NAMES, N3C, ClassSet
from geoseg.datasets.points import PointConfig, prepare_points
from geoseg.prepare.dfc2018 import DFC2018
from geoseg.prepare.vaihingen import VAIHINGEN
from geoseg.train.losses import class_weights
from geoseg.train.metrics import dfc2018_metrics, isprs_2d_metrics, protocol_metrics

NAMES = ("unlabeled", "a", "b", "clutter")
CM = np.array([[0, 0, 0, 0], [0, 8, 2, 0], [0, 1, 6, 3], [0, 0, 0, 4]])
"""cm[target, predicted]: 24 labelled samples, 18 right."""


def test_class_sets_round_trip_through_stats_and_contract():
    for classes in (N3C, VAIHINGEN, DFC2018):
        assert ClassSet.from_stats(classes.stats_keys()).names == classes.names
        assert ClassSet.from_stats(classes.stats_keys()).colors == classes.colors
        assert ClassSet.from_contract(classes.contract_keys()).colors == classes.colors
    assert ClassSet.from_stats({"bands": {}}) is N3C  # builds made before class sets
    assert N3C.names == CLASS_NAMES and len(VAIHINGEN) == 7 and len(DFC2018) == 21


def test_class_set_checks():
    with pytest.raises(ValueError, match="label 0"):
        ClassSet("x", ("a", "b"), ((0, 0, 0, 0),) * 2, ("", ""))
    with pytest.raises(ValueError, match="differ in size"):
        ClassSet("x", ("unlabeled", "b"), ((0, 0, 0, 0),), ("", ""))
    with pytest.raises(ValueError, match="bad colour"):
        ClassSet.from_contract({"class_names": ["unlabeled"], "class_colors": [[0, 0, 300]]})


def test_class_weights_follow_the_build_class_set():
    counts = {"unlabeled": 5, "impervious_surfaces": 10, "building": 30, "car": 0}
    weights = class_weights(counts, VAIHINGEN.names)
    assert weights.shape == (7,) and weights[0] == 0
    assert weights[VAIHINGEN.names.index("car")] == pytest.approx(1 / 0.02)
    with pytest.raises(ValueError, match="unknown class names"):
        class_weights(counts)  # N3C's names


def test_isprs_2d_metrics_by_hand():
    scores = isprs_2d_metrics(CM, NAMES, excluded=("clutter",))
    assert scores["oa"] == pytest.approx(18 / 24)
    assert scores["f1/a"] == pytest.approx(16 / 19)
    assert scores["f1/b"] == pytest.approx(12 / 18)
    assert scores["f1/clutter"] == pytest.approx(8 / 11)
    assert scores["mf1"] == pytest.approx((16 / 19 + 12 / 18) / 2)  # clutter left out
    assert scores["miou"] == pytest.approx((8 / 11 + 6 / 12) / 2)


def test_dfc2018_metrics_by_hand():
    scores = dfc2018_metrics(CM, NAMES)
    assert scores["oa"] == pytest.approx(0.75)
    assert scores["aa"] == pytest.approx((0.8 + 0.6 + 1.0) / 3)
    chance = (10 * 9 + 10 * 8 + 4 * 7) / 24**2
    assert scores["kappa"] == pytest.approx((0.75 - chance) / (1 - chance))


def test_protocol_metrics_dispatch():
    assert protocol_metrics({"name": "dfc2018"}, CM, NAMES)["aa"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_metrics({"name": "potsdam"}, CM, NAMES)


def _points(n: int = 400) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.uniform(0, 16, n), "y": rng.uniform(-16, 0, n), "z": rng.uniform(0, 5, n),
        "intensity": rng.integers(0, 500, n).astype(np.uint16),
        "return_number": np.ones(n, np.uint8),
        "classification": np.full(n, 6, np.uint8),  # ASPRS building: N3C class 4
        "label": np.full(n, 5, np.uint8),  # the build's own class (Vaihingen car)
        "intensity_c2": rng.uniform(0, 1, n).astype(np.float32),
    }  # fmt: skip


def test_point_labels_come_from_the_label_dimension():
    cfg = PointConfig(num_points=256, levels=2, k=8)
    rng = np.random.default_rng(0)
    out = prepare_points(_points(), Affine(1, 0, 0, 0, -1, 0), 16, cfg, rng)
    assert set(np.unique(out["labels"])) == {5}
    no_dim = {k: v for k, v in _points().items() if k != "label"}
    out = prepare_points(no_dim, Affine(1, 0, 0, 0, -1, 0), 16, cfg, rng)
    assert set(np.unique(out["labels"])) == {4}  # remapped from ASPRS


def test_point_features_are_configurable():
    cfg = PointConfig(num_points=256, levels=2, k=8, features=["intensity", "intensity_c2"])
    assert cfg.features == ("intensity", "intensity_c2")
    out = prepare_points(_points(), Affine(1, 0, 0, 0, -1, 0), 16, cfg, np.random.default_rng(0))
    assert out["features"].shape == (256, 2)
    cfg = PointConfig(num_points=256, levels=2, k=8, features=("intensity_c3",))
    with pytest.raises(ValueError, match="intensity_c3"):
        prepare_points(_points(), Affine(1, 0, 0, 0, -1, 0), 16, cfg, np.random.default_rng(0))
