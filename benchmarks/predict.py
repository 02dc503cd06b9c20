"""Scene prediction on CPU: px/s and peak RSS of `geoseg predict` for 4096² and 16384² px scenes.

What must hold: memory does not grow with the scene (`geoseg.predict.sliding` streams row bands
of at most `COLUMN_BLOCK` columns into the output), so the 16384² scene (16× the pixels) peaks
at about the 4096² scene's RSS.

Setup, per scene side S: a synthetic but NAIP-like 4-band uint8 scene (smooth random fields of
a few octaves + pixel noise, EPSG:26910, 1 m, tiled 512² DEFLATE GTiff, written band by band so
making it is flat in memory too) and a random-init image-only U-Net checkpoint carrying a real
contract (512 px tiles as in N3C, 1 m). The U-Net is narrow (widths 4-8-16-32, `--widths`):
this measures the prediction pipeline's memory and overhead on a 2-core machine, not a
production model's speed, and keeps 16384² within minutes. Each scene runs in a fresh process
(`--child`), which reports its RSS after loading the model (baseline) and its peak (VmHWM) after
`predict` (COG + STAC Item written); default overlap 0.25, batch 4, no GPU.

    .venv/bin/python benchmarks/predict.py                 # 4096² and 16384² (≈ 25 min, 2 cores)
    .venv/bin/python benchmarks/predict.py --sides 1024    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from machine import cpu_model
from rasterio.transform import from_origin
from rasterio.windows import Window

from geoseg.builder.writers import atomic_path
from geoseg.classes import N3C
from geoseg.models import create_model
from geoseg.predict import sliding
from geoseg.train.task import CONTRACT_FORMAT, CONTRACT_KEY

RESULTS = Path(__file__).parent / "results"
TILE = 512
ROWS_PER_WRITE = 1024
BANDS = ("red", "green", "blue", "nir")
MEAN, STD = [110.0, 115.0, 100.0, 140.0], [40.0, 38.0, 35.0, 45.0]


def peak_rss_mib() -> float:
    """This process's RSS high-water mark (VmHWM; ru_maxrss would carry the parent's over)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def smooth_rows(rng: np.random.Generator, rows: int, width: int) -> np.ndarray:
    """(4, rows, width) uint8: octaves of upsampled noise per band, plus pixel noise."""
    out = torch.zeros(4, rows, width)
    for cell in (256, 64, 16):
        low = torch.from_numpy(rng.standard_normal((1, 4, rows // cell + 3, width // cell + 3)))
        up = F.interpolate(low.float(), scale_factor=cell, mode="bilinear", align_corners=False)
        out += up[0, :, cell : cell + rows, cell : cell + width]
    noise = torch.from_numpy(rng.standard_normal((4, rows, width), np.float32))
    values = torch.tensor(MEAN)[:, None, None] + 30.0 * out / 3**0.5 + 6.0 * noise
    return values.clamp(1, 255).to(torch.uint8).numpy()


def make_scene(path: Path, side: int, seed: int = 0) -> None:
    """The synthetic scene, written in blocks of rows (flat memory)."""
    rng = np.random.default_rng(seed)
    profile = {
        "driver": "GTiff", "width": side, "height": side, "count": 4, "dtype": "uint8",
        "crs": "EPSG:26910", "transform": from_origin(600_000.0, 4_200_000.0, 1.0, 1.0),
        "nodata": 0, "tiled": True, "blockxsize": 512, "blockysize": 512,
        "compress": "DEFLATE", "interleave": "pixel",
    }  # fmt: skip
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for top in range(0, side, ROWS_PER_WRITE):
            rows = min(ROWS_PER_WRITE, side - top)
            dst.write(smooth_rows(rng, rows, side), window=Window(0, top, side, rows))


def make_checkpoint(path: Path, widths: list[int]) -> None:
    """A random-init U-Net checkpoint with a complete contract, as `geoseg train` writes one."""
    kwargs = {"in_channels": 4, "widths": widths}
    model = create_model("unet", **kwargs)
    contract = {
        "format": CONTRACT_FORMAT, "model": "unet", "model_kwargs": kwargs, "bands": list(BANDS),
        "mean": MEAN, "std": STD, "gsd": 1.0, "tile_size": TILE,
        **N3C.contract_keys(),
        "points": {}, "seed": 0,
    }  # fmt: skip
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, CONTRACT_KEY: contract}, path)


def child(checkpoint: Path, scene: Path, out: Path) -> dict[str, Any]:
    """Runs in a fresh process: one `predict`, timed, with its memory."""
    from geoseg.train.task import load_model

    load_model(checkpoint)  # imports and a model in memory: the baseline
    baseline = rss_mib()
    t0, cpu0 = time.perf_counter(), time.process_time()
    item = sliding.predict(checkpoint, scene, out)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    h, w = item["properties"]["proj:shape"]
    return {
        "pixels": h * w,
        "seconds": seconds,
        "px_per_s": h * w / seconds,
        "cpu_s": cpu_s,
        "px_per_cpu_s": h * w / cpu_s,
        "windows": item["properties"]["geoseg:windows"],
        "baseline_rss_mib": baseline,
        "peak_rss_mib": peak_rss_mib(),
    }


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "GDAL_CACHEMAX": os.environ.get("GDAL_CACHEMAX", f"{sliding.GDAL_CACHE_BYTES} (predict's)"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sides", type=int, nargs="+", default=[4096, 16384], help="scene sides, px")
    p.add_argument("--widths", type=int, nargs=4, default=[4, 8, 16, 32], help="U-Net widths")
    p.add_argument("--work", type=Path, help="folder for scenes (reused) [a temporary one]")
    p.add_argument("--json", type=Path, default=RESULTS / "predict.json", help="results file")
    p.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="geoseg-bench-predict-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = work / "unet.ckpt"
        make_checkpoint(checkpoint, args.widths)
        runs = []
        for side in args.sides:
            scene = work / f"scene-{side}.tif"
            if not scene.is_file():
                t0 = time.perf_counter()
                make_scene(scene, side)
                print(f"made {scene.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            cmd = [sys.executable, __file__, "--child", str(checkpoint), str(scene),
                   str(work / f"pred-{side}.tif")]  # fmt: skip
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
            runs.append({"side": side, **result})
            print(f"{side}² done: {result['seconds']:.0f} s", file=sys.stderr)
            save(args.json, runs, args.widths)  # after every scene: a long run keeps its results
    print(
        "| scene | windows | wall s | Mpx/s | CPU s | Mpx/CPU-s | RSS after load MiB | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['side']}² | {r['windows']} | {r['seconds']:.1f} | {r['px_per_s'] / 1e6:.2f} "
            f"| {r['cpu_s']:.0f} | {r['px_per_cpu_s'] / 1e6:.2f} "
            f"| {r['baseline_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
        )


def save(path: Path, runs: list[dict[str, Any]], widths: list[int]) -> None:
    """Write the results; runs of other sides with the same settings already there are kept."""
    settings = {"tile": TILE, "overlap": 0.25, "batch_size": 4, "unet_widths": widths,
                "column_block": sliding.COLUMN_BLOCK}  # fmt: skip
    old = json.loads(path.read_text()) if path.is_file() else {}
    sides = {r["side"] for r in runs}
    kept = [
        r for r in old.get("runs", []) if old["settings"] == settings and r["side"] not in sides
    ]
    runs = sorted(kept + runs, key=lambda r: r["side"])
    payload = {"machine": machine(), "settings": settings, "runs": runs}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
