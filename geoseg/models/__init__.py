"""Segmentation models behind one contract: `model(batch) -> ModelOutput`.

`create_model(name, **kwargs)` builds any registered model, smp-style. Every model reads the
same `Batch` (image + point pyramid, see `geoseg.models.batch`) and returns the same keys
(`logits`, `point_logits`, `gates`; absent ones are None). Heads output `num_classes` scores
whose indices are the label values of the build's class set (`geoseg.classes.ClassSet`; 5 for
N3C, which `geoseg train` derives from the build); class 0 ("unlabeled") is never a target,
losses and metrics ignore it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from geoseg.models.baselines import EarlyFusion, PointsOnly, SmpUNet
from geoseg.models.batch import Batch, ModelOutput, PointsBatch, make_dummy_batch
from geoseg.models.ikdnet import IKDNet
from geoseg.models.randlanet import RandLANet
from geoseg.models.unet import UNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "ikdnet": IKDNet,
    "unet": UNet,
    "smp-unet": SmpUNet,
    "randlanet": PointsOnly,
    "early-fusion": EarlyFusion,
}
"""Model name -> constructor; keyword arguments are the constructor's."""


def uses_points(name: str, kwargs: dict[str, Any]) -> bool:
    """Whether a registered model reads the batch's points (so needs the scene's LiDAR)."""
    if name == "ikdnet":
        return bool(kwargs.get("use_points", True))
    return name in ("randlanet", "early-fusion")


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name, e.g. create_model("ikdnet", in_channels=4)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None
    return factory(**kwargs)


__all__ = [
    "MODELS",
    "Batch",
    "EarlyFusion",
    "IKDNet",
    "ModelOutput",
    "PointsBatch",
    "PointsOnly",
    "RandLANet",
    "SmpUNet",
    "UNet",
    "create_model",
    "make_dummy_batch",
    "uses_points",
]
