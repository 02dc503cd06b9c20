"""Retrieval efficiency: visual tokens and embedding speed for s = 1 vs 2, search latency and
hard-negative mining at 10⁶ tiles.

1. Visual tokens per tile of the embedder for s = 1 (no compression) and s = 2; s = 2 must give
   exactly 1/4 (papers.md §2.9: InternVL3 256 → 64 per 448-px tile).
2. Embedding speed on CPU, random weights (speed does not depend on them): per-tile latency at
   batch 1 (median and p95) and throughput at batch 8, for the offline default backbone at
   (a) the sample's 64-px tiles (configs/retrieval-tiny.yaml) and (b) 224-px tiles with 14-px
   patches (16 × 16 = 256 → 64 tokens, the paper's natural-image token counts).
   With CUDA: the same at batch 1 in bf16 for a full-size InternVL3-1B-shaped HF config (random
   weights, 448 px, InternViT-300M + Qwen2.5-0.5B shapes): the paper's table 6 setting.
3. Search latency over 10⁶ random unit vectors (dim 384, the default embedder's), one query at a
   time (faiss with 2 OpenMP threads; a single query runs on one): exact (IndexFlatIP), IVF
   (√n lists, 32 probes) unfiltered, IVF with a 30 % bbox and a 33 % split filter
   (IDSelectorBitmap, probes scaled) and a 1 % bbox (exact: every list probed, only matching
   tiles scored); p50/p95 ms (metadata mask included) and recall@10 against the exact answer.
   Target: p95 ≤ 10 ms. Uniformly random vectors are the worst case for IVF recall (no cluster
   structure), so unfiltered IVF is also swept over the probes on a clustered corpus (4096
   Gaussian clusters, member–centre cosine ≈ 0.7, queries drawn near random centres), which is
   how real embeddings of an archive behave: recall and latency per probe count.

    .venv/bin/python benchmarks/retrieval.py              # ≈ 15 min on 2 busy cores, ~5 GiB RAM
    .venv/bin/python benchmarks/retrieval.py --quick      # 10⁵ vectors, fewer repetitions
    .venv/bin/python benchmarks/retrieval.py --only embed # embedding rows only (no faiss needed)
    .venv/bin/python benchmarks/retrieval.py --only mine  # mining at 10⁶ tiles (time, memory)

4. Mining at 10⁶ tiles (clustered corpus, dim 384): faiss IVF over all tiles, 20 000 caption
   queries ranked to depth 101, 2 negatives each from ranks 50-100; time, CPU rate and peak RSS.
5. Amounts at 10⁶ tiles (`--only amounts`): what search's default adds to a text query with an
   amount or measure: the tiers over all tiles' label facts and the tiered faiss search (tiers
   0 and 1 through selectors), per query, beside the plain search; the label facts' one-off
   build time and size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from machine import cpu_model  # noqa: E402

from retrieval.embedder import TileEmbedder, create_embedder  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DIM = 384
QUERY = "tall trees and some bare ground on flat terrain"

CPU_CONFIGS: dict[str, dict[str, Any]] = {
    "default: EfficientNet-Lite1 256 px": {"vision": "efficientnet-lite1", "image_size": 256},
    "ViT 224 px / patch 14 (ablation)": {
        "vision": "vit",
        "image_size": 224,
        "patch_size": 14,
        "vision_width": 384,
        "vision_layers": 6,
        "vision_heads": 6,
    },
}


def internvl3_1b_config() -> dict[str, Any]:
    """InternVL3-1B-hf shapes (InternViT-300M-448px + Qwen2.5-0.5B), random weights.

    The vocabulary is MiniLM's, whose tokenizer is the one available offline; it only changes
    the embedding-table size, not the per-token compute of the layers.
    """
    from transformers import AutoTokenizer

    from retrieval.backbones.default import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    vision = {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "image_size": [448, 448],
        "patch_size": [14, 14],
    }
    text = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": tokenizer.vocab_size,
    }
    return {
        "model_type": "internvl",
        "downsample_ratio": 0.5,
        "vision_config": vision,
        "text_config": text,
        "image_token_id": 1,
    }


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def timed(
    fn: Callable[[], Any], reps: int, sync: Callable[[], None] = lambda: None
) -> tuple[list[float], list[float]]:
    """(wall ms, process CPU ms) of `reps` calls after one warm-up call.

    The dev machine is shared (load average ~13 on 2 cores while measuring), so wall times
    mostly measure waiting for a core; CPU time of a single-threaded call is what it costs.
    """
    fn()
    sync()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append((time.process_time() - c) * 1000)
    return wall, cpu


def embed_speed(
    embedder: TileEmbedder, device: str, reps: int, batch: int | None
) -> dict[str, Any]:
    size = embedder.image_size
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    one = torch.rand(1, 3, size, size, device=device)
    with torch.inference_mode():
        wall, cpu = timed(lambda: embedder.embed_tiles(one), reps, sync)
        qwall, qcpu = timed(lambda: embedder.embed_queries([QUERY]), reps, sync)
        row = {
            "visual_tokens": embedder.visual_tokens(),
            "tile_ms_p50": statistics.median(wall),
            "tile_ms_p95": percentile(wall, 95),
            "tile_cpu_ms_p50": statistics.median(cpu),
            "query_ms_p50": statistics.median(qwall),
            "query_cpu_ms_p50": statistics.median(qcpu),
        }
        if batch:
            many = torch.rand(batch, 3, size, size, device=device)
            _, bcpu = timed(lambda: embedder.embed_tiles(many), max(2, reps // 2), sync)
            row["tiles_per_cpu_s"] = batch * 1000 / statistics.median(bcpu)
    return row


def embedding_rows(quick: bool) -> list[dict[str, Any]]:
    rows = []
    reps = 3 if quick else 8
    for name, spec in CPU_CONFIGS.items():
        for s in (1, 2):
            torch.manual_seed(0)
            embedder = create_embedder({"backbone": {"kind": "default", **spec, "compression": s}})
            row = embed_speed(embedder.eval(), "cpu", reps, batch=8)
            rows.append({"device": "cpu fp32", "config": name, "s": s, **row})
            print_row(rows[-1])
    if torch.cuda.is_available():
        from transformers import AutoTokenizer

        from retrieval.backbones import create_backbone
        from retrieval.backbones.default import minilm_path

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        for s in (1, 2):
            torch.manual_seed(0)
            spec = {"kind": "internvl", "hf_config": internvl3_1b_config(), "compression": s}
            backbone = create_backbone(spec | {"dtype": "bfloat16"}, tokenizer=tokenizer)
            embedder = TileEmbedder(backbone).to("cuda").eval()
            row = embed_speed(embedder, "cuda", reps=5 if quick else 50, batch=None)
            name = f"InternVL3-1B shapes, 448 px ({torch.cuda.get_device_name()})"
            rows.append({"device": "cuda bf16", "config": name, "s": s, **row})
            print_row(rows[-1])
            del embedder, backbone
            torch.cuda.empty_cache()
    for r in rows:
        base = next(b for b in rows if b["config"] == r["config"] and b["s"] == 1)
        r["tokens_ratio"] = r["visual_tokens"] / base["visual_tokens"]
        r["speedup_batch1_cpu"] = base["tile_cpu_ms_p50"] / r["tile_cpu_ms_p50"]
    return rows


def print_row(r: dict[str, Any]) -> None:
    tput = f"{r['tiles_per_cpu_s']:7.1f}" if "tiles_per_cpu_s" in r else "      —"
    print(
        f"{r['device']:10} {r['config']:30} s={r['s']} tokens {r['visual_tokens']:4d}  "
        f"tile wall {r['tile_ms_p50']:8.2f} ms (p95 {r['tile_ms_p95']:8.2f}) "
        f"cpu {r['tile_cpu_ms_p50']:8.2f} ms  query cpu {r['query_cpu_ms_p50']:6.2f} ms  "
        f"batch {tput} tiles/cpu-s",
        flush=True,
    )


PARTS = ("embed", "search", "mine", "amounts")
CLUSTERS = 4096
SPREAD = 1.0
"""Clustered corpus: noise norm relative to a unit centre (member–centre cosine ≈ 0.7)."""
PROBES = (8, 16, 32, 64, 128)


def unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def corpus(n: int, queries: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, DIM) unit vectors and (queries, DIM) unit queries: uniformly random, or Gaussian
    clusters around random centres (filled in chunks: 10⁶ × 384 float32 is 1.5 GB)."""
    rng = np.random.default_rng(0)
    if kind == "random":
        return (
            unit(rng.standard_normal((n, DIM), dtype=np.float32)),
            unit(rng.standard_normal((queries, DIM), dtype=np.float32)),
        )
    centres = unit(rng.standard_normal((CLUSTERS, DIM), dtype=np.float32))

    def near(count: int) -> np.ndarray:
        out = np.empty((count, DIM), np.float32)
        for i in range(0, count, 100_000):
            m = min(100_000, count - i)
            noise = rng.standard_normal((m, DIM), dtype=np.float32) * (SPREAD / np.sqrt(DIM))
            out[i : i + m] = unit(centres[rng.integers(CLUSTERS, size=m)] + noise)
        return out

    return near(n), near(queries)


