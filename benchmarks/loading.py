"""Training read throughput: TorchGeo on-the-fly `naip & dem` vs our tiles vs our training cache.

Samples/s of 512×512 image (R, G, B, NIR) + DEM samples as float32 (B, 5, 512, 512) batches of 8,
over the same area and number of samples per epoch, for num_workers 0 and 2:

  (a) TorchGeo 0.8.1: `NAIPLike & DEMLike` IntersectionDataset + RandomGeoSampler; the NAIP-like
      mosaic is a 4-band uint8 COG in EPSG:26910 at 1 m, the DEM a float32 COG in EPSG:3310 at 2 m,
      warped on the fly (as in shared/reference/measurements.md §4);
  (b) our per-tile DEFLATE COGs (image.tif + dsm.tif, the builder's own writer), opened per sample;
  (c) geoseg.datasets.TileCacheDataset on the training cache of the same tiles;
      (c') the same plus the label as an int64 mask.

(b) and (c) also normalise with stats.json; (a) returns raw values (so it does less work).
A last table splits a cached batch's time into the normalising copy and first touches of fresh
memory, the shared memory that carries a worker's batch to the main process included.
The data are synthetic but shaped like the real thing: smooth random fields + pixel noise
(DEFLATE ratio close to real NAIP), written with the dataset layout of `geoseg build-dataset`
(tiles/<id>/{image,label,dsm}.tif + tile.json, index.parquet, stats.json). The sample build's
tiles are 64 px; real 512² tiles with full coverage are what the read path must be sized for.

Each epoch is timed end to end (num_workers=2: worker start-up included; "persistent": workers
kept across epochs). 1 warm-up + `--epochs` timed epochs; median [min–max]. GDAL_CACHEMAX=64 MB
so GDAL's block cache cannot hold the mosaic, as with a real dataset. Inputs sit in the page
cache: this measures decode/copy, not disk. The dev machine is shared, so each result records
the share of the CPUs other processes used meanwhile, and is measured again (`--retries`) when
that exceeds 10%.

    .venv/bin/python benchmarks/loading.py            # ≈ 2.5 min on 2 idle cores
    .venv/bin/python benchmarks/loading.py --quick    # ≈ 30 s smoke test, not for the table:
                                                      # its 4x4-tile area fits GDAL's cache
"""

from __future__ import annotations

import os

os.environ.setdefault("GDAL_CACHEMAX", "64")  # before GDAL starts: MB, as in measurements.md §4

import argparse
import contextlib
import io
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import torch
import torch.nn.functional as F
import torchgeo
from machine import cpu_info, cpu_model
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.shutil import copy as rio_copy
from rasterio.transform import from_origin
from rasterio.warp import reproject, transform_bounds
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchgeo.datasets import RasterDataset, stack_samples
from torchgeo.samplers import RandomGeoSampler

from geoseg.builder.grid import TileSpec
from geoseg.builder.writers import IMAGE_COLORINTERP, sha256, write_cog, write_json
from geoseg.datasets import TileCacheDataset, build_cache

TILE = 512
GSD = 1.0
BATCH = 8
EPSG, DEM_EPSG, DEM_RES = 26910, 3310, 2.0
COL0, ROW0 = 1231, 8360  # near Sacramento, like measurements.md §3
FLOAT_NODATA = -9999.0
RESULTS = Path(__file__).parent / "results"
BUSY = 0.1  # other processes used more than this share of the CPUs during a measurement


# ---------------------------------------------------------------- synthetic data, seeded


