"""Tile index and search on the real sample build with a small random-init embedder.

Covers the round trip (stored vectors = the model's embeddings), metadata filters on the exact
and the IVF path, resume after a crash, refusal of another model's index, GeoJSON/PNG outputs,
the evaluation table, document-phrase re-scoring and the CLI's one-line errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import retrieval.index as rindex
from geoseg.cli import main
from retrieval.data import load_tiles, tile_rgb
from retrieval.embedder import TileEmbedder, create_embedder, load_embedder
from retrieval.evaluate import evaluate_retrieval
from retrieval.index import (
    Filters,
    SearchIndexError,
    TileIndex,
    build_index,
    make_faiss,
    tile_document,
)
from retrieval.negation import embed_search_queries
from retrieval.rescore import RESCORE_TOP, rescore_order
from retrieval.search import Query, search, write_geojson, write_thumbnails

TINY = {
    "backbone": {
        "kind": "default",
        "vision": "vit",
        "image_size": 64,
        "vision_width": 32,
        "vision_layers": 1,
        "vision_heads": 2,
        "lm_layers": 1,
    }
}
SHARD = 50  # 129 sample tiles -> 3 shards, so resuming has something to skip


def save_embedder(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    create_embedder(TINY).save(folder)
    return folder


@pytest.fixture(scope="module")
def build(sample_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the sample build: load_tiles writes its stats cache into the folder."""
    return Path(shutil.copytree(sample_build, tmp_path_factory.mktemp("ridx") / "build"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_embedder(tmp_path_factory.mktemp("emb") / "embedder", seed=0)


@pytest.fixture(scope="module")
def embedder(model: Path) -> TileEmbedder:
    return load_embedder(model)


@pytest.fixture(scope="module")
def index(build: Path, model: Path, embedder: TileEmbedder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idx") / "flat"
    return build_index(
        build, embedder, out, model=str(model), batch_size=16, shard_size=SHARD, progress=False
    )


class Counting:
    """Wraps an embedder, counts embedded tiles and can fail after some batches (a crash)."""

    def __init__(self, inner: TileEmbedder, fail_after: int | None = None):
        self.inner, self.fail_after, self.tiles, self.batches = inner, fail_after, 0, 0
        self.dim, self.fingerprint = inner.dim, inner.fingerprint

    def embed_tiles(self, images: torch.Tensor, texts: list[str] | None = None) -> torch.Tensor:
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise RuntimeError("killed")
        self.batches += 1
        self.tiles += len(images)
        return self.inner.embed_tiles(images, texts)


def test_round_trip_vectors_and_metadata(index: Path, build: Path, embedder: TileEmbedder):
    idx = TileIndex.open(index)
    tiles = load_tiles(build)
    assert idx.meta["kind"] == "flat" and idx.meta["count"] == len(tiles) == idx.faiss.ntotal
    meta = gpd.read_parquet(index / rindex.METADATA_FILE)
    assert meta.crs.to_epsg() == 4326
    assert list(meta["tile_id"]) == [t.tile_id for t in tiles]
    some = tiles[7]
    with torch.inference_mode():
        expected = embedder.embed_tiles(tile_rgb(build, some.tile_id)[None])[0].numpy()
    np.testing.assert_allclose(idx.vector(some.tile_id), expected, atol=1e-5)
    (row, score), *_ = idx.search(expected[None], 3)[0]
    assert idx.tiles["tile_id"][row] == some.tile_id and score == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(SearchIndexError, match="unknown tile id 'nope'"):
        idx.vector("nope")


def brute_force(idx: TileIndex, query: np.ndarray, mask: np.ndarray, k: int) -> list[int]:
    vectors = idx.vectors
    scores = np.where(mask, vectors @ query, -np.inf)
    return [int(i) for i in np.argsort(-scores, kind="stable")[: min(k, int(mask.sum()))]]


def test_filters_on_the_exact_and_the_ivf_path(index: Path, build, embedder, tmp_path, monkeypatch):
    # Same shards, IVF structure: a rerun only rebuilds the faiss index (nothing re-embedded).
    ivf_dir = Path(shutil.copytree(index, tmp_path / "ivf"))
    counting = Counting(embedder)
    build_index(build, counting, ivf_dir, model="m", shard_size=SHARD, kind="ivf", progress=False)
    assert counting.tiles == 0
    monkeypatch.setattr(rindex, "EXACT_SUBSET_MAX", 0)  # force the IVF + IDSelector path
    flat, ivf = TileIndex.open(index), TileIndex.open(ivf_dir)
    assert ivf.meta["kind"] == "ivf"
    t = flat.tiles
    west = t["west"].quantile(0.3)
    bbox = (west, t["south"].min(), t["east"].max(), t["north"].max())
    query = flat.vector(t["tile_id"][0])
    cases = [Filters(bbox=bbox), Filters(split="val"), Filters(bbox=bbox, split="train")]
    for filters in cases:
        mask = filters.mask(t)
        assert 0 < mask.sum() < len(t)
        expected = brute_force(flat, query, mask, 10)
        for idx in (flat, ivf):
            rows = [r for r, _ in idx.search(query[None], 10, filters)[0]]
            assert len(rows) == len(expected)
            assert mask[rows].all()
            if idx is flat:
                assert rows == expected
        assert (t["east"][mask] >= west).all() if filters.bbox else True
    assert flat.search(query[None], 5, Filters(year=1900)) == [[]]


def test_ivf_probes_trade_recall_and_every_list_is_exact():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    tiles = pd.DataFrame({"tile_id": [f"t{i}" for i in range(len(vectors))]})
    flat = TileIndex({"kind": "flat"}, tiles, make_faiss(vectors, "flat"), vectors, Path("."))
    ivf = TileIndex({"kind": "ivf"}, tiles, make_faiss(vectors, "ivf"), vectors, Path("."))
    lists = faiss.extract_index_ivf(ivf.faiss).nlist
    assert flat.probes is None and ivf.probes == min(rindex.IVF_NPROBE, lists) < lists
    queries = vectors[:20] + 0.1 * rng.standard_normal((20, 32)).astype(np.float32)
    exact = [[r for r, _ in hits] for hits in flat.search(queries, 10)]

    def recall(idx: TileIndex) -> float:
        found = [[r for r, _ in hits] for hits in idx.search(queries, 10)]
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact, strict=True)])

    ivf.probes = 1
    low = recall(ivf)
    ivf.probes = 10**6  # clamped to the list count: every list probed = exact
    assert ivf.probes == lists
    assert low < recall(ivf) == 1.0
    flat.probes = 3  # an exact index has nothing to probe: ignored
    assert recall(flat) == 1.0
    with pytest.raises(SearchIndexError, match="probes must be >= 1"):
        ivf.probes = 0


