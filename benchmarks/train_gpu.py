"""GPU training throughput: IKD-Net vs the plain U-Net, the neighbour search, and data loading.

Three measurements, one table each, all in benchmarks/results/train_gpu.json (train_gpu-small.json
with --small):

1. Train step (forward + holistic loss + backward + clip 1.0 + Adam step) img/s and peak memory
   for IKD-Net at the paper's width (configs/ikdnet.yaml: 512² rgb, 131072 points, 4 levels,
   k = 16) and the plain image U-Net (the paper's from-scratch U-Net) at the same batch; bf16
   autocast + channels_last on CUDA, fp32 on CPU. IKD-Net is timed with the pyramid precomputed
   (`data.pyramid_device: cpu`: indices come from the workers) and with its kNN indices computed
   in every step on the device (`pyramid_device: gpu`, what a GPU run does).
2. kNN k = 16 over one tile of 131072 points (also with --small): `grid_knn` on the device, one
   tile and a batch of tiles, scipy's cKDTree on all CPU cores, brute force (on CPU timed on a
   query subset and extrapolated), and the whole pyramid (4 levels of kNN + 1-NN) per tile.
   Point sets, standardised as the pipeline does: uniform in 512 × 512 × 50 m (as
   shared/reference/measurements.md §6) and real LiDAR (the sample catalog's 698k-point French
   LiDAR HD COPC, 131072 drawn without replacement).
3. CPU side of loading one sample, per core: LAZ decode + point pipeline (`prepare_points`,
   with and without the kNN) on that real tile, or the per-sample part alone (`sample_points`)
   on its points from a training cache (`build_cache(point_grid=...)`: thinned once, memory-
   mapped), + the image (and mask) of a 512² tile from its COGs (`N3CCalifornia.read_image`) or
   from the training cache (`TileCacheDataset`: the same memory-mapped read + normalisation as a
   cached `N3CCalifornia`). Dividing the train step's
   img/s by it gives the DataLoader workers (cores) a GPU run needs: data loading is not the
   bottleneck while that is below the host's cores.

    .venv/bin/python benchmarks/train_gpu.py            # on a GPU host (defaults)
    .venv/bin/python benchmarks/train_gpu.py --small    # CPU smoke run: reduced train sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import laspy
import numpy as np
import torch
from affine import Affine
from lightning.fabric.utilities.apply_func import move_data_to_device
from machine import cpu_model
from scipy.spatial import cKDTree

from geoseg.datasets import TileCacheDataset, build_cache
from geoseg.datasets.cache import META, TileCache, write_points
from geoseg.datasets.n3c import N3CCalifornia
from geoseg.datasets.points import PointConfig, prepare_points, sample_points, standardise
from geoseg.models import create_model, make_dummy_batch
from geoseg.models.batch import neighbour_indices
from geoseg.models.neighbors import brute_force_knn, grid_knn
from geoseg.train.config import load_config
from geoseg.train.losses import HolisticLoss

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results"
LIDAR = ROOT / "data_catalog/sample/assets/3dep-lidar-copc/FR_L93_LPC_2024_0484_6633.copc.laz"
PAPER = ROOT / "configs" / "ikdnet.yaml"
K = 16


def timed(fn: Callable[[], Any], reps: int, warmup: int = 1, sync: bool = False) -> dict:
    """Seconds per call: median, min, max of `reps` calls after `warmup` untimed ones."""
    wait = torch.cuda.synchronize if sync else (lambda: None)
    for _ in range(warmup):
        fn()
    wait()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        wait()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def scaled(t: dict, factor: float) -> dict:
    return {key: value * factor for key, value in t.items()}


# ---------------------------------------------------------------- 1. train step


def train_steps(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """img/s and peak memory of one optimiser step per model, same batch and settings."""
    cuda = device.type == "cuda"
    paper = load_config(PAPER)
    kwargs = {**paper.model.kwargs, "in_channels": 3}
    batch = make_dummy_batch(
        args.batch, args.image_size, args.points, k=K, in_channels=3, seed=args.seed
    )
    gen = torch.Generator().manual_seed(args.seed)
    mask = torch.randint(0, 5, (args.batch, args.image_size, args.image_size), generator=gen)
    labels = torch.randint(0, 5, (args.batch, args.points), generator=gen)
    batch, mask, labels = move_data_to_device((batch, mask, labels), device)
    if cuda:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    runs = [
        ("ikdnet", "IKD-Net, pyramid from the workers", "ikdnet", False),
        ("ikdnet_device_pyramid", "IKD-Net + kNN on the device each step", "ikdnet", True),
        ("unet", "plain U-Net (image only)", "unet", False),
    ]
    rows = []
    for key, label, name, device_pyramid in runs:
        torch.manual_seed(args.seed)
        model_kwargs = kwargs if name == "ikdnet" else {"in_channels": 3, **_unet(kwargs)}
        model = create_model(name, **model_kwargs).to(device)
        if cuda:
            model.to(memory_format=torch.channels_last)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        loss = HolisticLoss(torch.ones(5)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, loss=loss, opt=opt, device_pyramid=device_pyramid) -> None:
            points = batch["points"]
            if device_pyramid:
                points.update(neighbour_indices(points["xyz"], K))
            with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
                out = model(batch)
                total = loss(out, mask, labels, points["pixels"][0])["total"]
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        row: dict[str, Any] = {"model": key, "label": label, "batch": args.batch}
        try:
            t = timed(step, args.steps, warmup=args.warmup, sync=cuda)
            row |= {"step_s": t, "img_s": args.batch / t["median"]}
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        except torch.OutOfMemoryError as exc:
            row |= {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        rows.append(row)
        print(_train_line(row), flush=True)
        del model, opt, loss
    unet = next(r for r in rows if r["model"] == "unet").get("img_s")
    for row in rows:
        row["ratio_to_unet"] = row["img_s"] / unet if unet and "img_s" in row else None
    return rows


def _unet(ikdnet_kwargs: dict) -> dict:
    """The IKD-Net image branch's widths, so the U-Net is that branch alone."""
    return {"widths": ikdnet_kwargs["widths"]} if "widths" in ikdnet_kwargs else {}


