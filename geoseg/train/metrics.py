"""Confusion-matrix metrics over the real classes 1..K-1, as in the authors' `semseg_metric.py`.

The matrix is indexed by label value, cm[target, predicted], K = the build's class count (label
0 included; `class_names` from the model contract; N3C's when not given). Targets of
class 0 ("unlabeled") are dropped, so row 0 stays empty; a *prediction* of class 0 on a
labelled sample is kept in column 0 and counts as a miss for the target class (it is never a
hit for any class). `predict_labels` never predicts 0, so with it column 0 stays empty too.

NaN conventions: a per-class score whose denominator is 0 is NaN (IoU and F1 of a class neither
present nor predicted, Acc of a class absent from the targets); means are NaN-means over the
classes that have a value; OA and kappa of an empty matrix, and kappa when chance agreement is
1 (a single class everywhere), are NaN.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from geoseg.classes import N3C, UNLABELED


def predict_labels(logits: Tensor, dim: int = 1) -> Tensor:
    """Arg-max over the real classes only: the class-0 score is never trained, never predicted."""
    return logits.narrow(dim, 1, logits.shape[dim] - 1).argmax(dim) + 1


class ConfusionMatrix:
    """Accumulates cm[target, predicted] (int64, K×K) over pixels or points of many batches."""

    def __init__(self, num_classes: int = len(N3C)) -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor | np.ndarray, target: Tensor | np.ndarray) -> None:
        """Add predicted and target labels of equal shape (any layout: pixels or points)."""
        pred_t = torch.as_tensor(pred).reshape(-1).to("cpu", torch.int64)
        target_t = torch.as_tensor(target).reshape(-1).to("cpu", torch.int64)
        if pred_t.shape != target_t.shape:
            raise ValueError(
                f"pred and target sizes differ: {pred_t.numel()} vs {target_t.numel()}"
            )
        k = self.num_classes
        keep = target_t != UNLABELED
        pred_t, target_t = pred_t[keep], target_t[keep]
        labels = torch.cat([pred_t, target_t])
        if labels.numel() and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"labels must lie in [0, {k})")
        self.matrix += torch.bincount(target_t * k + pred_t, minlength=k * k).reshape(k, k)

    def update_counts(self, pred: Tensor, counts: Tensor) -> None:
        """Add point predictions (..., N) scored against label counts (..., N, K): sample i adds
        counts[i, t] to cm[t, pred[i]], so one prediction scores all the points it stands for
        (`geoseg.datasets.points.label_counts`) and padded duplicates (zero counts) none."""
        k = self.num_classes
        pred_t = torch.as_tensor(pred).reshape(-1).to("cpu", torch.int64)
        counts_t = torch.as_tensor(counts).reshape(-1, k).to("cpu", torch.int64)
        if pred_t.numel() != counts_t.shape[0]:
            raise ValueError(f"{pred_t.numel()} predictions for {counts_t.shape[0]} count rows")
        if pred_t.numel() and (pred_t.min() < 0 or pred_t.max() >= k):
            raise ValueError(f"labels must lie in [0, {k})")
        counts_t[:, UNLABELED] = 0
        self.matrix.index_add_(1, pred_t, counts_t.T.contiguous())

    def reset(self) -> None:
        """Start a new epoch."""
        self.matrix.zero_()


def _as_array(cm: ConfusionMatrix | Tensor | np.ndarray) -> np.ndarray:
    matrix = cm.matrix if isinstance(cm, ConfusionMatrix) else cm
    return np.asarray(torch.as_tensor(matrix).cpu(), dtype=np.float64)


def metrics(
    cm: ConfusionMatrix | Tensor | np.ndarray, class_names: Sequence[str] = N3C.names
) -> dict[str, float]:
    """Per-class iou/<name>, f1/<name>, acc/<name> (classes 1..K-1) and miou, mf1, macc, oa, kappa.

    Flat float keys so the dict goes straight into a logger. Acc is the per-class recall.
    """
    m = _as_array(cm)
    m[UNLABELED, :] = 0  # unlabeled targets never count, even in a hand-built matrix
    tp = np.diag(m)[1:]
    rows = m.sum(1)[1:]  # labelled samples of each class
    cols = m.sum(0)[1:]  # predictions of each class
    n = m.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (rows + cols - tp)
        f1 = 2 * tp / (rows + cols)
        acc = tp / rows
        oa = np.trace(m) / n
        chance = (m.sum(1) * m.sum(0)).sum() / n**2
        kappa = (oa - chance) / (1 - chance) if chance != 1 else float("nan")
    out: dict[str, float] = {}
    for name, values in (("iou", iou), ("f1", f1), ("acc", acc)):
        for cls, value in zip(class_names[1:], values, strict=True):
            out[f"{name}/{cls}"] = float(value)
    for name, values in (("miou", iou), ("mf1", f1), ("macc", acc)):
        out[name] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
    out["oa"] = float(oa)
    out["kappa"] = float(kappa)
    return out


def majority_baseline(
    cm: ConfusionMatrix | Tensor | np.ndarray, label: int, class_names: Sequence[str] = N3C.names
) -> dict[str, float]:
    """`metrics` of a constant map predicting `label` on the targets of `cm`: the chance level
    to show beside a model's scores (label = the train split's most frequent class)."""
    m = _as_array(cm)
    constant = np.zeros_like(m)
    constant[:, label] = m.sum(1)
    return metrics(constant, class_names)


def save_confusion(
    cm: ConfusionMatrix | Tensor | np.ndarray,
    path_json: str | Path,
    path_png: str | Path,
    class_names: Sequence[str] = N3C.names,
) -> dict[str, float]:
    """Write the matrix with its metrics as JSON and a row-normalised heat map PNG; return them.

    Rows are the target classes 1..K-1; columns all K predicted labels (column 0 = predicted
    "unlabeled", empty when using `predict_labels`). The PNG is drawn on a bare `Figure` (Agg
    canvas), so no pyplot backend or display is involved.
    """
    m = _as_array(cm)
    scores = metrics(m, class_names)
    counts = m[1:].astype(np.int64)
    payload = {
        "rows": "target",
        "columns": "predicted",
        "target_classes": list(class_names[1:]),
        "predicted_classes": list(class_names),
        "matrix": counts.tolist(),
        "metrics": {k: (None if np.isnan(v) else v) for k, v in scores.items()},
    }
    Path(path_json).write_text(json.dumps(payload, indent=2) + "\n")

    totals = counts.sum(1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig = Figure(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names)))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of target row")
    for (r, c), value in np.ndenumerate(counts):
        color = "white" if share[r, c] > 0.5 else "black"
        ax.text(
            c, r, f"{share[r, c]:.2f}\n{value:,}", ha="center", va="center", color=color, fontsize=8
        )
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names) - 1), class_names[1:])
    ax.set_xlabel("predicted")
    ax.set_ylabel("target")
    ax.set_title(f"mIoU {scores['miou']:.3f}  OA {scores['oa']:.3f}  kappa {scores['kappa']:.3f}")
    fig.tight_layout()
    fig.savefig(path_png, dpi=100)
    return scores


def isprs_2d_metrics(
    cm: ConfusionMatrix | Tensor | np.ndarray,
    class_names: Sequence[str],
    excluded: Sequence[str] = ("clutter",),
) -> dict[str, float]:
    """The ISPRS 2D labelling benchmark's scores: OA over every labelled pixel, F1 per class,
    and mean F1 / mIoU over the classes not `excluded` (clutter is commonly left out of means).

    Computed on whatever reference the matrix was filled from; with `geoseg prepare vaihingen`
    builds that is the eroded (no-boundary) reference the benchmark scores with.
    """
    scores = metrics(cm, class_names)
    kept = [n for n in class_names[1:] if n not in set(excluded)]
    out = {"oa": scores["oa"]}
    out |= {f"f1/{n}": scores[f"f1/{n}"] for n in class_names[1:]}
    out |= {f"iou/{n}": scores[f"iou/{n}"] for n in class_names[1:]}
    for key, prefix in (("mf1", "f1"), ("miou", "iou")):
        values = np.array([out[f"{prefix}/{n}"] for n in kept])
        out[key] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
    return out


def dfc2018_metrics(
    cm: ConfusionMatrix | Tensor | np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    """The 2018 GRSS Data Fusion Contest's scores: overall accuracy, average accuracy (mean
    per-class recall over the classes in the reference) and Cohen's kappa."""
    scores = metrics(cm, class_names)
    out = {"oa": scores["oa"], "aa": scores["macc"], "kappa": scores["kappa"]}
    return out | {f"acc/{n}": scores[f"acc/{n}"] for n in class_names[1:]}


def protocol_metrics(
    protocol: dict, cm: ConfusionMatrix | Tensor | np.ndarray, class_names: Sequence[str]
) -> dict[str, float]:
    """The scores a benchmark's protocol.json (`geoseg prepare`) prescribes."""
    name = protocol["name"]
    if name == "isprs-2d-labelling":
        return isprs_2d_metrics(cm, class_names, protocol.get("excluded_from_means", ()))
    if name == "dfc2018":
        return dfc2018_metrics(cm, class_names)
    raise ValueError(f"unknown protocol {name!r}; known: isprs-2d-labelling, dfc2018")