def archive_meta(n: int) -> pd.DataFrame:
    """Metadata like a real archive's: a lon/lat grid of tiles, random splits."""
    rng = np.random.default_rng(1)
    side = int(np.ceil(np.sqrt(n)))
    col, row = np.arange(n) % side, np.arange(n) // side
    return pd.DataFrame(
        {
            "tile_id": [f"t{i}" for i in range(n)],
            "west": col * 0.01,
            "east": col * 0.01 + 0.01,
            "south": row * 0.01,
            "north": row * 0.01 + 0.01,
            "split": pd.Categorical(rng.choice(["train", "val", "test"], n, p=[0.7, 0.15, 0.15])),
            "year": 2022,
        }
    )


def search_rows(n: int, queries: int) -> list[dict[str, Any]]:
    """Latency and recall per index/filter on the random corpus, then the probe sweep of
    unfiltered IVF on both corpora (flat latency does not depend on the data)."""
    import faiss

    from retrieval.index import Filters, TileIndex, make_faiss

    faiss.omp_set_num_threads(2)
    meta = archive_meta(n)
    edge = int(np.ceil(np.sqrt(n))) * 0.01
    filters = {
        "none": Filters(),
        "bbox 30 %": Filters(bbox=(0, 0, edge, 0.3 * edge - 0.005)),
        "bbox 1 %": Filters(bbox=(0, 0, 0.1 * edge - 0.005, 0.1 * edge - 0.005)),
        "split test": Filters(split="test"),
    }
    rows = []
    for data in ("random", "clustered"):
        vectors, q = corpus(n, queries, data)
        kinds = ("flat", "ivf") if data == "random" else ("ivf",)
        for kind in kinds:
            t = time.perf_counter()
            index = TileIndex({"kind": kind}, meta, make_faiss(vectors, kind), vectors, Path("."))
            build_s = time.perf_counter() - t
            ivf = faiss.extract_index_ivf(index.faiss) if kind == "ivf" else None
            # (filter, probes): flat unfiltered; IVF filtered (random corpus, default probes,
            # scaled by the search) and unfiltered at every probe count.
            cases = [("none", None)] if ivf is None else [("none", p) for p in PROBES]
            if ivf is not None and data == "random":
                cases += [(f, None) for f in filters if f != "none"]
            default = ivf.nprobe if ivf is not None else None
            for fname, probes in cases:
                filt = filters[fname]
                if ivf is not None:
                    ivf.nprobe = probes or default
                count = min(queries, 50) if kind == "flat" else queries  # flat at 10⁶ is slow
                r = search_latency(index, q[:count], filt)
                truth = _exact_filtered(vectors, q[:count], filt, meta)
                found = r.pop("found")
                recall = np.mean([len(a & b) / 10 for a, b in zip(found, truth, strict=True)])
                if ivf is not None:
                    r["nprobe"], r["nlist"] = ivf.nprobe, ivf.nlist
                rows.append(
                    {
                        "corpus": data,
                        "index": kind,
                        "filter": fname,
                        "vectors": n,
                        "build_s": build_s,
                        **r,
                        "recall@10": float(recall),
                        "threads": 2,
                    }
                )
                r = rows[-1]
                probed = f"{r['nprobe']:3d}/{r['nlist']}" if "nprobe" in r else "   all"
                print(
                    f"{data:9} {kind:4} probes {probed} filter {fname:10} n={n}  "
                    f"p50 {r['p50_ms']:7.2f} ms  p95 {r['p95_ms']:7.2f} ms  cpu p50 "
                    f"{r['cpu_p50_ms']:6.2f} p95 {r['cpu_p95_ms']:6.2f} ms  "
                    f"recall@10 {r['recall@10']:.3f}  (build {build_s:.1f} s)",
                    flush=True,
                )
            del index
        del vectors
    return rows