def smooth_field(rng: np.random.Generator, height: int, width: int, scales: list[int]):
    """Sum of bicubically upsampled noise octaves (cells of `scales` px); unit-ish amplitude."""
    out = torch.zeros(1, 1, height, width)
    for cell in scales:
        low = torch.from_numpy(
            rng.standard_normal((1, 1, height // cell + 3, width // cell + 3), np.float32)
        )
        up = F.interpolate(low, scale_factor=cell, mode="bicubic", align_corners=False)
        out += up[..., cell : cell + height, cell : cell + width]
    return (out[0, 0] / len(scales) ** 0.5).numpy()


def make_dataset(root: Path, side: int, seed: int) -> None:
    """A `side`×`side` tile area: NAIP-like mosaic + 3310 DEM for TorchGeo, tiles for geoseg."""
    rng = np.random.default_rng(seed)
    size = side * TILE
    crs = CRS.from_epsg(EPSG)
    left, top = COL0 * TILE * GSD, (ROW0 + side) * TILE * GSD
    transform = from_origin(left, top, GSD, GSD)
    bounds = (left, top - size * GSD, left + size * GSD, top)

    veg = smooth_field(rng, size, size, [512, 128, 32])
    light = smooth_field(rng, size, size, [256, 64, 16, 4])
    image = np.empty((4, size, size), np.uint8)
    for b, (base, k_veg, k_light) in enumerate(
        [(95, -25, 25), (100, -12, 20), (90, -15, 18), (120, 35, 12)]
    ):
        band = base + k_veg * veg + k_light * light + rng.normal(0, 6, (size, size))
        image[b] = np.clip(band, 1, 255).astype(np.uint8)  # 0 is nodata
    del light

    # DEM in another CRS and resolution (TorchGeo warps it on the fly; the tiles get it once)
    dem_crs = CRS.from_epsg(DEM_EPSG)
    dl, db, dr, dt = transform_bounds(crs, dem_crs, *bounds)
    dl, db, dr, dt = dl - 100, db - 100, dr + 100, dt + 100
    dw, dh = int((dr - dl) / DEM_RES), int((dt - db) / DEM_RES)
    dem_transform = from_origin(dl, dt, DEM_RES, DEM_RES)
    terrain = (
        1500
        + 200 * smooth_field(rng, dh, dw, [1024, 256])
        + 15 * smooth_field(rng, dh, dw, [64, 16])
    )
    canopy = np.clip(25 * smooth_field(rng, dh, dw, [8, 4]), 0, None)
    dem = (terrain + canopy + rng.normal(0, 0.3, (dh, dw))).astype(np.float32)
    dsm = np.empty((size, size), np.float32)
    reproject(
        dem,
        dsm,
        src_transform=dem_transform,
        src_crs=dem_crs,
        dst_transform=transform,
        dst_crs=crs,
        resampling=Resampling.bilinear,
        dst_nodata=FLOAT_NODATA,
    )
    label = np.where(veg > 0.4, 3, 2).astype(np.uint8)
    label[(dsm - np.median(dsm)) > 250] = 1
    label[image[3] < 80] = 4
    del veg

    for name, data, tf, c, nodata in (
        ("naip/naip_mosaic.tif", image, transform, crs, 0),
        ("dem/dem.tif", dem[None], dem_transform, dem_crs, FLOAT_NODATA),
    ):
        _write_big_cog(root / "torchgeo" / name, data, tf, c, nodata)

    wkt = crs.to_wkt()
    specs = [
        TileSpec(wkt, EPSG, COL0 + i, ROW0 + side - 1 - j, GSD, TILE)
        for j in range(side)
        for i in range(side)
    ]

    def write_tile(spec: TileSpec) -> dict[str, Any]:
        j, i = (ROW0 + side - 1 - spec.row) * TILE, (spec.col - COL0) * TILE
        window = np.s_[j : j + TILE, i : i + TILE]
        folder = root / "dataset" / "tiles" / spec.id
        write_cog(
            folder / "image.tif",
            image[(slice(None), *window)],
            spec,
            nodata=0,
            descriptions=["red", "green", "blue", "nir"],
            colorinterp=IMAGE_COLORINTERP,
        )
        write_cog(folder / "label.tif", label[window], spec, nodata=0, descriptions=["label"])
        write_cog(folder / "dsm.tif", dsm[window], spec, nodata=FLOAT_NODATA, descriptions=["dsm"])
        files = {
            n: {"size": (folder / n).stat().st_size, "sha256": sha256(folder / n)}
            for n in ("image.tif", "label.tif", "dsm.tif")
        }
        manifest = {
            "tile_id": spec.id,
            "synthetic_seed": seed,
            "files": files,
            "tile": {
                "epsg": EPSG,
                "col": spec.col,
                "row": spec.row,
                "gsd": GSD,
                "size": TILE,
                "bounds": spec.bounds,
            },
        }
        write_json(folder / "tile.json", manifest)
        return {
            "tile_id": spec.id,
            "split": "train",
            "epsg": EPSG,
            "gsd": GSD,
            "size": TILE,
            "xmin": spec.bounds[0],
            "ymin": spec.bounds[1],
            "xmax": spec.bounds[2],
            "ymax": spec.bounds[3],
            "path": f"tiles/{spec.id}",
            "geometry": spec.footprint_lonlat(),
        }

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        rows = list(pool.map(write_tile, specs))
    out = root / "dataset"
    gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326").to_parquet(
        out / "index.parquet", index=False
    )
    bands = {}
    for name, layer, values in [
        (n, "image", image[b]) for b, n in enumerate(["red", "green", "blue", "nir"])
    ] + [("dsm", "dsm", dsm)]:
        v = values.astype(np.float64)
        bands[name] = {
            "layer": layer,
            "mean": float(v.mean()),
            "std": float(v.std()),
            "count": int(v.size),
        }
    # every tile counts as train: the statistics training reads are the train split's
    stats = {"bands": bands, "splits": {"train": {"bands": bands}}, "synthetic_seed": seed}
    write_json(out / "stats.json", stats)


def _write_big_cog(path: Path, data: np.ndarray, transform, crs: CRS, nodata: float) -> None:
    """A scene-sized COG like NAIP / a 3DEP DEM: 512 blocks, DEFLATE, overviews."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.tif")
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
    }
    if data.shape[0] == 4:
        profile.update(photometric="RGB", alpha="UNSPECIFIED")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
        if data.shape[0] == 4:
            dst.colorinterp = [
                ColorInterp.red,
                ColorInterp.green,
                ColorInterp.blue,
                ColorInterp.undefined,
            ]
    rio_copy(
        tmp,
        path,
        driver="COG",
        BLOCKSIZE="512",
        COMPRESS="DEFLATE",
        PREDICTOR="3" if data.dtype.kind == "f" else "2",
        OVERVIEWS="AUTO",
        NUM_THREADS="ALL_CPUS",
    )
    tmp.unlink()


# ---------------------------------------------------------------- the three read paths


class NAIPLike(RasterDataset):
    filename_glob = "naip_mosaic.tif"
    is_image = True
    all_bands = ("R", "G", "B", "NIR")


class DEMLike(RasterDataset):
    filename_glob = "dem.tif"
    is_image = True  # the 5th image channel


class CogTiles(Dataset[dict[str, torch.Tensor]]):
    """(b) Plain per-tile reads: open image.tif + dsm.tif, decode, normalise like (c)."""

    def __init__(self, dataset: Path) -> None:
        self.tiles = sorted((dataset / "tiles").iterdir())
        bands = json.loads((dataset / "stats.json").read_text())["bands"]
        names = ["red", "green", "blue", "nir", "dsm"]
        std = np.array([bands[n]["std"] for n in names], np.float32)[:, None, None]
        self.scale, self.shift = (
            1 / std,
            np.array([-bands[n]["mean"] for n in names], np.float32)[:, None, None] / std,
        )

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        out = np.empty((5, TILE, TILE), np.float32)
        with rasterio.open(self.tiles[index] / "image.tif") as src:
            np.multiply(src.read(), self.scale[:4], out=out[:4])
        with rasterio.open(self.tiles[index] / "dsm.tif") as src:
            dsm = src.read()
            np.multiply(dsm, self.scale[4:], out=out[4:])
        out += self.shift
        out[4][dsm[0] == FLOAT_NODATA] = 0.0
        return {"image": torch.from_numpy(out)}


def loaders(
    root: Path, cache: Path, samples: int, seed: int
) -> dict[str, Callable[[int, bool], DataLoader]]:
    """DataLoader factories per pipeline, making fresh datasets (the fork gotcha of §4)."""
    dataset = root / "dataset"
    stats = dataset / "stats.json"

    def torchgeo_dl(nw: int, persistent: bool) -> DataLoader:
        with contextlib.redirect_stdout(io.StringIO()):  # "Converting DEMLike CRS ..." x 2
            ds = NAIPLike(paths=root / "torchgeo/naip") & DEMLike(paths=root / "torchgeo/dem")
        sampler = RandomGeoSampler(
            ds, size=TILE, length=samples, generator=torch.Generator().manual_seed(seed)
        )
        return DataLoader(
            ds,
            sampler=sampler,
            batch_size=BATCH,
            num_workers=nw,
            collate_fn=stack_samples,
            persistent_workers=persistent,
        )

    def tiles_dl(make_ds: Callable[[], Dataset], collate_fn=None):
        def make(nw: int, persistent: bool) -> DataLoader:
            ds = make_ds()
            sampler = RandomSampler(
                ds,
                replacement=True,
                num_samples=samples,
                generator=torch.Generator().manual_seed(seed),
            )
            return DataLoader(
                ds,
                sampler=sampler,
                batch_size=BATCH,
                num_workers=nw,
                persistent_workers=persistent,
                collate_fn=collate_fn,
            )

        return make

    def cached(mask: str | None) -> Callable[[], Dataset]:
        return lambda: TileCacheDataset(cache, stats, channels=("image", "dsm"), mask=mask)

    return {
        "(a) TorchGeo naip & dem, RandomGeoSampler": torchgeo_dl,
        "(b) per-tile COGs (image + dsm)": tiles_dl(lambda: CogTiles(dataset)),
        "(c) TileCacheDataset (image + dsm)": tiles_dl(cached(None), TileCacheDataset.collate),
        "(c') TileCacheDataset + int64 mask": tiles_dl(cached("label"), TileCacheDataset.collate),
    }


# ---------------------------------------------------------------- timing


def time_epochs(dl: DataLoader, epochs: int) -> dict[str, Any]:
    """samples/s of `epochs` timed full passes after a warm-up one, and the share of the CPUs
    that other processes used meanwhile (the dev machine is shared: a busy neighbour shows)."""
    rates = []
    for epoch in range(epochs + 1):
        if epoch == 1:
            wall, busy, own = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()
        t0 = time.perf_counter()
        n = 0
        for batch in dl:
            assert batch["image"].shape[1:] == (5, TILE, TILE), batch["image"].shape
            n += batch["image"].shape[0]
        if epoch:
            rates.append(n / (time.perf_counter() - t0))
    if dl.persistent_workers and dl._iterator is not None:
        dl._iterator._shutdown_workers()  # now, not by GC inside a later timing (measurements §4)
    other = (_busy_cpu_s() - busy) - (_own_cpu_s() - own)
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "epochs": rates,
        "other_cpu": max(other, 0.0) / ((time.perf_counter() - wall) * (os.cpu_count() or 1)),
    }


def _busy_cpu_s() -> float:
    """CPU seconds that all processes have spent busy, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def batch_costs(cache_ds: TileCacheDataset, reps: int = 15) -> dict[str, float]:
    """ms per batch of 8 512² 5-band float32 samples (42 MB): where a cached batch's time goes.

    The cache read itself is a normalising copy; what is left is first-touching fresh memory,
    above all the shared memory that carries each batch from a DataLoader worker to the main
    process, and whether that scales when 2 workers allocate at once.
    """
    nbytes = BATCH * 5 * TILE * TILE * 4
    out = np.empty((BATCH, 5, TILE, TILE), np.float32)
    image, dsm = cache_ds._open()["image"], cache_ds._open()["dsm"]

    def normalise_into_reused_buffer() -> None:
        for k in range(BATCH):
            np.multiply(image[k], cache_ds._scale[:4], out=out[k, :4])
            out[k, :4] += cache_ds._shift[:4]
            np.multiply(dsm[k], cache_ds._scale[4:], out=out[k, 4:])
            out[k, 4:] += cache_ds._shift[4:]

    costs = {
        "TileCacheDataset batch in the main process (nw=0)": _ms(
            lambda: cache_ds.__getitems__(range(BATCH)), reps
        ),
        "normalising copy into a reused buffer": _ms(normalise_into_reused_buffer, reps),
        "fresh memory, first touch: numpy (huge pages)": _fresh_ms("numpy", nbytes, reps),
        "fresh memory, first touch: torch.empty": _fresh_ms("torch", nbytes, reps),
        "fresh shared memory, first touch (a worker's batch)": _fresh_ms("shm", nbytes, reps),
    }
    with multiprocessing.get_context("fork").Pool(2) as pool:
        both = pool.starmap(_fresh_ms, [("shm", nbytes, reps)] * 2)
    costs["same, 2 worker processes at once (each)"] = statistics.mean(both)
    return costs


def _ms(fn: Callable[[], Any], reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def _fresh_ms(kind: str, nbytes: int, reps: int) -> float:
    """ms to allocate and fill `nbytes` of new memory of one kind."""
    alloc = {
        "numpy": lambda: np.empty(nbytes, np.uint8).fill(1),
        "torch": lambda: torch.empty(nbytes, dtype=torch.uint8).fill_(1),
        # numpy's fill: torch's parallel fill_ can hang in a forked child
        "shm": lambda: (
            torch.empty(0, dtype=torch.uint8)
            .set_(torch.UntypedStorage._new_shared(nbytes))
            .numpy()
            .fill(1)
        ),
    }[kind]
    return _ms(alloc, reps)


def machine() -> dict[str, Any]:
    info = cpu_info()
    cpu = f"{cpu_model()} (family {info.get('cpu family')}, model {info.get('model')})"
    thp = Path("/sys/kernel/mm/transparent_hugepage")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        # first-touch costs of batch memory depend on these (see batch_costs)
        "thp": {f: (thp / f).read_text().strip() for f in ("enabled", "shmem_enabled")}
        if thp.is_dir()
        else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchgeo": torchgeo.__version__,
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "numpy": np.__version__,
        "GDAL_CACHEMAX": os.environ["GDAL_CACHEMAX"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: 4x4 tiles, 64 samples/epoch")
    p.add_argument("--side", type=int, help="area: side × side tiles of 512² [12; quick 4]")
    p.add_argument("--samples", type=int, help="samples per epoch [256; quick 64]")
    p.add_argument("--epochs", type=int, help="timed epochs after the warm-up [3]")
    p.add_argument("--retries", type=int, default=3, help="re-measure a busy-machine result [3]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, help="data folder [<tmp>/geoseg-bench-loading-*]")
    p.add_argument("--json", type=Path, help="results file [benchmarks/results/loading.json]")
    args = p.parse_args(argv)
    side = args.side or (4 if args.quick else 12)
    samples = args.samples or (64 if args.quick else 256)
    epochs = args.epochs or 3
    root = args.data or Path(tempfile.gettempdir()) / f"geoseg-bench-loading-{side}-{args.seed}"
    out_json = args.json or RESULTS / ("loading-quick.json" if args.quick else "loading.json")

    if not (root / "dataset" / "stats.json").is_file():
        t0 = time.perf_counter()
        make_dataset(root, side, args.seed)
        print(f"generated {side}x{side} tiles in {root} ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    cache = build_cache(root / "dataset", "train", layers=("image", "dsm", "label"))
    print(f"training cache ready ({time.perf_counter() - t0:.1f} s)", flush=True)
    factories = loaders(root, cache, samples, args.seed)

    rows = []
    for name, factory in factories.items():
        row: dict[str, Any] = {"pipeline": name}
        for key, nw, persistent in (("nw0", 0, False), ("nw2", 2, False), ("nw2p", 2, True)):
            for attempt in range(args.retries + 1):  # measure again while neighbours are busy
                row[key] = time_epochs(factory(nw, persistent), epochs) | {"attempt": attempt}
                other = row[key]["other_cpu"]
                busy = other > BUSY
                print(
                    f"{name:45s} {key:5s} {_fmt(row[key])} samples/s; other processes used"
                    f" {other:.0%} of the CPUs{'  <- busy machine' if busy else ''}",
                    flush=True,
                )
                if not busy:
                    break
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["ratio"] = {k: row[k]["median"] / base[k]["median"] for k in ("nw0", "nw2", "nw2p")}

    print(
        f"\n512x512 image(4)+DEM float32 samples/s, batch {BATCH}, {samples} samples/epoch, "
        f"{side}x{side} tiles, median [min-max] of {epochs} epochs"
    )
    print("| pipeline | nw=0 | nw=2 | nw=2 persistent | ratio vs (a) nw=0 / nw=2 / persistent |")
    print("|---|---|---|---|---|")
    for row in rows:
        r = row["ratio"]
        print(
            f"| {row['pipeline']} | {_fmt(row['nw0'])} | {_fmt(row['nw2'])} | "
            f"{_fmt(row['nw2p'])} | {r['nw0']:.1f}× / {r['nw2']:.1f}× / {r['nw2p']:.1f}× |"
        )
    wall, busy, own = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()
    costs = batch_costs(TileCacheDataset(cache, root / "dataset" / "stats.json", mask=None))
    other = ((_busy_cpu_s() - busy) - (_own_cpu_s() - own)) / (
        (time.perf_counter() - wall) * (os.cpu_count() or 1)
    )
    print(
        f"\nwhere a cached batch's time goes (ms per batch of {BATCH}, 42 MB of float32;"
        f" other processes used {max(other, 0):.0%} of the CPUs)"
    )
    for what, ms in costs.items():
        print(f"| {what} | {ms:.1f} |")
    result = {
        "benchmark": "loading",
        "config": {
            "tile": TILE,
            "batch": BATCH,
            "samples_per_epoch": samples,
            "timed_epochs": epochs,
            "side_tiles": side,
            "seed": args.seed,
            "busy_threshold_other_cpu": BUSY,
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        },
        "machine": machine(),
        "results": rows,
        "batch_costs_ms": costs | {"other_cpu": max(other, 0.0)},
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out_json}")


def _fmt(r: dict[str, float]) -> str:
    return f"{r['median']:.1f} [{r['min']:.1f}–{r['max']:.1f}]"


if __name__ == "__main__":
    main()
