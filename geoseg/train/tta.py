"""Test-time augmentation (TTA): a model's prediction averaged over the 8 dihedral views of a tile.

Each view (`geoseg.datasets.points.View`: a left-right mirror, then quarter turns) moves the
image and the points together, exactly as training augmentation moves one tile: the image
turns, every level's point pixels move on their grid and the network's xyz turn with them.
The points keep their order and their neighbourhoods (a view is an isometry of xyz, so the
kNN, sub-sampling and interpolation indices stay valid). The model runs on every view; its
pixel class probabilities are mapped back to the tile by the inverse view and averaged, its
point probabilities averaged per point. Averaging over a whole group of views makes the
prediction equivariant: the TTA prediction of a turned tile is the turned TTA prediction.

Probabilities are the softmax over the real classes (the class-0 "unlabeled" score is never
trained nor predicted, `predict_labels`); the output's logits are their log, with class 0 at
the floor, so everything downstream (arg-max, the sliding window's blending) reads them as it
reads a model's logits. Costs one forward pass per view.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from geoseg.datasets.points import View
from geoseg.models.batch import (
    Batch,
    ModelOutput,
    class_probabilities,
    probabilities_as_logits,
)

VIEWS = tuple(View(flip, turns) for flip in (False, True) for turns in range(4))
"""The 8 dihedral views, the identity first."""


def view_batch(batch: Batch, view: View) -> Batch:
    """The batch under `view` (new tensors; `batch` is untouched): the image turned, every
    point level's pixels (on the image grid halved l times) and xyz moved alike."""
    image = view.apply(batch["image"])
    points = batch["points"]
    if points is None:
        return Batch(image=image, points=None)  # type: ignore[typeddict-item]
    height, width = batch["image"].shape[-2:]
    xyz = [level.clone() for level in points["xyz"]]
    pixels = [level.clone() for level in points["pixels"]]
    for level, (coords, cells) in enumerate(zip(xyz, pixels, strict=True)):
        view.xyz(coords)
        view.pixels(cells, (height // 2**level, width // 2**level))
    return Batch(image=image, points={**points, "xyz": xyz, "pixels": pixels})


def predict_views(model: nn.Module, batch: Batch, views: Sequence[View] = VIEWS) -> ModelOutput:
    """The model's output averaged over `views` (default: all 8): `logits` (B, K, H, W) and
    `point_logits` (B, N, K) are the log of the mean probabilities (see the module docstring);
    `gates` are None. `views=(View(),)` gives the plain prediction (its log-softmax)."""
    pixels: Tensor | None = None
    points: Tensor | None = None
    for view in views:
        out = model(view_batch(batch, view))
        probs = view.inverse.apply(class_probabilities(out["logits"], 1))
        pixels = probs if pixels is None else pixels + probs
        if out["point_logits"] is not None:
            point_probs = class_probabilities(out["point_logits"], 2)
            points = point_probs if points is None else points + point_probs
    assert pixels is not None, "no views"
    return ModelOutput(
        logits=probabilities_as_logits(pixels / len(views), 1),
        point_logits=None if points is None else probabilities_as_logits(points / len(views), 2),
        gates=None,
    )


def forward(model: nn.Module, batch: Batch, tta: bool) -> ModelOutput:
    """`predict_views(model, batch)` with `tta`, else the plain forward pass."""
    return predict_views(model, batch) if tta else model(batch)


def contract_tta(contract: dict, tta: bool | None) -> bool:
    """Whether to use TTA: `tta` when given, else the checkpoint's default (contract key `tta`,
    from the training config's `inference.tta`; False for checkpoints written before it)."""
    return bool(contract.get("tta", False)) if tta is None else tta