def amounts_rows(n: int, queries: int) -> list[dict[str, Any]]:
    """A text query's amounts at n tiles (clustered corpus, IVF): the label facts (built once
    per opened index), then per query its tiers (`amount_tiers`) and the tiered faiss search
    to re-scoring depth (`tiered_pairs`, what `geoseg search` runs), against the plain search.
    Label facts are synthetic: 40 % of tiles with trees, 20 % without NIR."""
    import faiss

    from retrieval.amounts import THERE, Amount, amount_tiers, reference_shares
    from retrieval.index import Filters, TileIndex, make_faiss
    from retrieval.rescore import RESCORE_TOP
    from retrieval.search import tiered_pairs

    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(2)
    meta = archive_meta(n)
    tree = np.where(rng.random(n) < 0.4, rng.random(n), 0.0)
    meta = meta.assign(
        frac_others=0.0,
        frac_ground=1.0 - tree,
        frac_tree=tree,
        frac_building=0.0,
        stat_ndvi_mean=np.where(rng.random(n) < 0.2, np.nan, rng.uniform(-0.2, 0.6, n)),
        stat_tree_height_p95=np.where(tree > 0, rng.uniform(3.0, 60.0, n), np.nan),
        stat_slope_deg=rng.gamma(2.0, 3.0, n),
    )
    vectors, q = corpus(n, queries, "clustered")
    index = TileIndex({"kind": "ivf"}, meta, make_faiss(vectors, "ivf"), vectors, Path("."))
    start = time.perf_counter()
    facts = index.label_facts
    facts_s = time.perf_counter() - start
    shares, tolerance = reference_shares(facts, {})
    cases: dict[str, list[Amount] | None] = {
        "none (plain search)": None,
        "a few trees": [Amount("tree", 0.02, 0.1)],
        "trees present": [Amount("tree", THERE, 1.0)],
        "bare soil (NDVI unknown on 20 %)": [Amount("ground_bare", THERE, 1.0)],
        "trees over 40 m": [Amount("tree_height", 40.0, np.inf), Amount("tree", THERE, 1.0)],
    }
    rows = []
    for name, asked in cases.items():
        lat, cpu = [], []
        for i in range(-1, len(q)):  # one warm-up
            start, c = time.perf_counter(), time.process_time()
            tiers = None if asked is None else amount_tiers(shares, asked, tolerance)
            tiered_pairs(index, q[max(i, 0)], RESCORE_TOP, Filters(), (), tiers)
            if i >= 0:
                lat.append((time.perf_counter() - start) * 1000)
                cpu.append((time.process_time() - c) * 1000)
        row = {
            "amounts": name,
            "vectors": n,
            "tier0_share": None if asked is None else float((tiers == 0).mean()),
            "p50_ms": statistics.median(lat),
            "p95_ms": percentile(lat, 95),
            "cpu_p50_ms": statistics.median(cpu),
            "cpu_p95_ms": percentile(cpu, 95),
            "label_facts_s": facts_s,
            "label_facts_mb": sum(v.nbytes for v in facts.values()) / 2**20,
            "threads": 2,
        }
        rows.append(row)
        share = "" if asked is None else f" (tier 0: {row['tier0_share']:.1%})"
        print(
            f"amounts {name:34} n={n}  p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f} ms"
            f"  cpu p50 {row['cpu_p50_ms']:6.2f} p95 {row['cpu_p95_ms']:6.2f} ms{share}",
            flush=True,
        )
    print(f"label facts: {facts_s:.2f} s once, {rows[0]['label_facts_mb']:.0f} MiB", flush=True)
    return rows


