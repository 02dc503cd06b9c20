"""Retrieval data side: tile statistics on real sample tiles, captions, relevance, metrics."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import retrieval.data as rdata
from retrieval.captions import (
    DOCUMENT_WEIGHTS,
    N3C,
    captions,
    document,
    facts,
    kind_shares,
    relevance,
)
from retrieval.data import CLASSES, TileInfo, load_tiles, tile_rgb


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
    assert len(set(texts)) >= 10
    tree_words = N3C.kinds["tree"] + N3C.large["tree"]
    assert all(any(w in c.lower() for w in tree_words) for c in texts)
    assert not any(w in " ".join(texts) for w in N3C.kinds["building"])
    assert facts(forest).heights.get("tree") in {"short", "mid", "tall"}
    # the NEON forest scenes have no NIR: their ground is never called green or bare
    assert not any(w in " ".join(texts) for w in N3C.kinds["ground_green"] + ("bare soil",))


def test_ground_is_a_field_or_bare_soil_by_ndvi():
    rng = np.random.default_rng(0)
    green = " ".join(captions(tile({"ground": 1.0}, ndvi_mean=0.3), rng, n=20))
    bare = " ".join(captions(tile({"ground": 1.0}, ndvi_mean=-0.1), rng, n=20))
    assert any(w in green for w in N3C.kinds["ground_green"])
    assert not any(w in green for w in N3C.kinds["ground_bare"])
    assert any(w in bare for w in N3C.kinds["ground_bare"])


def test_water_bridges_and_roads_are_named_from_their_asprs_codes():
    """N3C folds water (9) and bridge decks (17) into `others` with low vegetation (3); the
    tile's raw ASPRS codes split them again, so a river is not captioned as scrub."""
    river = tile({"others": 0.6, "ground": 0.4}, others_water=0.9, others_bridge=0.1)
    shares = kind_shares(river)
    assert shares["water"] == pytest.approx(0.54) and shares["bridge"] == pytest.approx(0.06)
    assert shares["low_vegetation"] == pytest.approx(0.0)
    assert "bridge_over_water" in facts(river).layout
    texts = " ".join(captions(river, np.random.default_rng(1), n=20)).lower()
    assert any(w in texts for w in N3C.kinds["water"]) and "bridge" in texts
    assert not any(w in texts for w in N3C.kinds["low_vegetation"][:3])
    road = tile({"ground": 1.0}, road_points=0.2)
    assert any(
        w in " ".join(captions(road, np.random.default_rng(2), n=10)) for w in N3C.kinds["road"]
    )


def test_layout_and_colour_facts_reach_the_captions():
    hedge = tile({"ground": 0.85, "tree": 0.15}, tree_elongation=4.0, tree_patches=1.0)
    assert "tree_line" in facts(hedge).layout
    texts = " ".join(captions(hedge, np.random.default_rng(0), n=20))
    assert any(p in texts for p in N3C.layout["tree_line"])
    hamlet = tile({"tree": 0.5, "ground": 0.3, "building": 0.2}, building_tree_contact=0.5)
    assert "buildings_in_trees" in facts(hamlet).layout
    green = tile(
        {"ground": 1.0}, brightness=0.25, red_share=0.30, green_share=0.37, blue_share=0.33
    )
    assert facts(green).colour == ("green", "dark")


def test_tile_documents_write_out_every_wording_and_steer_the_tile_vector(build, tiles):
    """A tile document is deterministic, led by its dominant kind with every synonym. Its vector
    ranks a forest tile above a field tile for a forest query that no phrase of the grammar
    spells ("a pine grove"); fused into the index vector (`document_weight` w), a tile is
    normalise((1 - w) image + w document). A tile without labels has no document: it keeps its
    image vector."""
    from retrieval.embedder import create_embedder
    from retrieval.index import embed_tile_batch

    forest = next(t for t in tiles if t.dominant == "tree" and t.class_fractions["tree"] > 0.6)
    field = next(t for t in tiles if t.dominant == "ground" and t.class_fractions["tree"] < 0.01)
    doc = document(forest)
    assert doc == document(forest) and doc[0][0] == DOCUMENT_WEIGHTS["dominant"]
    assert {"trees", "forest"} <= set(doc[0][1])
    assert not any("grove" in p for _, phrases in doc for p in phrases)
    torch.manual_seed(0)
    fused = create_embedder({"backbone": {"kind": "default"}, "document_weight": 0.6}).eval()
    pair = [forest, field]
    plain = fused.embed_tiles(torch.stack([tile_rgb(build, t.tile_id) for t in pair])).numpy()
    docs = np.stack([fused.embed_document(document(t)).numpy() for t in pair])
    query = fused.embed_queries(["a pine grove"]).numpy()[0]
    assert docs[0] @ query > docs[1] @ query
    expected = 0.4 * plain + 0.6 * docs
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    vectors, shares = embed_tile_batch(fused, build, pair)
    assert np.allclose(vectors, expected, atol=1e-5) and shares is None  # no composition head
    unlabelled = dataclasses.replace(forest, class_fractions={})
    assert np.allclose(embed_tile_batch(fused, build, [unlabelled])[0], plain[:1], atol=1e-5)
    with pytest.raises(ValueError, match="document_weight"):
        create_embedder({"backbone": {"kind": "default"}, "document_weight": 1.0})


def test_layout_stats_of_a_label_mask():
    label = np.full((32, 32), 2, np.uint8)
    label[10:12, 2:30] = 3  # a 2 px wide row of trees
    label[20:24, 20:24] = 4
    label[24:26, 20:24] = 3  # trees touching the building
    out = rdata._layout(label)
    assert out["tree_elongation"] > 5 and out["tree_patches"] == 2
    assert 0 < out["building_tree_contact"] < 1


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
