"""OpenCLIP models (`open_clip:ARCH:PRETRAINED`): checkpoint layouts of RemoteCLIP, GeoRSCLIP and
SkyCLIP, zero-shot index + search through the CLI, the evaluation baseline row, and the
distillation teacher. Real open_clip architectures with random weights (nothing downloads).

ViT-B-32 is built for real and saved to disk once per session (~600 MB, a few seconds). ViT-L-14
(~1.7 GB in fp32) is checked on the meta device: the key layouts and shapes are the real
model's, but no memory is allocated and nothing is written, which keeps the suite fast while
still proving that its three layouts map onto the architecture.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retrieval.backbones.openclip import (
    OpenCLIPEmbedder,
    create_open_clip,
    fit_state_dict,
    parse_ref,
    read_state_dict,
)
from retrieval.queries import QUERY_DIR

open_clip = pytest.importorskip("open_clip")


def layouts(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """The three published layouts of one open_clip state dict."""
    return {
        "remoteclip": dict(state),  # plain open_clip state dict
        "skyclip": {  # open_clip training checkpoint (DDP)
            "epoch": 30,
            "name": "SkyCLIP",
            "state_dict": {f"module.{k}": v for k, v in state.items()},
        },
        "georsclip": {"state_dict": {f"model.{k}": v for k, v in state.items()}},  # Lightning
    }


@pytest.fixture(scope="session")
def vit_b32(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random-init ViT-B-32 saved as a RemoteCLIP-style file (and its state dict)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    state = model.state_dict()
    path = tmp_path_factory.mktemp("clip") / "RemoteCLIP-ViT-B-32.pt"
    torch.save(state, path)
    return path, state


def test_refs_parse_and_bad_refs_are_clear():
    assert parse_ref("open_clip:ViT-B-32:/m/RemoteCLIP-ViT-B-32.pt") == (
        "ViT-B-32",
        "/m/RemoteCLIP-ViT-B-32.pt",
    )
    assert parse_ref("open_clip:ViT-L-14:hf-hub:org/repo") == ("ViT-L-14", "hf-hub:org/repo")
    with pytest.raises(ValueError, match="open_clip:ARCH:PRETRAINED"):
        parse_ref("open_clip:ViT-B-32")
    with pytest.raises(ValueError, match="unknown OpenCLIP architecture"):
        create_open_clip("ViT-Q-99", "/nowhere.pt")
    with pytest.raises(FileNotFoundError):
        create_open_clip("ViT-B-32", "/nowhere/RemoteCLIP.pt")


def test_all_three_layouts_load_into_vit_b32(vit_b32, tmp_path):
    state = vit_b32[1]
    for name, obj in layouts(state).items():
        file = tmp_path / f"{name}.pt"
        torch.save(obj, file)
        model = create_open_clip("ViT-B-32", str(file))
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state), name


@pytest.mark.parametrize("layout", ["remoteclip", "skyclip", "georsclip"])
def test_vit_l14_layouts_map_onto_the_real_architecture(layout):
    with torch.device("meta"):
        model = open_clip.create_model("ViT-L-14", device="meta")
    state = model.state_dict()
    obj = layouts(state)[layout]
    raw = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    fitted = fit_state_dict(model, dict(raw), layout)
    assert set(fitted) == set(state)
    assert fitted["visual.transformer.resblocks.23.mlp.c_fc.weight"].shape == (4096, 1024)
    # a ViT-B-32 checkpoint given as ViT-L-14 fails with the keys that do not fit
    with torch.device("meta"):
        small = open_clip.create_model("ViT-B-32", device="meta").state_dict()
    with pytest.raises(ValueError, match="does not fit"):
        fit_state_dict(model, dict(small), "RemoteCLIP-ViT-B-32.pt")


def test_pickled_modules_are_refused_without_running_them(tmp_path):
    file = tmp_path / "full_model.pt"
    torch.save(torch.nn.Linear(2, 2), file)
    with pytest.raises(ValueError, match="re-save it"):
        read_state_dict(file)


def test_zero_shot_embedder_interface(vit_b32):
    path, _ = vit_b32
    emb = OpenCLIPEmbedder(f"open_clip:ViT-B-32:{path}").eval()
    tiles = emb.embed_tiles(torch.rand(2, 3, 64, 64))
    queries = emb.embed_queries(["forest", "open farmland"])
    assert tiles.shape == queries.shape == (2, emb.dim) == (2, 512)
    assert torch.allclose(tiles.norm(dim=1), torch.ones(2), atol=1e-5)
    assert emb.visual_tokens() == 49
    assert emb.fingerprint == OpenCLIPEmbedder(f"open_clip:ViT-B-32:{path}").fingerprint


@pytest.mark.slow
def test_checkpoint_file_indexes_and_searches_the_sample(vit_b32, sample_build: Path, tmp_path):
    """Done-when: an OpenCLIP checkpoint file indexes and searches the sample (real CLI)."""
    path, _ = vit_b32
    ref = f"open_clip:ViT-B-32:{path}"
    cli = [sys.executable, "-m", "geoseg.cli"]
    index = tmp_path / "index"
    run = subprocess.run(
        [*cli, "index", "--data", str(sample_build), "--model", ref, "--out", str(index),
         "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    hits = tmp_path / "hits.geojson"
    run = subprocess.run(
        [*cli, "search", "tall trees", "--index", str(index), "--k", "5", "--out", str(hits),
         "--device", "cpu"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    features = json.loads(hits.read_text())["features"]
    assert len(features) == 5 and features[0]["properties"]["rank"] == 1
    like = subprocess.run(
        [*cli, "search", "--like", features[0]["id"], "--index", str(index), "--k", "3",
         "--out", str(tmp_path / "like.geojson")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert like.returncode == 0, like.stderr
    # the same file is the zero-shot baseline of evaluate-retrieval, beside chance
    run = subprocess.run(
        [*cli, "evaluate-retrieval", "--data", str(sample_build), "--model", ref,
         "--queries", str(QUERY_DIR / "dev.yaml"), "--out", str(tmp_path / "eval"),
         "--device", "cpu"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["rows"]
    baseline = [r for r in rows if r["model"] == ref]
    assert {r["pool"] for r in baseline} == {"index", "unseen"}
    assert all(0 < r["summary"]["p@10"]["chance"] < 1 for r in baseline)


@pytest.mark.slow
def test_openclip_teacher_is_distilled_in_train_retrieval(vit_b32, sample_build: Path, tmp_path):
    """train-retrieval with `teacher:` adds the relational KD term (its caption-tile score
    distribution); the KD loss is zero only when student and teacher rank alike."""
    from retrieval.losses import relational_kd
    from retrieval.train import train_retrieval

    scores = torch.randn(4, 4)
    assert relational_kd(scores, scores).item() == pytest.approx(0.0, abs=1e-6)
    assert relational_kd(scores, scores.T).item() > 0
    path, _ = vit_b32
    config = {
        "model": {
            "backbone": {"kind": "default", "vision": "vit", "image_size": 32, "patch_size": 8,
                         "vision_width": 32, "vision_layers": 1, "vision_heads": 2, "lm_layers": 1},
            "max_text_tokens": 24,
        },
        "generative": {"steps": 0},
        "contrastive": {"batch_size": 3},
        "judge": {"steps": 0},
        "reranker": {"steps": 0},
        "teacher": {"model": f"open_clip:ViT-B-32:{path}"},
        "train": {"device": "cpu", "log_every": 1, "augment": 1, "caption_bank": 2},
    }  # fmt: skip
    out = train_retrieval(config, sample_build, tmp_path / "run", max_steps=1)
    losses = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "contrastive" and "loss" in r for r in losses)
