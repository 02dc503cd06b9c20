"""Baselines IKD-Net is compared with, behind the same batch/output contract.

- `SmpUNet`: image-only U-Net from segmentation-models-pytorch (any smp encoder; random init
  or pretrained weights, `geoseg.models.pretrained`).
- `PointsOnly`: RandLA-Net alone; its point scores are also put on the image grid by the
  Dimension Sensor so that pixel metrics compare with the image models.
- `EarlyFusion`: smp U-Net on the image stacked with LiDAR rasters (height, intensity, return
  number) made from the batch points by the same scatter + max-pool, i.e. the "rasterise first"
  approach IKD-Net argues against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from geoseg.models.batch import Batch, ModelOutput
from geoseg.models.fusion import DimensionSensor
from geoseg.models.pretrained import ENCODERS, load_encoder_weights
from geoseg.models.randlanet import RandLANet


class SmpUNet(nn.Module):
    """smp.Unet over batch["image"]; extra keyword arguments go to smp.Unet.

    `weights`: pretrained encoder weights (`geoseg.models.pretrained`) for an encoder geoseg
    knows (`ENCODERS`, by geoseg or smp name); smp's own downloads are never used (offline).
    """

    def __init__(
        self,
        in_channels: int = 4,
        num_classes: int = 5,
        encoder_name: str = "resnet34",
        weights: str | None = None,
        **smp_kwargs: Any,
    ) -> None:
        super().__init__()
        ours = {smp_name: name for name, smp_name in ENCODERS.items()}
        name = ours.get(encoder_name, encoder_name)
        self.net = smp.Unet(
            encoder_name=ENCODERS.get(name, encoder_name),
            encoder_weights=None,
            in_channels=in_channels,
            classes=num_classes,
            **smp_kwargs,
        )
        if weights is not None:
            if name not in ENCODERS:
                raise ValueError(f"no pretrained weights for encoder {encoder_name!r}")
            load_encoder_weights(self.net.encoder, name, weights)

    def forward(self, batch: Batch) -> ModelOutput:
        return ModelOutput(logits=self.net(batch["image"]), point_logits=None, gates=None)


class PointsOnly(nn.Module):
    """RandLA-Net alone; the pixel map has the size of batch["image"] (which it does not read)."""

    def __init__(
        self,
        point_in_channels: int = 5,
        num_classes: int = 5,
        point_widths: Sequence[int] = (16, 64, 128, 256),
    ) -> None:
        super().__init__()
        self.points = RandLANet(point_in_channels, num_classes, point_widths)
        self.sensor = DimensionSensor()

    def forward(self, batch: Batch) -> ModelOutput:
        points = batch["points"]
        point_logits = self.points(points).logits
        size = batch["image"].shape[-2:]
        logits = self.sensor(point_logits.transpose(1, 2), points["pixels"][0], size)
        return ModelOutput(logits=logits, point_logits=point_logits, gates=None)


class EarlyFusion(nn.Module):
    """smp U-Net on concat(image, rasterised z + point features)."""

    def __init__(
        self,
        in_channels: int = 4,
        point_in_channels: int = 5,
        num_classes: int = 5,
        encoder_name: str = "resnet34",
        **smp_kwargs: Any,
    ) -> None:
        super().__init__()
        self.sensor = DimensionSensor()
        self.net = SmpUNet(
            in_channels + point_in_channels - 2, num_classes, encoder_name, **smp_kwargs
        )

    def forward(self, batch: Batch) -> ModelOutput:
        points = batch["points"]
        values = torch.cat([points["xyz"][0][..., 2:], points["features"]], dim=-1)
        image = batch["image"]
        rasters = self.sensor(values.transpose(1, 2), points["pixels"][0], image.shape[-2:])
        return self.net(Batch(image=torch.cat([image, rasters], dim=1), points=points))