def search_latency(index: Any, q: np.ndarray, filt: Any) -> dict[str, Any]:
    """Wall and CPU ms per single-query search (after one warm-up) and the rows found."""
    index.search(q[:1], 10, filt)
    lat, cpu, found = [], [], []
    for i in range(len(q)):
        start, c = time.perf_counter(), time.process_time()
        hits = index.search(q[i : i + 1], 10, filt)[0]
        lat.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - c) * 1000)
        found.append({r for r, _ in hits})
    return {
        "p50_ms": statistics.median(lat),
        "p95_ms": percentile(lat, 95),
        "cpu_p50_ms": statistics.median(cpu),
        "cpu_p95_ms": percentile(cpu, 95),
        "found": found,
    }


def _exact_filtered(
    vectors: np.ndarray, q: np.ndarray, filt: Any, meta: pd.DataFrame
) -> list[set[int]]:
    """Ground-truth top 10 per query within the filter (numpy, in chunks of queries)."""
    mask = filt.mask(meta)
    allowed = np.flatnonzero(mask) if mask is not None else np.arange(len(vectors))
    subset = vectors[allowed] if mask is not None else vectors
    out = []
    for i in range(0, len(q), 16):
        scores = q[i : i + 16] @ subset.T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        out += [set(allowed[t].tolist()) for t in top]
    return out


