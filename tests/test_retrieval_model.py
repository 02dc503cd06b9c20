"""Retrieval model side: VTC arithmetic, pooling, embedder I/O, HF backbones, losses, mining,
judges and the reranker. Small random-initialised models (real classes, no download)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from retrieval.backbones import create_backbone
from retrieval.backbones.base import last_token_pool, pad_batch
from retrieval.backbones.default import minilm_path
from retrieval.compress import compress_tokens, compressed_count, downsample_grid
from retrieval.data import TileInfo
from retrieval.embedder import TileEmbedder, create_embedder, load_embedder
from retrieval.judge import JudgePair, LabelJudge, MLLMJudge
from retrieval.losses import info_nce, listwise_loss, pointwise_loss
from retrieval.mining import mine_hard_negatives, mining_window, top_k
from retrieval.rerank import Reranker, load_reranker


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def small_lm(vocab: int) -> dict:
    return {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": vocab,
    }


def default_backbone(tokenizer, compression: int = 2):
    """The offline default architecture at toy width (random MiniLM-shaped LM)."""
    spec = {
        "kind": "default",
        "vision": "vit",
        "pooling": "last",
        "freeze_vision": False,
        "freeze_lm": False,
        "image_size": 32,
        "patch_size": 4,
        "vision_width": 16,
        "vision_layers": 1,
        "vision_heads": 2,
        "compression": compression,
        "lm_config": small_lm(tokenizer.vocab_size),
    }
    return create_backbone(spec, tokenizer=tokenizer)


def hf_spec(family: str, vocab: int, compression: int = 2) -> dict:
    """A tiny random InternVL3-hf / Idefics3 config of the real classes (32 px, patch 4)."""
    text = {**small_lm(vocab), "num_key_value_heads": 1}
    vision = {k: text[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size")}
    vision["num_hidden_layers"] = 1
    if family == "qwen2_vl":
        config = {  # GME / VLM2Vec-Qwen2VL are this class: patch 4, 2x2 merge, M-RoPE
            "model_type": "qwen2_vl",
            "vision_config": {
                "depth": 1,
                "embed_dim": 16,
                "hidden_size": 32,
                "num_heads": 2,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
            },
            "text_config": {
                **text,
                "model_type": "qwen2_vl_text",
                "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
            },
            "image_token_id": 1,
            "vision_start_token_id": 2,
            "vision_end_token_id": 3,
        }
        return {"kind": family, "hf_config": config, "compression": compression, "image_size": 32}
    if family == "internvl":
        config = {
            "model_type": "internvl",
            "downsample_ratio": 0.5,
            "vision_config": {**vision, "image_size": [32, 32], "patch_size": [4, 4]},
            "text_config": {**text, "model_type": "qwen2"},
        }
    else:
        config = {
            "model_type": "idefics3",
            "scale_factor": 2,
            "vision_config": {**vision, "image_size": 32, "patch_size": 4},
            "text_config": {**text, "model_type": "llama"},
        }
    config["image_token_id"] = 1  # [unused0] of the MiniLM vocabulary used as tokenizer
    return {"kind": family, "hf_config": config, "compression": compression}


# --- compression ---------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 2, 4])
def test_compression_keeps_exactly_one_over_s_squared(s):
    tokens = torch.randn(2, 1 + 8 * 16, 5)  # CLS + a non-square 8x16 grid
    out = compress_tokens(tokens, s, grid=(8, 16), prefix=1)
    assert out.shape == (2, 1 + 8 * 16 // s**2, 5)
    assert compressed_count((8, 16), s) * s**2 == 8 * 16
    assert torch.equal(out[:, 0], tokens[:, 0])  # CLS passes through untouched


def test_compression_is_bilinear_average_and_s1_identity():
    grid = torch.randn(1, 4, 6, 3)
    assert downsample_grid(grid, 1) is grid
    pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    assert torch.allclose(downsample_grid(grid, 2), pooled, atol=1e-6)
    tokens = torch.randn(2, 16, 3)
    assert torch.equal(compress_tokens(tokens, 1), tokens)


def test_compression_passes_gradients_to_every_input_token():
    tokens = torch.randn(1, 64, 4, requires_grad=True)
    compress_tokens(tokens, 2).sum().backward()
    assert tokens.grad is not None and bool((tokens.grad != 0).all())


def test_compression_rejects_grids_it_cannot_divide_exactly():
    with pytest.raises(ValueError, match="not divisible"):
        compress_tokens(torch.randn(1, 36, 4), 4)
    with pytest.raises(ValueError, match="square"):
        compress_tokens(torch.randn(1, 10, 4), 2)


# --- pooling and the default backbone -------------------------------------------------------


def test_last_token_pool_with_left_and_right_padding():
    seqs = [[5, 6, 7], [8]]
    hidden_of = {5: 0.5, 6: 0.6, 7: 0.7, 8: 0.8, 0: -1.0}
    for side in ("left", "right"):
        ids, mask = pad_batch(seqs, 0, side)
        hidden = ids.float().apply_(lambda i: hidden_of[int(i)]).unsqueeze(-1)
        assert last_token_pool(hidden, mask).flatten().tolist() == pytest.approx([0.7, 0.8])


def test_embeddings_do_not_depend_on_padding_side(tokenizer):
    torch.manual_seed(0)
    embedder = TileEmbedder(default_backbone(tokenizer)).eval()
    images = torch.rand(2, 3, 32, 32)
    texts = ["a long description of tall trees and large buildings", "roofs"]
    out = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        out[side] = (embedder.embed_queries(texts), embedder.embed_tiles(images, texts))
    tokenizer.padding_side = "right"
    for left, right in zip(out["left"], out["right"], strict=True):
        assert torch.allclose(left, right, atol=1e-5)


def test_default_embedder_shapes_tokens_and_round_trip(tokenizer, tmp_path):
    torch.manual_seed(0)
    embedder = TileEmbedder(default_backbone(tokenizer, compression=2)).eval()
    assert TileEmbedder(default_backbone(tokenizer, compression=1)).visual_tokens() == 64
    assert embedder.visual_tokens() == 16 and embedder.dim == 32 and embedder.image_size == 32
    images = torch.rand(3, 3, 64, 64)  # resized inside
    z = embedder.embed_tiles(images)
    assert z.shape == (3, 32) and torch.allclose(z.norm(dim=1), torch.ones(3))
    assert not z.requires_grad  # eval mode: inference without a graph
    embedder.save(tmp_path / "emb")
    assert {p.name for p in (tmp_path / "emb").iterdir()} >= {"config.yaml", "model.safetensors"}
    loaded = load_embedder(tmp_path / "emb")
    assert loaded.fingerprint == embedder.fingerprint
    assert torch.allclose(loaded.embed_tiles(images), z, atol=1e-5)
    with torch.no_grad():
        loaded.backbone.connector[0].bias.add_(0.1)
    assert loaded.fingerprint != embedder.fingerprint


def test_embedder_bad_input(tokenizer, tmp_path):
    embedder = TileEmbedder(default_backbone(tokenizer)).eval()
    with pytest.raises(ValueError, match="empty query"):
        embedder.embed_queries(["  "])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        embedder.embed_tiles(torch.rand(2, 4, 32, 32))
    with pytest.raises(ValueError, match="unknown embedder config"):
        create_embedder({"backbone": {"kind": "default"}, "temperature": 1})
    with pytest.raises(FileNotFoundError):
        load_embedder(tmp_path)


def test_stage1_targets_only_see_the_prompt_and_earlier_targets(tokenizer):
    """The prefix-LM mask: changing a later target token leaves earlier positions unchanged,
    so the next-token loss cannot read the answer."""
    torch.manual_seed(0)
    backbone = default_backbone(tokenizer).eval()
    prompt = backbone._sequences(0, ["describe the tile"], 16)[0]
    a, b = [*prompt, 2000, 2001, 2002], [*prompt, 2000, 2001, 3000]
    hidden = []
    for seq in (a, b):
        ids, mask = pad_batch([seq], 0, "right")
        hidden.append(backbone._forward(ids, mask, None, torch.tensor([len(prompt)])))
    assert torch.allclose(hidden[0][0, :-1], hidden[1][0, :-1], atol=1e-5)
    assert not torch.allclose(hidden[0][0, -1], hidden[1][0, -1], atol=1e-5)
    loss = backbone.lm_loss(torch.rand(2, 1, 3, 32, 32), ["describe"] * 2, ["trees", "a roof"], 16)
    assert loss.item() == pytest.approx(math.log(tokenizer.vocab_size), rel=0.2)


# --- Hugging Face backbones ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["internvl", "idefics3"])
def test_hf_backbone_compression_patch_and_training_path(family, tokenizer):
    torch.manual_seed(0)
    tokens = {}
    for s in (1, 2):
        backbone = create_backbone(hf_spec(family, tokenizer.vocab_size, s), tokenizer=tokenizer)
        tokens[s] = backbone.image_token_count()
        embedder = TileEmbedder(backbone).eval()
        # the model itself checks placeholders == image features: compression really ran
        z = embedder.embed_tiles(torch.rand(2, 3, 48, 48), ["trees", "roofs"])
        assert z.shape == (2, 32) and torch.allclose(z.norm(dim=1), torch.ones(2))
    assert tokens == {1: 16, 2: 4}  # 8x8 ViT grid, pixel shuffle 2: 16 -> 4 with s = 2
    backbone.train()
    loss = backbone.lm_loss(torch.rand(2, 1, 3, 32, 32), ["describe"] * 2, ["trees", "a roof"], 16)
    loss.backward()
    vision = backbone.model.model.vision_tower if family == "internvl" else None
    vision = vision or backbone.model.model.vision_model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.parameters())


def test_qwen2_vl_universal_embedders_with_compression(tokenizer):
    """GME / VLM2Vec (Qwen2-VL) backbones: the LM is told the compressed grid (M-RoPE and
    placeholders), the vision tower runs on the real one and its patch features are bilinearly
    down-sampled in merge-window order before the 2x2 merge."""
    from retrieval.backbones.hf import compress_qwen_tokens

    torch.manual_seed(0)
    counts = {}
    for s in (1, 2):
        backbone = create_backbone(
            hf_spec("qwen2_vl", tokenizer.vocab_size, s), tokenizer=tokenizer
        )
        counts[s] = backbone.image_token_count()
        embedder = TileEmbedder(backbone).eval()
        z = embedder.embed_tiles(torch.rand(2, 3, 48, 48), ["trees", "roofs"])
        assert z.shape == (2, 32) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
        assert embedder.embed_queries(["forest"]).shape == (1, 32)
    assert counts == {1: 16, 2: 4}  # 8x8 patches -> merge 2x2: 16 tokens; VTC s=2 first: 4
    backbone.train()
    loss = backbone.lm_loss(torch.rand(2, 1, 3, 32, 32), ["describe"] * 2, ["trees", "a roof"], 16)
    loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in backbone.model.model.visual.parameters()
    )
    # window order in, window order out: a constant-per-grid-cell image stays exact under 2x2 means
    grid = torch.arange(16.0).view(1, 4, 4, 1)
    window = grid.view(2, 2, 2, 2, 1).permute(0, 2, 1, 3, 4).reshape(16, 1)
    out = compress_qwen_tokens(window, torch.tensor([[1, 4, 4]]), 2, 2)
    assert out.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_hf_embedder_round_trip(tokenizer, tmp_path):
    torch.manual_seed(0)
    spec = hf_spec("internvl", tokenizer.vocab_size)
    embedder = TileEmbedder(create_backbone(spec, tokenizer=tokenizer)).eval()
    embedder.save(tmp_path / "emb")
    loaded = load_embedder(tmp_path / "emb")
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.embed_tiles(images), embedder.embed_tiles(images), atol=1e-5)
    assert loaded.fingerprint == embedder.fingerprint and loaded.visual_tokens() == 4


# --- losses ---------------------------------------------------------------------------------


def test_info_nce_matches_hand_computed_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[0.5, 0.45], [0.45, 0.5]])
    hard = torch.tensor([[[0.48, 0.0]], [[0.0, 0.48]]])
    tau = 0.03
    # each query: positive 0.5, in-batch negative 0.45, hard negative 0.48
    e = [math.exp(v / tau) for v in (0.5, 0.45, 0.48)]
    expected = -math.log(e[0] / sum(e))
    assert info_nce(q, c, hard, tau).item() == pytest.approx(expected, rel=1e-4)
    no_hard = -math.log(e[0] / (e[0] + e[1]))
    assert info_nce(q, c).item() == pytest.approx(no_hard, rel=1e-4)
    masked = info_nce(q, c, hard, tau, hard_mask=torch.zeros(2, 1, dtype=torch.bool))
    assert masked.item() == pytest.approx(no_hard, rel=1e-4)


def test_reranker_losses():
    yes_no = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    good = pointwise_loss(yes_no, torch.tensor([True, False]))
    bad = pointwise_loss(yes_no, torch.tensor([False, True]))
    assert good.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5) and bad > good
    positions = torch.tensor([[0.0, 3.0, 0.0]])
    assert listwise_loss(positions, torch.tensor([1])) < listwise_loss(positions, torch.tensor([0]))


# --- mining ---------------------------------------------------------------------------------


def test_hard_negatives_never_include_the_positive_and_respect_ranks():
    """Mining searches a faiss index (top hi+1 per query), never an n×n matrix."""
    rng = np.random.default_rng(0)
    tiles = F.normalize(torch.randn(300, 16), dim=1)
    queries = F.normalize(torch.randn(300, 16), dim=1)
    positives = torch.randperm(300)
    queries = F.normalize(queries + 3 * tiles[positives], dim=1)  # positives rank first
    mined = mine_hard_negatives(queries, tiles, positives, rng)
    assert mined.shape == (300, 2)
    assert not bool((mined == positives.view(-1, 1)).any())
    order = torch.argsort(queries @ tiles.T, dim=1, descending=True)
    for q in range(300):
        ranks = [int((order[q] == c).nonzero()) - 1 for c in mined[q]]  # 0 = best negative
        assert all(50 <= r < 100 for r in ranks) and ranks[0] != ranks[1]
    near = top_k(queries, tiles, positives, 20)
    assert near.shape == (300, 20) and not bool((near == positives.view(-1, 1)).any())
    assert torch.equal(near[:, 0], order[:, 1])


def test_mining_window_is_clipped_for_small_corpora():
    assert mining_window(1000, 2) == (50, 100)
    assert mining_window(58, 2) == (29, 58)
    assert mining_window(3, 2) == (1, 3)
    assert mining_window(1, 2) == (0, 1)
    vecs = F.normalize(torch.randn(4, 8), dim=1)
    small = mine_hard_negatives(vecs, vecs, torch.arange(4), np.random.default_rng(0))
    assert small.shape == (4, 2) and not bool((small == torch.arange(4).view(-1, 1)).any())


# --- judges and reranker --------------------------------------------------------------------


def tile(tile_id: str, **fractions: float) -> TileInfo:
    shares = {"others": 0.0, "ground": 0.0, "tree": 0.0, "building": 0.0, **fractions}
    return TileInfo(tile_id, "train", (0.0, 0.0, 1.0, 1.0), "EPSG:32610", 2022, shares, {})


def test_label_judge_uses_graded_relevance():
    forest = tile("a", tree=0.9, ground=0.1)
    pairs = [
        JudgePair("a forest", forest, tile("b", tree=0.85, ground=0.15), torch.rand(3, 8, 8)),
        JudgePair("a forest", forest, tile("c", building=0.8, ground=0.2), torch.rand(3, 8, 8)),
    ]
    assert LabelJudge()(pairs) == [True, False]
    assert LabelJudge(relevance=lambda q, c: 3)(pairs) == [True, True]
    with pytest.raises(ValueError, match="source tile"):
        LabelJudge()([JudgePair("free text", None, forest, torch.rand(3, 8, 8))])


def test_mllm_judge_plumbing(tokenizer):
    torch.manual_seed(0)
    backbone = create_backbone(hf_spec("internvl", tokenizer.vocab_size), tokenizer=tokenizer)
    judge = MLLMJudge(backbone.eval())
    pairs = [JudgePair(q, None, None, torch.rand(3, 32, 32)) for q in ("a forest", "houses", "x")]
    logits = judge.logits(pairs)
    assert logits.shape == (3, 2)
    assert judge(pairs) == (logits[:, 0] > logits[:, 1]).tolist()


def test_reranker_scores_and_round_trip(tokenizer, tmp_path):
    torch.manual_seed(0)
    reranker = Reranker(default_backbone(tokenizer)).eval()
    images = torch.rand(5, 3, 32, 32)
    scores = reranker.score("tall trees", images)
    assert scores.shape == (5,)
    assert reranker.positions(["tall trees"], torch.rand(1, 4, 3, 32, 32)).shape == (1, 4)
    reranker.save(tmp_path / "rr")
    assert torch.allclose(load_reranker(tmp_path / "rr").score("tall trees", images), scores)
    with pytest.raises(ValueError, match="empty query"):
        reranker.score("", images)
    with pytest.raises(FileNotFoundError):
        load_reranker(tmp_path / "missing")


def test_the_default_is_pretrained_efficientnet_and_the_whole_minilm(tmp_path):
    """Offline default: ImageNet EfficientNet-Lite1's 8x8 feature map -> VTC s=2 -> 16 tokens ->
    all 6 MiniLM layers, both towers frozen (only the connector learns), mean pooling; frozen
    features may be computed once (training) and give the same embedding as pixels."""
    embedder = create_embedder({"backbone": {"kind": "default"}})
    backbone = embedder.backbone
    assert embedder.dim == 384 and embedder.visual_tokens() == 16
    assert (
        backbone.vision_name == "efficientnet-lite1" and backbone.lm.config.num_hidden_layers == 6
    )
    assert Path(backbone.tokenizer.name_or_path) == minilm_path()
    trainable = {n.split(".")[0] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"connector", "head", "head_bias"}
    embedder.train()
    assert not backbone.vision.training and not backbone.lm.training  # BN stats, no dropout
    embedder.eval()
    images = torch.rand(2, 3, 64, 64)
    features = embedder.tile_features(images)
    assert features.shape == (2, 64, 1280)
    assert torch.allclose(
        embedder.embed_features(features), embedder.embed_tiles(images), atol=1e-5
    )
    embedder.save(tmp_path / "emb")
    loaded = load_embedder(tmp_path / "emb", device="cpu")
    assert loaded.fingerprint == embedder.fingerprint
    assert torch.allclose(loaded.embed_tiles(images), embedder.embed_tiles(images), atol=1e-5)
    # the text side is the packaged sentence encoder: paraphrases sit closer than other words
    q = embedder.embed_queries(["dense woods", "a thick forest", "a parking lot"])
    assert q[0] @ q[1] > q[0] @ q[2]


@pytest.mark.parametrize("tower", ["efficientnet-lite0", "efficientnet-lite2", "geoembed"])
def test_other_pretrained_towers_build(tower):
    embedder = create_embedder(
        {"backbone": {"kind": "default", "vision": tower, "image_size": 128}}
    )
    tokens = 64 if tower == "geoembed" else 4  # 16x16 (stride 8) or 4x4 (stride 32), then s = 2
    assert embedder.visual_tokens() == tokens
    assert embedder.eval().embed_tiles(torch.rand(1, 3, 64, 64)).shape == (1, 384)


def test_lora_trains_adapters_only_and_merges_back(tokenizer):
    from retrieval.train import DEFAULTS, apply_lora

    torch.manual_seed(0)
    embedder = TileEmbedder(default_backbone(tokenizer)).train()
    lm_class = type(embedder.backbone.lm)
    merge = apply_lora(embedder, DEFAULTS["lora"])
    lm = embedder.backbone.lm
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.requires_grad for p in embedder.backbone.vision.parameters())
    with torch.no_grad():  # make the adapters matter before merging
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    embedder.eval()
    before = embedder.embed_queries(["tall trees"])
    merge()
    assert type(embedder.backbone.lm) is lm_class
    assert torch.allclose(embedder.embed_queries(["tall trees"]), before, atol=1e-5)
