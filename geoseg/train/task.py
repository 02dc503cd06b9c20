"""The Lightning module every geoseg model trains in, and the checkpoint contract it writes.

A checkpoint is only useful downstream (evaluation, prediction, the QGIS plugin) if it says how
to feed the model: which bands in which order, how they were normalised, at what pixel size,
which classes and colours, which point settings, and which model to rebuild. That is the
*model contract*, stored as plain data in `checkpoint["geoseg_contract"]` so `load_model` can
read it with `torch.load(weights_only=True)`: no pickled code runs when opening a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from geoseg.checkpoints import CONTRACT_KEY, CheckpointError
from geoseg.errors import first_line
from geoseg.models import create_model
from geoseg.train.losses import HolisticLoss
from geoseg.train.metrics import ConfusionMatrix, metrics, predict_labels

CONTRACT_FORMAT = "geoseg-model/1"
"""Version tag of the contract layout; bump it when keys change meaning."""


class SegmentationTask(L.LightningModule):
    """`create_model(model, **model_kwargs)` + `HolisticLoss` + confusion-matrix metrics.

    Logs `train_loss` (+ img/pc/sc terms) and, per validation/test epoch, `<stage>_loss` and
    every `metrics()` key of the pixel confusion matrix (`val_miou`, `val_iou/tree`, ...; point
    models also `<stage>_points_miou`/`_oa`, over every point of the tiles). Class weights
    arrive as plain lists so the hyper-parameters saved in the checkpoint stay
    weights_only-loadable.
    """

    def __init__(
        self,
        model: str,
        model_kwargs: dict[str, Any],
        pixel_weights: Sequence[float],
        point_weights: Sequence[float],
        contract: dict[str, Any],
        optim: dict[str, float] | None = None,
        loss: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(model, **model_kwargs)
        self.loss = HolisticLoss(
            torch.tensor(pixel_weights), torch.tensor(point_weights), **(loss or {})
        )
        self.optim = {"lr": 1e-3, "weight_decay": 0.0, "gamma": 0.9886, **(optim or {})}
        self.contract = contract
        self.class_names = list(contract["class_names"])
        k = len(self.class_names)
        self.confusion = {
            stage: {"pixels": ConfusionMatrix(k), "points": ConfusionMatrix(k)}
            for stage in ("val", "test")
        }
        self.epoch_matrices: dict[str, dict[str, Tensor]] = {}  # summed over ranks, per stage

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        image = batch["image"]
        if image.is_cuda:  # channels_last: the faster conv layout for bf16 on tensor cores
            image = image.contiguous(memory_format=torch.channels_last)
        return self.model({"image": image, "points": batch["points"]})

    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)

    def _loss(self, batch: dict[str, Any], output: dict[str, Any]) -> dict[str, Tensor]:
        pixels = batch["points"]["pixels"][0]
        return self.loss(output, batch["mask"], batch["point_labels"], pixels)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        terms = self._loss(batch, self(batch))
        logged = {f"train_loss_{k}": v for k, v in terms.items() if k != "total"}
        self.log_dict(logged, batch_size=len(batch["image"]))
        self.log("train_loss", terms["total"], batch_size=len(batch["image"]), prog_bar=True)
        return terms["total"]

    def _eval_step(self, stage: str, batch: dict[str, Any]) -> None:
        output = self(batch)
        terms = self._loss(batch, output)
        self.log(f"{stage}_loss", terms["total"], batch_size=len(batch["image"]), sync_dist=True)
        self.confusion[stage]["pixels"].update(predict_labels(output["logits"]), batch["mask"])
        if output["point_logits"] is not None:
            update_point_confusion(self.confusion[stage]["points"], output["point_logits"], batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _reset(self, stage: str) -> None:
        for cm in self.confusion[stage].values():
            cm.reset()

    def _log_metrics(self, stage: str) -> None:
        """Sum the matrices over ranks (DDP), then log metrics of the whole epoch."""
        summed = {
            kind: self.trainer.strategy.reduce(cm.matrix.to(self.device), reduce_op="sum").cpu()
            for kind, cm in self.confusion[stage].items()
        }
        self.epoch_matrices[stage] = summed
        scores = metrics(summed["pixels"], self.class_names)
        logged = {f"{stage}_{k}": v for k, v in scores.items()}
        if summed["points"][1:].sum() > 0:
            scores = metrics(summed["points"], self.class_names)
            logged.update({f"{stage}_points_{k}": scores[k] for k in ("miou", "oa")})
        # Equal on every rank already; sync_dist (a mean of equal values) only tells Lightning so.
        self.log_dict(logged, sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam + ExponentialLR per epoch, the authors' RandLA-Net schedule."""
        opt = torch.optim.Adam(
            self.parameters(), lr=self.optim["lr"], weight_decay=self.optim["weight_decay"]
        )
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=self.optim["gamma"])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONTRACT_KEY] = self.contract


def update_point_confusion(cm: ConfusionMatrix, point_logits: Tensor, batch: dict) -> None:
    """Score point predictions: over every point of the tiles when the batch carries
    `point_counts` (evaluation datasets do), else over the sampled points as they are."""
    pred = predict_labels(point_logits, dim=2)
    if "point_counts" in batch:
        cm.update_counts(pred, batch["point_counts"])
    else:
        cm.update(pred, batch["point_labels"])


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, contract) of a `geoseg train` checkpoint, without unpickling code.

    Raises `CheckpointError` with a one-line reason for a missing file, a file torch cannot read
    with weights_only=True, a torch file without a geoseg contract, or weights that don't fit
    the contract's model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip, pickle and weights_only refusals all mean "not ours"
        raise CheckpointError(f"{path} is not a geoseg checkpoint ({first_line(exc)})") from None
    contract = ckpt.get(CONTRACT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(contract, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a geoseg checkpoint (no {CONTRACT_KEY})")
    if contract.get("format") != CONTRACT_FORMAT:
        raise CheckpointError(
            f"{path} has contract format {contract.get('format')!r}; expected {CONTRACT_FORMAT!r}"
        )
    name = contract["model"]
    kwargs = dict(contract["model_kwargs"])
    if "weights" in kwargs:  # pretrained weights only start training; the checkpoint's replace them
        kwargs["weights"] = None
    try:
        model = create_model(name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild model {name!r}: {exc}") from None
    state = {
        key.removeprefix("model."): value
        for key, value in ckpt["state_dict"].items()
        if key.startswith("model.")
    }
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"weights in {path} do not match model {name!r}: {first_line(exc)}"
        ) from None
    return model.eval(), contract
