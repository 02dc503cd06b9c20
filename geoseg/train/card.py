"""Model cards (contracts.md #2): RUN/model_card.json for programs, RUN/model_card.md for people.

A checkpoint alone says how to feed a model (the contract), not whether to trust it. The card
says what it was trained on (build, splits, class mix), how well it does on which split and
against which trivial baseline, and what it is not meant for. `geoseg train` writes it when the
run starts and refreshes it at every new best validation and at the end; `geoseg evaluate`
adds the split it scored. It is plain JSON, so the QGIS plugin reads it without torch.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from geoseg.train.metrics import majority_baseline, metrics

CARD_FORMAT = "geoseg-model-card/1"
CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _clean(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (DataLoader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def split_scores(
    matrix: Any, class_names: Sequence[str], majority: int | None = None
) -> dict[str, Any]:
    """miou, oa, kappa and per-class iou of a confusion matrix (NaN -> None), plus the same
    for a constant map of the `majority` class when given (the chance level beside them)."""
    scores = metrics(matrix, class_names)
    out: dict[str, Any] = {k: _clean(scores[k]) for k in ("miou", "oa", "kappa")}
    out["iou"] = {name: _clean(scores[f"iou/{name}"]) for name in class_names[1:]}
    if majority is not None:
        base = majority_baseline(matrix, majority, class_names)
        out["baseline"] = {"predicts": class_names[majority]} | {
            k: _clean(base[k]) for k in ("miou", "oa", "kappa")
        }
    return out


def metrics_entry(
    card: dict[str, Any], pixels: Any, points: Any | None, checkpoint: str, **extra: Any
) -> dict[str, Any]:
    """One split's card metrics: pixel scores at the top (the headline), points nested, each
    with the card's majority-class baseline; `extra` (tiles, step, ...) is recorded as is."""
    names = [c["name"] for c in card["classes"]]
    majority = names.index(card["majority_class"])
    entry = split_scores(pixels, names, majority)
    has_points = points is not None and float(np.asarray(points)[1:].sum()) > 0
    entry["points"] = split_scores(points, names, majority) if has_points else None
    return entry | {"checkpoint": checkpoint, **extra, "evaluated": _now()}


def build_info(data: Path) -> dict[str, Any]:
    """Where the training data came from: the build folder and its build.yaml's search."""
    info: dict[str, Any] = {"path": str(data.resolve())}
    build = data / "build.yaml"
    if build.is_file():
        cfg = yaml.safe_load(build.read_text()) or {}
        info |= {k: cfg.get(k) for k in ("catalog", "region", "datetime", "stac_url")}
    return info


def label_source(data: Path) -> str:
    """Where the build's labels come from: a benchmark's reference (`geoseg prepare` builds
    name it in protocol.json) or, for `build-dataset` builds, the LiDAR's own classification."""
    protocol = data / "protocol.json"
    if protocol.is_file():
        spec = json.loads(protocol.read_text())
        return (
            f"Labels are the {spec['name']} benchmark's reference ({spec.get('reference', '')}); "
            "scores are comparable with the benchmark's only on its test split and protocol."
        )
    return (
        "Labels are LiDAR ASPRS classes rasterised per pixel, not a land-cover survey: they "
        "inherit the classification's errors, and pixels without a LiDAR point are unlabeled "
        "and unscored."
    )


def new_card(
    contract: dict[str, Any],
    data: Path,
    tile_counts: dict[str, int],
    train_stats: dict[str, Any],
    needs_points: bool,
    intended_use: str,
    limits: list[str],
) -> dict[str, Any]:
    """A card without metrics, from the model contract and the build it trains on."""
    pixels = train_stats["pixels"]
    real = contract["class_names"][1:]
    absent = [name for name in real if not pixels.get(name)]
    derived = [
        f"Trained on {tile_counts.get('train', 0)} tiles at {contract['gsd']} m "
        f"({', '.join(contract['bands'])}); other pixel sizes, bands or sensors are outside "
        "what it has seen.",
        label_source(data),
    ]
    if absent:
        derived.append(f"No training pixels of: {', '.join(absent)}; it cannot have learnt them.")
    if needs_points:
        derived.append("Needs the scene's LiDAR points (COPC/LAZ) as well as the image.")
    if contract["model_kwargs"].get("point_vote"):
        derived.append(
            "Point vote: a pixel under a LiDAR point takes half its class probabilities from the "
            "point branch, so the map there follows the LiDAR; where the LiDAR is sparse the "
            "image decides, and where it is older than the image the map shows the LiDAR's date."
        )
    return {
        "format": CARD_FORMAT,
        "model": contract["model"],
        "model_kwargs": contract["model_kwargs"],
        "data": build_info(data),
        "splits": tile_counts,
        "train_pixels": {name: int(pixels.get(name, 0)) for name in real},
        "majority_class": max(real, key=lambda name: pixels.get(name, 0)),
        "classes": [
            {"value": i, "name": name, "color": list(contract["class_colors"][i])}
            for i, name in enumerate(contract["class_names"])
        ],
        "bands": list(contract["bands"]),
        "gsd": contract["gsd"],
        "tile_size": contract["tile_size"],
        "needs_points": needs_points,
        "tta": bool(contract.get("tta", False)),
        "metrics": {},
        "training": {},
        "intended_use": intended_use,
        "limits": [*limits, *derived],
        "seed": contract["seed"],
        "created": _now(),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }


