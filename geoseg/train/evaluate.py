"""`geoseg evaluate`: a checkpoint's metrics on one split of a build, as the paper reports them.

The images are normalised with the *checkpoint's* mean/std, not the build's: a model is only
valid under the statistics it was trained with, which may come from another build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader

from geoseg.datasets.n3c import N3CCalifornia, collate
from geoseg.datasets.points import PointConfig
from geoseg.device import AUTO, resolve_device
from geoseg.train.card import add_metrics, card_run, metrics_entry, read_card
from geoseg.train.config import DataError
from geoseg.train.metrics import (
    ConfusionMatrix,
    majority_baseline,
    predict_labels,
    protocol_metrics,
    save_confusion,
)
from geoseg.train.task import load_model, update_point_confusion
from geoseg.train.tta import contract_tta, forward


def _dataset(data: Path, split: str, contract: dict[str, Any]) -> N3CCalifornia:
    """The split read as the contract prescribes; a different pixel size is refused."""
    try:
        dataset = N3CCalifornia(
            data, split, contract["bands"], PointConfig(**contract["points"]), contract["seed"],
            mean_std=(contract["mean"], contract["std"]), score_points=True,
        )  # fmt: skip
        gsd = pd.read_parquet(data / "index.parquet", columns=["split", "gsd"])
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(str(exc)) from None
    gsds = sorted(set(gsd.loc[gsd["split"] == split, "gsd"]))
    if gsds != [contract["gsd"]]:
        raise DataError(f"{data} split {split!r} has gsd {gsds} m; model expects {contract['gsd']}")
    return dataset


def benchmark_metrics(
    data: Path, cm: ConfusionMatrix, class_names: list[str]
) -> dict[str, Any] | None:
    """The build's own benchmark scores (its protocol.json, written by `geoseg prepare`), or
    None for builds without one."""
    path = data / "protocol.json"
    if not path.is_file():
        return None
    protocol = json.loads(path.read_text())
    try:
        scores = protocol_metrics(protocol, cm, class_names)
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path}: {exc}") from None
    return {"name": protocol["name"], **scores}


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    split: str,
    out: str | Path,
    batch_size: int = 2,
    device: str = AUTO,
    tta: bool | None = None,
) -> dict[str, Any]:
    """Write OUT/metrics.json and confusion matrices (JSON + PNG) for pixels (and points), and
    add the split's scores to the model card of the checkpoint's run when there is one.

    `tta`: average the 8 dihedral views (`geoseg.train.tta`); None = the checkpoint's default.
    Scores made another way than the run's default are carded under "SPLIT (tta)" or
    "SPLIT (no tta)", so they never replace the run's own.

    Pixel metrics are the headline (the paper's), with a constant-map baseline beside them;
    point models also get point metrics, over every point of the tiles.
    Unlabeled targets are excluded by `ConfusionMatrix`; `device` as in `resolve_device`.
    Returns the metrics.json payload.
    """
    data, out = Path(data), Path(out)
    run_on = resolve_device(device)
    model, contract = load_model(checkpoint)
    use_tta = contract_tta(contract, tta)
    dataset = _dataset(data, split, contract)
    model.to(run_on)
    if run_on.type == "cuda":
        model.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    names = list(contract["class_names"])
    pixels, points = ConfusionMatrix(len(names)), ConfusionMatrix(len(names))
    with (
        torch.inference_mode(),
        torch.autocast(run_on.type, torch.bfloat16, enabled=run_on.type == "cuda"),
    ):
        for batch in loader:
            batch = move_data_to_device(batch, run_on)
            inputs = {"image": batch["image"], "points": batch["points"]}
            output = forward(model, inputs, use_tta)  # type: ignore[arg-type]
            pixels.update(predict_labels(output["logits"]), batch["mask"])
            if output["point_logits"] is not None:
                update_point_confusion(points, output["point_logits"], batch)
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "split": split,
        "tiles": len(dataset),
        "model": contract["model"],
        "tta": use_tta,
        "pixels": save_confusion(pixels, out / "confusion.json", out / "confusion.png", names),
        "points": None,
        "protocol": benchmark_metrics(data, pixels, names),
    }
    if points.matrix.sum() > 0:
        payload["points"] = save_confusion(
            points, out / "points_confusion.json", out / "points_confusion.png", names
        )
    for kind in ("pixels", "points", "protocol"):
        if payload[kind] is not None:  # NaN (e.g. a class absent from the split) -> null
            payload[kind] = {
                k: None if isinstance(v, float) and np.isnan(v) else v
                for k, v in payload[kind].items()
            }
    run = card_run(Path(checkpoint))
    card = read_card(run) if run is not None else None
    payload["baseline"] = _baseline(pixels, card, names)
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    if card is not None:
        same = Path(card["data"]["path"]) == data.resolve()
        entry = metrics_entry(
            card, pixels.matrix, points.matrix, Path(checkpoint).name,
            tiles=len(dataset), data=str(data.resolve()), tta=use_tta,
        )  # fmt: skip
        key = split if same else f"{split} ({data.resolve().name})"
        if use_tta != contract_tta(contract, None):
            key += " (tta)" if use_tta else " (no tta)"
        add_metrics(run, key, entry)
    return payload


def _baseline(
    pixels: ConfusionMatrix, card: dict[str, Any] | None, names: list[str]
) -> dict[str, Any]:
    """Pixel scores of a constant map, beside the model's: of the training majority class when
    the run's model card names it, else of this split's own most frequent class."""
    if card is not None:
        label, source = names.index(card["majority_class"]), "training majority class"
    else:
        label, source = int(pixels.matrix[1:].sum(1).argmax()) + 1, "this split's majority class"
    scores = majority_baseline(pixels, label, names)
    return {"predicts": names[label], "source": source} | {
        k: None if np.isnan(scores[k]) else scores[k] for k in ("miou", "oa", "kappa")
    }