def test_resume_after_a_crash_embeds_only_the_rest(build, model, embedder, tmp_path, index):
    out = tmp_path / "idx"
    crashing = Counting(embedder, fail_after=4)  # 16-tile batches: dies inside shard 2 of 3
    with pytest.raises(RuntimeError, match="killed"):
        build_index(
            build, crashing, out, model=str(model), batch_size=16, shard_size=SHARD, progress=False
        )
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.npz"]
    with pytest.raises(SearchIndexError, match="incomplete"):
        TileIndex.open(out)
    rest = Counting(embedder)
    build_index(build, rest, out, model=str(model), batch_size=16, shard_size=SHARD, progress=False)
    assert rest.tiles == 129 - SHARD
    np.testing.assert_allclose(
        TileIndex.open(out).faiss.reconstruct_n(0, 129),
        TileIndex.open(index).vectors,
        atol=1e-5,
    )


def test_another_model_is_refused(index: Path, build, tmp_path):
    other_dir = save_embedder(tmp_path / "other", seed=1)
    other = load_embedder(other_dir)
    with pytest.raises(SearchIndexError, match="another model"):
        build_index(build, other, index, model=str(other_dir), shard_size=SHARD, progress=False)
    with pytest.raises(SearchIndexError, match="built with another model"):
        search(TileIndex.open(index), Query(text="trees"), model=other_dir)
    res = CliRunner().invoke(
        main,
        [
            "search",
            "trees",
            "--index",
            str(index),
            "--model",
            str(other_dir),
            "--out",
            str(tmp_path / "h.geojson"),
        ],
    )
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "another model" in res.stderr


