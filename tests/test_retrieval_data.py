"""Retrieval data side: tile statistics on real sample tiles, captions, relevance, metrics."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import retrieval.data as rdata
from retrieval.captions import CAPTION_WORDS, captions, facts, query_for, relevance
from retrieval.data import CLASSES, TileInfo, load_tiles, tile_rgb
from retrieval.evaluate import ndcg_at_k, recall_at_k


@pytest.fixture(scope="module")
def build(sample_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the sample build: load_tiles writes its stats cache into the folder."""
    return Path(shutil.copytree(sample_build, tmp_path_factory.mktemp("rdata") / "build"))


@pytest.fixture(scope="module")
def tiles(build: Path) -> list[TileInfo]:
    return load_tiles(build)


def tile(fractions: dict[str, float], **stats: float | None) -> TileInfo:
    return TileInfo("t", "test", (0, 0, 1, 1), "EPSG:32611", 2022, fractions, dict(stats))


def test_load_tiles_metadata_and_stats_of_the_sample(build: Path, tiles: list[TileInfo]):
    assert len(tiles) == 129 and [t.tile_id for t in tiles] == sorted(t.tile_id for t in tiles)
    assert {t.split for t in tiles} == {"train", "val", "test", "buffer"}
    assert [t.tile_id for t in load_tiles(build, "test")] == [
        t.tile_id for t in tiles if t.split == "test"
    ]
    for t in tiles:
        assert math.isclose(sum(t.class_fractions.values()), 1.0)
        w, s, e, n = t.bbox
        assert -180 <= w < e <= 180 and -90 <= s < n <= 90
        assert t.stats["relief_m"] >= 0 and 0 <= t.stats["slope_deg"] < 60
        assert t.stats["ndvi_mean"] is None or -1 <= t.stats["ndvi_mean"] <= 1
    forest = [t for t in tiles if t.class_fractions["tree"] > 0.5]
    assert forest, "the sample has forest tiles"
    # Canopy over the Sierra Nevada sample stands metres above the LiDAR ground surface.
    assert all(t.stats["tree_height_p95"] > 3 for t in forest)
    assert all(t.stats["tree_height_p50"] <= t.stats["tree_height_p95"] for t in forest)
    # The NEON scenes have no NIR band: NDVI is unknown there, not 0.
    assert any(t.stats["ndvi_mean"] is None for t in tiles)
    assert any(t.stats["ndvi_mean"] is not None for t in tiles)


def test_stats_are_cached_in_the_build(build: Path, tiles, monkeypatch):
    assert (build / rdata.STATS_FILE).is_file()

    def fail(folder: Path) -> dict:
        raise AssertionError("stats recomputed")

    monkeypatch.setattr(rdata, "tile_stats", fail)
    assert load_tiles(build) == tiles


def test_tile_rgb_is_stretched_and_keeps_nodata(build: Path, tiles):
    rgb = tile_rgb(build, tiles[0].tile_id)
    assert rgb.shape == (3, 64, 64) and rgb.dtype == torch.float32
    assert rgb.min() == 0 and rgb.max() == 1
    with pytest.raises(FileNotFoundError, match="nope"):
        tile_rgb(build, "nope")


def test_captions_are_varied_deterministic_and_truthful(tiles):
    forest = next(t for t in tiles if t.dominant == "tree" and not t.class_fractions["building"])
    texts = captions(forest, np.random.default_rng(7), n=12)
    assert texts == captions(forest, np.random.default_rng(7), n=12)
    assert len(set(texts)) >= 8
    assert all(any(w in c.lower() for w in CAPTION_WORDS["tree"]) for c in texts)
    assert not any(w in " ".join(texts) for w in CAPTION_WORDS["building"])
    query = query_for(forest, np.random.default_rng(0))
    assert query not in texts and query == query_for(forest, np.random.default_rng(0))
    assert facts(forest).heights.get("tree") in {"short", "mid", "tall"}


def test_relevance_grades():
    forest = tile({"tree": 0.8, "ground": 0.2}, tree_height_p95=25.0, slope_deg=2.0)
    assert relevance(forest, forest) == 3
    similar = tile({"tree": 0.7, "ground": 0.3}, tree_height_p95=24.0, slope_deg=1.0)
    assert relevance(forest, similar) == 3
    short = tile({"tree": 0.7, "ground": 0.3}, tree_height_p95=5.0, slope_deg=1.0)
    assert relevance(forest, short) == 2  # same mix, trees of another height class
    mixed = tile({"tree": 0.55, "ground": 0.05, "building": 0.4})
    assert relevance(forest, mixed) == 1  # same dominant class, different mix
    bare = tile({"ground": 1.0})
    assert relevance(forest, bare) == 0 and relevance(bare, forest) == 0
    assert relevance(forest, tile(dict.fromkeys(CLASSES, 0.0))) == 0


def test_recall_and_ndcg_match_hand_computed_values():
    ranked = [[3, 0, 1], [0, 2, 3], [1, 1, 0]]
    assert recall_at_k(ranked, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, 3) == pytest.approx(2 / 3)
    # DCG = (2^0-1)/1 + (2^2-1)/log2(3) + (2^3-1)/2; ideal = 7/1 + 3/log2(3) + 0.
    dcg = 3 / math.log2(3) + 7 / 2
    assert ndcg_at_k([0, 2, 3], [0, 2, 3, 0], 5) == pytest.approx(dcg / (7 + 3 / math.log2(3)))
    assert ndcg_at_k([3, 2, 0], [0, 2, 3], 5) == pytest.approx(1.0)
    assert ndcg_at_k([0, 0], [0, 0], 5) == 0.0
