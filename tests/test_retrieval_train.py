"""`train_retrieval` end to end on the real sample build: all stages, outputs, held-out split,
per-stage resume. One step per stage with a micro model keeps it to seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from retrieval.data import load_tiles
from retrieval.embedder import load_embedder
from retrieval.rerank import load_reranker
from retrieval.train import train_retrieval

REPO = Path(__file__).parents[1]

MICRO = {
    "model": {
        "backbone": {
            "kind": "default",
            "vision": "vit",
            "pooling": "last",
            "freeze_lm": False,
            "freeze_vision": False,
            "image_size": 32,
            "patch_size": 8,
            "vision_width": 32,
            "vision_layers": 1,
            "vision_heads": 2,
            "lm_layers": 1,
        },
        "max_text_tokens": 24,
    },
    "generative": {"batch_size": 4},
    "contrastive": {"batch_size": 4},
    "judge": {"batch_size": 2, "top_k": 6, "hard_negatives": 3},
    "reranker": {"batch_size": 2, "list_negatives": [2, 3]},
    "train": {"device": "cpu", "log_every": 1},
}


def stage_events(out: Path) -> list[tuple[str, str]]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [
        (r["stage"], "skipped" if "skipped" in r else "done")
        for r in records
        if "step" not in r and ("done" in r or "skipped" in r)
    ]


def test_train_retrieval_all_stages_resume_and_held_out(sample_build: Path, tmp_path: Path):
    out = train_retrieval(MICRO, sample_build, tmp_path / "run", max_steps=1)
    assert stage_events(out) == [
        (s, "done") for s in ("generative", "contrastive", "judge", "reranker")
    ]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["judge"]["steps"] == 1 and saved["model"]["backbone"]["lm_layers"] == 1

    embedder = load_embedder(out / "embedder")
    stage3 = load_embedder(out / "stages" / "judge" / "embedder")
    assert embedder.fingerprint == stage3.fingerprint and embedder.visual_tokens() == 4
    assert embedder.embed_queries(["tall trees"]).shape == (1, 384)
    # the image -> class-share head (retrieval.amounts), fitted on the training tiles
    assert embedder.composition is not None
    assert embedder.composition.classes == load_tiles(sample_build)[0].classes
    reranker = load_reranker(out / "reranker")
    assert reranker.score("tall trees", torch.rand(3, 3, 64, 64)).shape == (3,)

    train_ids = {t.tile_id for t in load_tiles(sample_build, "train")}
    held_out = {t.tile_id for t in load_tiles(sample_build)} - train_ids
    mined = json.loads((out / "stages" / "contrastive" / "mined.json").read_text())
    judged = json.loads((out / "stages" / "judge" / "judged.json").read_text())
    assert set(mined) == train_ids == set(judged) and held_out
    assert all(q not in negs and set(negs) <= train_ids for q, negs in mined.items())
    for q, entry in judged.items():
        found = entry["positives"] + entry["negatives"]
        assert len(set(found)) == 6 and q not in found and set(found) <= train_ids

    # a rerun skips finished stages; a removed stage is redone
    shutil.rmtree(out / "stages" / "reranker")
    (out / "log.jsonl").unlink()
    train_retrieval(MICRO, sample_build, out, max_steps=1)
    assert stage_events(out) == [
        ("generative", "skipped"),
        ("contrastive", "skipped"),
        ("judge", "skipped"),
        ("reranker", "done"),
    ]
    assert load_embedder(out / "embedder").composition is not None  # refitted on a rerun
    with pytest.raises(ValueError, match="another config"):
        train_retrieval(MICRO, sample_build, out, max_steps=2)
    with pytest.raises(ValueError, match="unknown stages"):
        train_retrieval(MICRO, sample_build, out, stages=("pretrain",))


def test_shipped_retrieval_configs_resolve():
    from retrieval.train import resolve_config

    tiny = resolve_config(REPO / "configs" / "retrieval-tiny.yaml", None)
    full = resolve_config(REPO / "configs" / "retrieval.yaml", None)
    assert tiny["model"]["backbone"]["kind"] == "default"
    assert full["model"]["backbone"]["kind"] == "internvl" and full["contrastive"]["lora"]
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_config({"judge": {"topk": 20}}, None)


def test_bad_data_fails_before_writing_the_run(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="build-dataset"):
        train_retrieval(MICRO, tmp_path / "missing", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_frozen_towers_train_only_the_connector_from_cached_features(sample_build, tmp_path):
    """The default recipe: frozen vision and text towers, features and caption vectors
    computed once and reused, faiss mining; only the connector (and LM head) change."""
    config = {
        **MICRO,
        "model": {
            "backbone": {**MICRO["model"]["backbone"], "freeze_lm": True, "freeze_vision": True},
            "max_text_tokens": 24,
        },
        "generative": {"steps": 0},
        "reranker": {"steps": 0},
        "train": {"device": "cpu", "log_every": 1, "augment": 2, "caption_bank": 3},
    }
    out = train_retrieval(config, sample_build, tmp_path / "run", max_steps=2)
    assert stage_events(out) == [
        ("generative", "skipped"),
        ("contrastive", "done"),
        ("judge", "done"),
        ("reranker", "skipped"),
    ]
    assert not (out / "reranker").exists()
    torch.manual_seed(0)
    from retrieval.embedder import create_embedder

    start = create_embedder(config["model"]).state_dict()
    trained = load_embedder(out / "embedder", device="cpu").state_dict()
    changed = {k.split(".")[1] for k in trained if not torch.equal(trained[k], start[k])}
    assert changed == {"connector"}


def test_lora_on_a_frozen_text_tower_trains_the_query_side():
    """A frozen MiniLM caches caption vectors (they never change); LoRA adapters on it
    (`contrastive.lora`) make them learn, so captions are embedded afresh with gradients."""
    from retrieval.embedder import create_embedder
    from retrieval.train import DEFAULTS, _text_learns, apply_lora

    frozen = {**MICRO["model"]["backbone"], "freeze_lm": True, "freeze_vision": True}
    embedder = create_embedder({**MICRO["model"], "backbone": frozen})
    assert not _text_learns(embedder)
    merge = apply_lora(embedder, DEFAULTS["lora"])
    assert _text_learns(embedder)
    assert embedder.embed_queries(["a few trees"]).requires_grad
    merge()
    assert not _text_learns(embedder)