def read_card(run: Path) -> dict[str, Any] | None:
    path = run / CARD_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def write_card(run: Path, card: dict[str, Any]) -> None:
    """Write model_card.json and model_card.md (each through a temporary file and a rename)."""
    run.mkdir(parents=True, exist_ok=True)
    for name, text in ((CARD_JSON, json.dumps(card, indent=2) + "\n"), (CARD_MD, markdown(card))):
        tmp = run / f".{name}.{os.getpid()}.tmp"  # DDP ranks may write at once
        tmp.write_text(text)
        tmp.replace(run / name)


def card_run(checkpoint: Path) -> Path | None:
    """The run folder whose card describes `checkpoint` (RUN/checkpoints/X.ckpt), if any."""
    run = Path(checkpoint).resolve().parent.parent
    return run if (run / CARD_JSON).is_file() else None


def add_metrics(run: Path, split: str, entry: dict[str, Any]) -> None:
    """Record one split's metrics in the run's card (replacing that split's previous entry)."""
    card = read_card(run)
    if card is None:
        return
    card["metrics"][split] = entry
    write_card(run, card)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(card: dict[str, Any]) -> str:
    """The human card: what, on which data, how good against a constant map, and limits."""
    data = card["data"]
    source = ", ".join(f"{k} {v}" for k, v in data.items() if k != "path" and v)
    lines = [
        f"# Model card: {card['model']}",
        "",
        f"- created {card['created']}, seed {card['seed']}",
        f"- data: `{data['path']}`" + (f" ({source})" if source else ""),
        "- tiles: " + ", ".join(f"{k} {v}" for k, v in card["splits"].items()),
        f"- input: bands {', '.join(card['bands'])}, {card['gsd']} m pixels, "
        f"{card['tile_size']} px tiles" + (", plus LiDAR points" if card["needs_points"] else ""),
        "- classes: " + ", ".join(c["name"] for c in card["classes"][1:]),
        "- prediction: "
        + (
            "mean over each tile's 8 flips and quarter turns (test-time augmentation; "
            "`--no-tta` turns it off)"
            if card.get("tta")
            else "one forward pass per tile (`--tta` averages its 8 flips and quarter turns)"
        )
        + (
            "; on pixels under a LiDAR point, the image's class probabilities are averaged with"
            " the point branch's for the pixel's highest point (point vote)"
            if card.get("model_kwargs", {}).get("point_vote")
            else ""
        ),
        "- training pixels: " + ", ".join(f"{k} {v:,}" for k, v in card["train_pixels"].items()),
    ]
    training = card.get("training") or {}
    if training:
        lines.append(
            "- training: "
            + ", ".join(f"{k} {v}" for k, v in training.items() if not isinstance(v, dict))
        )
    lines += ["", "## Intended use", "", card["intended_use"], "", "## Metrics", ""]
    if not card["metrics"]:
        lines.append("Not evaluated yet (`geoseg evaluate` adds each split it scores).")
    else:
        real = [c["name"] for c in card["classes"][1:]]
        lines += [
            "Pixels; the baseline is a constant map of the training majority class "
            f"({card['majority_class']}).",
            "",
            "| split | checkpoint | mIoU | OA | kappa | " + " | ".join(f"IoU {c}" for c in real)
            + " | baseline mIoU | baseline OA |",
            "|---|---|---:|---:|---:|" + "---:|" * len(real) + "---:|---:|",
        ]  # fmt: skip
        for split, m in card["metrics"].items():
            base = m.get("baseline") or {}
            lines.append(
                f"| {split} | {m['checkpoint']} | {_fmt(m['miou'])} | {_fmt(m['oa'])} | "
                f"{_fmt(m['kappa'])} | "
                + " | ".join(_fmt(m["iou"].get(c)) for c in real)
                + f" | {_fmt(base.get('miou'))} | {_fmt(base.get('oa'))} |"
            )
        points = {s: m["points"] for s, m in card["metrics"].items() if m.get("points")}
        if points:
            lines += ["", "Points (every point of the tiles once):", ""]
            lines += [
                f"- {s}: mIoU {_fmt(p['miou'])}, OA {_fmt(p['oa'])}, kappa {_fmt(p['kappa'])}"
                for s, p in points.items()
            ]
    lines += ["", "## Limits", ""] + [f"- {item}" for item in card["limits"]]
    return "\n".join(lines) + "\n"