def test_text_search_writes_geojson_and_thumbnails(index: Path, build: Path, tmp_path: Path):
    idx = TileIndex.open(index)
    hits = search(idx, Query(text="tall trees on flat terrain", filters=Filters(split="val")), 7)
    assert [h.rank for h in hits] == list(range(1, 8))
    assert all(h.properties["split"] == "val" for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    write_geojson(hits, tmp_path / "hits.geojson", {"text": "tall trees"})
    write_thumbnails(hits, build, tmp_path / "hits.png", "tall trees")
    fc = json.loads((tmp_path / "hits.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 7
    first = fc["features"][0]
    assert first["geometry"]["type"] == "Polygon"
    lon, lat = np.array(first["geometry"]["coordinates"][0]).T
    props = first["properties"]
    assert lon.min() == pytest.approx(props["west"]) and lat.max() == pytest.approx(props["north"])
    assert first["properties"]["rank"] == 1 and first["properties"]["tile_id"] == hits[0].tile_id
    assert (tmp_path / "hits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_search_like_and_image_and_errors(index: Path, build: Path, tmp_path: Path):
    runner = CliRunner()
    tid = TileIndex.open(index).tiles["tile_id"][3]
    out = tmp_path / "like.geojson"
    args = ["search", "--like", tid, "--index", str(index), "--k", "4", "--probes", "8"]
    res = runner.invoke(main, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    ids = [f["id"] for f in json.loads(out.read_text())["features"]]
    assert len(ids) == 4 and tid not in ids and out.with_suffix(".png").is_file()
    bare = tmp_path / "bare.geojson"  # the QGIS dock's search: it draws its own thumbnails
    res = runner.invoke(main, [*args, "--out", str(bare), "--no-thumbnails"])
    assert res.exit_code == 0 and bare.is_file() and not bare.with_suffix(".png").exists()
    image = build / "tiles" / tid / "image.tif"
    res = runner.invoke(
        main,
        [
            "search",
            "--image",
            str(image),
            "--index",
            str(index),
            "--k",
            "1",
            "--out",
            str(tmp_path / "img.geojson"),
        ],
    )
    assert res.exit_code == 0 and tid in res.output  # a tile's own image finds the tile
    bad = {
        "empty query": ["search", "  ", "--index", str(index)],
        "unknown tile id": ["search", "--like", "nope", "--index", str(index)],
        "exactly one": ["search", "trees", "--like", tid, "--index", str(index)],
        "needs a text query": [
            "search",
            "--like",
            tid,
            "--rerank",
            "--reranker",
            str(tmp_path),
            "--index",
            str(index),
        ],
        "not a tile index": ["search", "trees", "--index", str(tmp_path)],
        "unknown device 'gpu0'": ["search", "trees", "--index", str(index), "--device", "gpu0"],
    }
    for message, args in bad.items():
        res = runner.invoke(main, [*args, "--out", str(tmp_path / "x.geojson")])
        assert res.exit_code == 2, (message, res.output)
        assert message in res.stderr and res.stderr.count("\n") == 1


def test_evaluate_retrieval_table(build: Path, model: Path, tmp_path: Path):
    """Chance rows for both pools, one row per pool for the model, tile → tile rows."""
    rows = evaluate_retrieval(build, [model], tmp_path / "eval")
    chance = [r for r in rows if r["model"].startswith("random")]
    mine = [r for r in rows if r["model"] == str(model)]
    assert len(mine) == 2  # no re-scored rows: an image-only model has no documents
    assert [r["pool"] for r in chance] == [r["pool"] for r in mine] == ["index", "unseen"]
    tiles = load_tiles(build)
    assert mine[0]["tiles"] == len(tiles)
    assert mine[1]["tiles"] == sum(t.split != "train" for t in tiles)
    for r in mine:
        s = r["summary"]["p@10"]
        assert 0 <= s["mean"] <= 1 and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
        assert 0 < s["chance"] < s["ceiling"] <= 1
        assert s["chance"] == pytest.approx(chance[mine.index(r)]["summary"]["p@10"]["mean"])
        assert r["answerable"] + len(r["unanswerable"]) == 30  # eval.yaml
        like = r["like"]
        assert set(like["by_class"]) == {
            t.dominant for t in tiles if r["pool"] == "index" or t.split != "train"
        }
        assert 0 < like["chance"] < 1
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "random ranking (chance)" in table and "same class in top 10" in table
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["queries"] == 30 and metrics["queries_file"].endswith("eval.yaml")


def test_rerank_reorders_only_the_top_5(index: Path, model: Path, embedder, build, tmp_path):
    """A run folder (embedder/ + reranker/) as train-retrieval writes it: CLI and evaluation."""
    from retrieval.rerank import Reranker

    run = model.parent
    Reranker(embedder.backbone).save(run / "reranker")
    try:
        out = tmp_path / "hits.geojson"
        args = ["search", "tall trees", "--index", str(index), "--k", "8", "--out", str(out)]
        assert CliRunner().invoke(main, args).exit_code == 0
        plain = json.loads(out.read_text())["features"]
        assert CliRunner().invoke(main, [*args, "--rerank"]).exit_code == 0
        reranked = json.loads(out.read_text())["features"]
        assert {f["id"] for f in reranked[:5]} == {f["id"] for f in plain[:5]}
        assert [f["id"] for f in reranked[5:]] == [f["id"] for f in plain[5:]]
        head = [f["properties"]["rerank_score"] for f in reranked[:5]]
        assert (
            head == sorted(head, reverse=True) and reranked[5]["properties"]["rerank_score"] is None
        )
        rows = [
            r for r in evaluate_retrieval(build, [run], tmp_path / "eval") if r["model"] == str(run)
        ]
        assert [(r["pool"], r["reranker"]) for r in rows] == [
            ("index", False), ("index", True), ("unseen", False), ("unseen", True)
        ]  # fmt: skip
        for plain_row, reranked_row in (rows[:2], rows[2:]):  # reranking the top 5 keeps the top 10
            assert plain_row["summary"]["p@10"] == reranked_row["summary"]["p@10"]
    finally:
        shutil.rmtree(run / "reranker")


def test_cli_index_run_folder_and_bad_input(build: Path, model: Path, index: Path, tmp_path):
    runner = CliRunner()
    out = tmp_path / "idx"
    args = ["index", "--data", str(build), "--out", str(out), "--no-progress"]
    res = runner.invoke(main, [*args, "--model", str(model.parent)])  # a run folder
    assert res.exit_code == 0, res.output
    assert TileIndex.open(out).meta["model"] == str(model.resolve())
    res = runner.invoke(main, [*args, "--model", str(model.parent)])
    assert res.exit_code == 0 and "resuming: 1 of 1 shards" in res.stderr
    for bad in (
        [*args, "--model", str(tmp_path / "missing")],
        ["index", "--data", str(tmp_path), "--model", str(model), "--out", str(tmp_path / "x")],
        ["index", "--data", str(build), "--model", str(model), "--out", str(index)],  # other shards
    ):
        res = runner.invoke(main, bad)
        assert res.exit_code == 2, res.output
        assert res.stderr.startswith("geoseg: error: ") and res.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def documents_index(build: Path, tmp_path_factory) -> tuple[Path, TileEmbedder]:
    """An index of an embedder that fuses tile documents (`document_weight` 0.5, the default
    training config's): the kind document-phrase re-scoring applies to."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("docemb") / "embedder"
    create_embedder(TINY | {"document_weight": 0.5}).save(folder)
    embedder = load_embedder(folder)
    out = tmp_path_factory.mktemp("docidx") / "flat"
    build_index(build, embedder, out, model=str(folder), batch_size=32, progress=False)
    return out, embedder


def test_metadata_gives_back_every_tile_document(index: Path, build: Path):
    """Search re-scores from the index alone: its metadata rows rebuild each tile's document."""
    idx = TileIndex.open(index)
    for row, tile in enumerate(load_tiles(build)):
        assert tile_document(tile) is not None  # every sample tile is labelled
        assert tile_document(idx.tile_info(row)) == tile_document(tile), tile.tile_id


def test_rescoring_lifts_the_tile_whose_phrase_matches_and_is_neutral_without_documents(build):
    """`rescore_order` on real documents with hand-made phrase vectors: the query matches one
    phrase only one candidate's document has; a tile without a document scores 0."""
    tiles = load_tiles(build)
    forest = next(t for t in tiles if t.class_fractions["tree"] >= 0.5)
    bare = next(t for t in tiles if t.class_fractions["ground"] == 1.0)
    b_doc, f_doc = tile_document(bare), tile_document(forest)
    only_forest = sorted({p for _, ps in f_doc for p in ps} - {p for _, ps in b_doc for p in ps})
    assert only_forest

    looked_up: list[list[str]] = []

    class Phrases:
        def phrase_vectors(self, phrases):
            looked_up.append(list(phrases))
            return torch.tensor(
                [[1.0, 0.0] if p == only_forest[0] else [0.0, 1.0] for p in phrases]
            )

    query = np.array([1.0, 0.0])
    scores = np.array([0.81, 0.80, 0.79])  # faiss: bare, forest, an unlabelled tile
    order = rescore_order(Phrases(), query, scores, [b_doc, f_doc, None])
    assert order.tolist() == [1, 0, 2]
    assert len(looked_up[-1]) == len(set(looked_up[-1]))  # each phrase looked up once
    # no phrase tells the candidates apart: the faiss order stands
    assert rescore_order(Phrases(), query, scores, [b_doc, b_doc, None]).tolist() == [0, 1, 2]


def test_search_and_evaluation_rescore_the_top_candidates(documents_index, build, tmp_path):
    path, embedder = documents_index
    idx = TileIndex.open(path)
    text, k, top = "tall trees on a hillside", 5, 40

    def ids(hits):
        return [h.tile_id for h in hits]

    plain = search(idx, Query(text=text), top, rescore=0, amounts=False)
    assert [h.score for h in plain] == sorted((h.score for h in plain), reverse=True)
    rescored = search(idx, Query(text=text), k, rescore=top, amounts=False)
    with torch.inference_mode():
        vector = embed_search_queries(embedder, [text])[0].numpy()
    documents = [tile_document(idx.tile_info(idx.row(h.tile_id))) for h in plain]
    order = rescore_order(embedder, vector, np.array([h.score for h in plain]), documents)
    assert ids(rescored) == [ids(plain)[i] for i in order[:k]] != ids(plain)[:k]
    assert [h.rank for h in rescored] == list(range(1, k + 1))
    # filters first, then re-scoring among the tiles they keep
    val = search(idx, Query(text=text, filters=Filters(split="val")), k, rescore=top, amounts=False)
    assert val and all(h.properties["split"] == "val" for h in val)
    # the CLI: --rescore 0 is faiss's order; tile queries are never re-scored
    out = tmp_path / "hits.geojson"
    args = ["search", text, "--index", str(path), "--k", str(k), "--out", str(out), "--no-amounts"]
    assert (
        CliRunner().invoke(main, [*args, "--rescore", str(top), "--no-thumbnails"]).exit_code == 0
    )
    assert [f["id"] for f in json.loads(out.read_text())["features"]] == ids(rescored)
    assert CliRunner().invoke(main, [*args, "--rescore", "0", "--no-thumbnails"]).exit_code == 0
    assert [f["id"] for f in json.loads(out.read_text())["features"]] == ids(plain)[:k]
    like = Query(like=plain[0].tile_id)
    assert ids(search(idx, like, k, rescore=top)) == ids(search(idx, like, k, rescore=0))
    # evaluation: a re-scored row beside each pool's plain row
    model = idx.meta["model"]
    rows = [r for r in evaluate_retrieval(build, [model], tmp_path / "e") if r["model"] == model]
    assert [(r["pool"], r["rescored"], r["amounts"]) for r in rows] == [
        ("index", False, False), ("index", True, False), ("index", True, True),
        ("unseen", False, False), ("unseen", True, False), ("unseen", True, True),
    ]  # fmt: skip
    assert f"phrase re-scoring top-{RESCORE_TOP}" in (tmp_path / "e" / "table.md").read_text()


@pytest.fixture(scope="module")
def amounts_index(build: Path, tmp_path_factory) -> tuple[Path, TileEmbedder]:
    """An image-only embedder with a composition head fitted on the training tiles' labels
    (as train-retrieval fits it), and its index."""
    from retrieval.amounts import fit_composition

    folder = save_embedder(tmp_path_factory.mktemp("amemb") / "embedder", seed=2)
    embedder = load_embedder(folder)
    train = load_tiles(build, "train")
    with torch.inference_mode():
        images = torch.stack([tile_rgb(build, t.tile_id) for t in train])
        vectors = embedder.embed_tiles(images).numpy()
    shares = [[t.class_fractions[c] for c in t.classes] for t in train]
    fit_composition(vectors, np.array(shares), train[0].classes).save(folder)
    embedder = load_embedder(folder)
    out = tmp_path_factory.mktemp("amidx") / "flat"
    build_index(build, embedder, out, model=str(folder), batch_size=64, progress=False)
    return out, embedder


def test_amounts_of_an_image_only_index_come_from_its_images(amounts_index, build, tmp_path):
    """The index stores the head's predictions from each image (not the label fractions); an
    image-only index checks a query's amounts on them (± TOLERANCE): the tiles that meet them
    first, in faiss's order, by default; evaluation reports it as its own row."""
    from retrieval.amounts import amount_tiers, parse_amounts, reference_shares

    path, embedder = amounts_index
    idx = TileIndex.open(path)
    tiles = load_tiles(build)
    with torch.inference_mode():
        images = torch.stack([tile_rgb(build, t.tile_id) for t in tiles[:5]])
        expected = embedder.composition.predict(embedder.embed_tiles(images).numpy())
    predicted = idx.predicted_shares()
    assert list(predicted) == list(embedder.composition.classes)
    got = np.stack([predicted[c][:5] for c in embedder.composition.classes], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not np.allclose(predicted["tree"], idx.tiles["frac_tree"])
    text, k = "no trees at all", 30
    shares, tolerance = reference_shares({}, predicted)
    tiers = amount_tiers(shares, parse_amounts(text), tolerance)
    assert 0 < (tiers == 0).sum() < len(tiers)
    plain = search(idx, Query(text=text), len(tiles), amounts=False)
    hits = search(idx, Query(text=text), k)  # amounts are on by default
    first = [h.tile_id for h in plain if tiers[idx.row(h.tile_id)] == 0]
    rest = [h.tile_id for h in plain if tiers[idx.row(h.tile_id)] != 0]
    assert [h.tile_id for h in hits] == (first + rest)[:k]
    assert [h.tile_id for h in search(idx, Query(text="glade"), k)] == [
        h.tile_id for h in search(idx, Query(text="glade"), k, amounts=False)
    ]  # no amount, measure or kind in the query: ranked as before
    out = tmp_path / "hits.geojson"
    args = ["search", text, "--index", str(path), "--k", str(k), "--out", str(out)]
    assert CliRunner().invoke(main, [*args, "--no-thumbnails"]).exit_code == 0
    assert [f["id"] for f in json.loads(out.read_text())["features"]] == [h.tile_id for h in hits]
    rows = evaluate_retrieval(build, [idx.meta["model"]], tmp_path / "e")
    mine = [(r["pool"], r["amounts"]) for r in rows if r["model"] == idx.meta["model"]]
    assert mine == [("index", False), ("index", True), ("unseen", False), ("unseen", True)]
    assert "+ amounts" in (tmp_path / "e" / "table.md").read_text()


def test_amounts_of_a_labelled_index_come_from_its_label_facts(documents_index, build):
    """An index that fuses documents already reads the archive's labels: its amounts are
    checked on them exactly (class shares, bare or green ground, tree height, slope), and the
    tiles known to meet a query come first, then those with an unknown fact, then the rest."""
    path, _ = documents_index
    idx = TileIndex.open(path)
    tiles = {t.tile_id: t for t in load_tiles(build)}
    n = len(tiles)
    no_trees = search(idx, Query(text="no trees at all"), n)
    shares = [tiles[h.tile_id].class_fractions["tree"] for h in no_trees]
    first = sum(s < 0.02 for s in shares)
    assert 0 < first < n and all(s < 0.02 for s in shares[:first])
    tall = search(idx, Query(text="trees over 30 m high"), n)
    heights = [tiles[h.tile_id].stats.get("tree_height_p95") for h in tall]
    known = [
        h is not None and h >= 30 and tiles[t.tile_id].class_fractions["tree"] > 0
        for h, t in zip(heights, tall, strict=True)
    ]
    assert any(known) and known == sorted(known, reverse=True)
    # bare soil: tiles whose NDVI says barren first, then tiles without NIR, then green ones
    bare = search(idx, Query(text="bare soil"), n)
    ndvi = [tiles[h.tile_id].stats.get("ndvi_mean") for h in bare]
    tier = [2 if v is not None and v > 0.1 else 1 if v is None else 0 for v in ndvi]
    assert tier == sorted(tier) and tier[0] == 0