def mining_rows(n: int, queries: int) -> list[dict[str, Any]]:
    """Global hard-negative mining over `n` tiles through faiss (retrieval.mining): every
    candidate indexed, `queries` captions ranked to depth 101 and 2 negatives drawn from ranks
    50-100; wall/CPU time and peak RSS of the process. The time for all n queries is the
    measured rate times n (queries are independent); the n×n float32 score matrix the old code
    built is given for comparison."""
    import resource

    from retrieval.mining import mine_hard_negatives

    tiles, _ = corpus(n, 1, "clustered")
    rng = np.random.default_rng(2)
    pick = rng.choice(n, queries, replace=False)
    noise = rng.standard_normal((queries, DIM), dtype=np.float32) * (0.5 / np.sqrt(DIM))
    caps = unit(tiles[pick] + noise)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    c0, t0 = time.process_time(), time.perf_counter()
    mined = mine_hard_negatives(caps, tiles, pick, rng)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert mined.shape == (queries, 2) and not (mined.numpy() == pick[:, None]).any()
    row = {
        "tiles": n,
        "queries_measured": queries,
        "index": "flat" if n <= 50_000 else "ivf",
        "wall_s": wall,
        "cpu_s": cpu,
        "queries_per_cpu_s": queries / cpu,
        "all_queries_cpu_h_estimate": n / (queries / cpu) / 3600,
        "peak_rss_gib": rss,
        "rss_before_gib": rss0,
        "dense_score_matrix_gib": n * n * 4 / 2**30,
    }
    print(
        f"mining {n} tiles, {queries} queries: {wall:.1f} s wall, {cpu:.1f} s CPU "
        f"({row['queries_per_cpu_s']:.0f} queries/CPU-s; "
        f"all {n}: ~{row['all_queries_cpu_h_estimate']:.2f} CPU-h), "
        f"peak RSS {rss:.2f} GiB (dense n×n matrix: {row['dense_score_matrix_gib']:.0f} GiB)",
        flush=True,
    )
    return [row]


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_at_start": os.getloadavg()[0],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="10⁵ vectors, fewer repetitions")
    p.add_argument("--only", choices=PARTS, help="run one part [both]")
    p.add_argument("--vectors", type=int, help="search benchmark size [10⁶; quick 10⁵]")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--mine-queries", type=int, default=20_000, help="captions mined (mine part)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for retrieval-PART.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # see `timed`: oversubscribed threads only add waiting
    info = machine()
    print(json.dumps(info))
    for part in [args.only] if args.only else PARTS:
        if part == "embed":
            rows = embedding_rows(args.quick)
        elif part == "mine":
            import faiss

            info["faiss"] = faiss.__version__
            n = args.vectors or (100_000 if args.quick else 1_000_000)
            rows = mining_rows(n, min(n, args.mine_queries))
        elif part == "amounts":
            import faiss

            info["faiss"] = faiss.__version__
            n = args.vectors or (100_000 if args.quick else 1_000_000)
            rows = amounts_rows(n, args.queries)
        else:
            import faiss

            info["faiss"] = faiss.__version__
            rows = search_rows(args.vectors or (100_000 if args.quick else 1_000_000), args.queries)
        out = args.out / f"retrieval-{part}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps({"machine": info, "quick": args.quick, part: rows}, indent=2) + "\n"
        )
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