def _train_line(row: dict) -> str:
    if "error" in row:
        return f"{row['label']:45s} {row['error']}"
    mem = f"{row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else "n/a"
    return f"{row['label']:45s} {row['img_s']:8.2f} img/s  peak {mem}"


# ---------------------------------------------------------------- 2. neighbour search


def point_sets(n: int, seed: int) -> dict[str, np.ndarray]:
    """Standardised float32 (n, 3) clouds: uniform box and real LiDAR (when the file is there)."""
    rng = np.random.default_rng(seed)
    box = np.c_[rng.uniform(0, 512, (n, 2)), rng.uniform(0, 50, n)]
    sets = {"uniform 512×512×50 m": standardise(box)}
    if LIDAR.is_file():
        las = laspy.read(LIDAR)
        xyz = np.stack([las.x, las.y, las.z], axis=1)
        pick = rng.choice(len(xyz), n, replace=len(xyz) < n)
        sets["real LiDAR (LiDAR HD, 698k pts)"] = standardise(xyz[pick])
    return sets


def knn_times(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """ms per tile of each search; every grid result is checked against brute force."""
    return [
        row
        for name, pts in point_sets(args.knn_points, args.seed).items()
        for row in _knn_one(name, pts, args, device)
    ]


def _knn_one(name: str, pts: np.ndarray, args: argparse.Namespace, device: torch.device) -> list:
    """One point set's rows of `knn_times`."""
    cuda = device.type == "cuda"
    cores = os.cpu_count() or 1
    rows = []
    n = len(pts)
    cpu = torch.from_numpy(pts)
    dev = cpu.to(device)
    tiles = dev.expand(args.knn_batch, -1, -1).contiguous()
    sub = torch.linspace(0, n - 1, args.check_queries).long()
    exact = brute_force_knn(dev[sub.to(device)], dev, K)
    found = grid_knn(dev, dev, K)
    assert torch.equal(found[sub.to(device)], exact), f"grid_knn is not exact on {name}"
    ms: dict[str, dict] = {
        f"grid_knn ({device.type}, 1 tile)": timed(
            lambda: grid_knn(dev, dev, K), args.knn_reps, sync=cuda
        ),
        f"grid_knn ({device.type}, batch of {args.knn_batch}) per tile": scaled(
            timed(lambda: grid_knn(tiles, tiles, K), args.knn_reps, sync=cuda),
            1 / args.knn_batch,
        ),
        f"cKDTree build + query (cpu, {cores} cores)": timed(
            lambda: cKDTree(pts).query(pts, k=K, workers=-1), args.knn_reps
        ),
    }
    if cuda:
        ms["grid_knn (cpu torch, 1 tile)"] = timed(lambda: grid_knn(cpu, cpu, K), 2)
        ms["brute force (cuda)"] = timed(
            lambda: brute_force_knn(dev, dev, K), max(2, args.knn_reps // 3), sync=True
        )
    else:
        q = cpu[sub]
        ms[f"brute force (cpu, from {len(sub)} queries)"] = scaled(
            timed(lambda: brute_force_knn(q, cpu, K), 1, warmup=0), n / len(sub)
        )
    levels = [tiles[:, : n // 4**level] for level in range(5)]
    ms[f"whole pyramid ({device.type}, batch of {args.knn_batch}) per tile"] = scaled(
        timed(lambda: neighbour_indices(levels, K, grid_knn), args.knn_reps, sync=cuda),
        1 / args.knn_batch,
    )
    for method, t in ms.items():
        row = {"points": name, "n": n, "method": method, "ms": scaled(t, 1000)}
        rows.append(row)
        print(f"{name:34s} {method:48s} {_fmt(row['ms'])} ms/tile", flush=True)
    return rows


# ---------------------------------------------------------------- 3. loading, CPU side


def loading(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Seconds per sample on one core for each CPU-side part of a training sample."""
    sys.path.insert(0, str(Path(__file__).parent))
    from loading import make_dataset  # the loading benchmark's synthetic 512² tiles

    torch.set_num_threads(1)  # per core: a DataLoader worker
    try:
        if not (scratch / "dataset" / "stats.json").is_file():
            make_dataset(scratch, 2, args.seed)
        cache = build_cache(scratch / "dataset", "train", layers=("image", "label"))
        tiles = TileCacheDataset(cache, scratch / "dataset" / "stats.json", ("image",), "label")
        las = laspy.read(LIDAR)
        arrays = {f: np.asarray(las[f]) for f in ("x", "y", "z", "intensity", "return_number")}
        arrays["classification"] = np.asarray(las.classification)
        extent = max(np.ptp(arrays["x"]), np.ptp(arrays["y"]))
        gsd = extent / 512 * (1 + 1e-6)
        transform = Affine(gsd, 0, arrays["x"].min(), 0, -gsd, arrays["y"].max())
        cfg = PointConfig(num_points=args.points, augment=True)
        rng = np.random.default_rng(args.seed)
        points_dir = scratch / "points-cache"  # the cache's point arrays for the one real tile
        points_dir.mkdir(exist_ok=True)

        def cache_points() -> None:
            info = write_points(points_dir, ["lidar"], [LIDAR], cfg.grid_size, 1)
            meta = {"tile_ids": ["lidar"], "layers": {}, "points": info}
            (points_dir / META).write_text(json.dumps(meta))

        build = timed(cache_points, 1, warmup=0)
        cached = TileCache(points_dir)

        def points(neighbours: bool, from_cache: bool = False) -> Callable[[], Any]:
            if from_cache:
                return lambda: sample_points(
                    cached.points(0), transform, 512, cfg, rng, None, neighbours
                )
            return lambda: prepare_points(arrays, transform, 512, cfg, rng, None, neighbours)

        cogs = N3CCalifornia(scratch / "dataset", "train", "rgbn", cfg)
        parts = {
            "image from the tile COGs": timed(lambda: cogs.read_image(0), args.load_reps),
            "image + mask from the training cache": timed(lambda: tiles[0], args.load_reps),
            "LAZ decode (real tile, 698k points)": timed(lambda: laspy.read(LIDAR), 3),
            "point pipeline, kNN in the worker (cpu)": timed(points(True), 3),
            "point pipeline, kNN on the device (gpu)": timed(points(False), args.load_reps),
            "cached points, kNN in the worker (cpu)": timed(points(True, True), 3),
            "cached points, kNN on the device (gpu)": timed(points(False, True), args.load_reps),
        }
    finally:
        torch.set_num_threads(args.threads)
    cog = parts["image from the tile COGs"]["median"]
    cached_image = parts["image + mask from the training cache"]["median"]
    laz = parts["LAZ decode (real tile, 698k points)"]["median"]
    per_core = {
        f"{mode}{suffix}": 1 / (extra + parts[f"{source}, kNN {where}"]["median"])
        for mode, where in (("cpu", "in the worker (cpu)"), ("gpu", "on the device (gpu)"))
        for suffix, source, extra in (
            ("", "point pipeline", cog + laz),
            (" cached", "cached points", cached_image),
        )
    }
    print(f"{'points cache build, 1 tile (once)':45s} {build['median'] * 1000:.1f} ms")
    for part, t in parts.items():
        print(f"{part:45s} {_fmt(scaled(t, 1000))} ms/sample (1 core)", flush=True)
    for mode, rate in per_core.items():
        print(f"pyramid_device={mode}: {rate:.2f} samples/s per worker core", flush=True)
    return {"num_points": args.points, "parts_ms": {p: scaled(t, 1000) for p, t in parts.items()},
            "points_cache_build_ms": scaled(build, 1000),
            "samples_per_s_per_core": per_core}  # fmt: skip


# ---------------------------------------------------------------- report


def machine(device: torch.device) -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def _fmt(t: dict) -> str:
    return f"{t['median']:.1f} [{t['min']:.1f}–{t['max']:.1f}]"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--small",
        action="store_true",
        help="CPU smoke run: 128² images, 8192 points, batch 2 (kNN stays full size)",
    )
    p.add_argument("--device", help="torch device [cuda if available, else cpu]")
    p.add_argument("--batch", type=int, help="train batch [8; small 2]")
    p.add_argument("--image-size", type=int, help="train image side [512; small 128]")
    p.add_argument("--points", type=int, help="points per tile [131072; small 8192]")
    p.add_argument("--steps", type=int, help="timed train steps [20; small 3]")
    p.add_argument("--knn-points", type=int, default=131072, help="kNN cloud size [131072]")
    p.add_argument("--knn-batch", type=int, help="tiles per batched kNN call [8; small 2]")
    p.add_argument("--knn-reps", type=int, help="timed kNN calls [10; small 3]")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "knn", "loading"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="results [benchmarks/results/train_gpu(-small).json]")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    small = args.small
    args.batch = args.batch or (2 if small else 8)
    args.image_size = args.image_size or (128 if small else 512)
    args.points = args.points or (8192 if small else 131072)
    args.steps = args.steps or (3 if small else 20)
    args.warmup = 1 if small else 3
    args.knn_batch = args.knn_batch or (2 if small else 8)
    args.knn_reps = args.knn_reps or (3 if small else 10)
    args.check_queries, args.load_reps = 2048, (5 if small else 20)
    args.threads = torch.get_num_threads()
    out = args.json or RESULTS / ("train_gpu-small.json" if small else "train_gpu.json")
    info = machine(device)
    print(f"device: {info['device']}; cpu: {info['cpu']} ({info['cores']} cores)"
          + ("; --small: reduced train sizes, not the paper's" if small else ""))  # fmt: skip

    def save() -> None:
        """After every part, so a run cut short (device time) keeps what it measured."""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)

    result: dict[str, Any] = {
        "benchmark": "train_gpu",
        "small": small,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "skip")},
        "machine": info,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
    }
    if "train" not in args.skip:
        print(f"\n## train step: batch {args.batch}, {args.image_size}², {args.points} points")
        result["train"] = train_steps(args, device)
        save()
    if "knn" not in args.skip:
        print(f"\n## kNN k={K}, {args.knn_points} points per tile, median [min–max]")
        result["knn"] = knn_times(args, device)
        save()
    if "loading" not in args.skip:
        print(f"\n## CPU side of one training sample ({args.points} points)")
        scratch = Path(tempfile.gettempdir()) / f"geoseg-bench-train-gpu-{args.seed}"
        result["loading"] = loading(args, scratch)
        rate = result["loading"]["samples_per_s_per_core"]
        modes = {"ikdnet": "cpu", "ikdnet_device_pyramid": "gpu"}  # the U-Net reads no points
        for row in result.get("train", []):
            if "img_s" in row and row["model"] in modes:
                mode = modes[row["model"]]
                row["workers_needed"] = row["img_s"] / rate[mode]
                row["workers_needed_cached"] = row["img_s"] / rate[f"{mode} cached"]
                print(f"{row['label']:45s} needs {row['workers_needed']:.1f} worker cores, "
                      f"{row['workers_needed_cached']:.1f} with the points cache "
                      f"(pyramid_device={mode})")  # fmt: skip
    save()
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
