"""IKD-Net (Wang et al., 2023): RandLA-Net point branch fused into a U-Net image branch.

Structure of the authors' `SiameseNetAcf`: before each U-Net Up block a Dimension Sensor puts a
RandLA-Net stage (bottleneck, then decoder stages, coarsest first) on the image grid of that
resolution and a GKG gate fuses it with the image features; at full resolution the point class
scores, put on the grid the same way, drive the CKG that produces the pixel logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from geoseg.models.batch import Batch, ModelOutput
from geoseg.models.fusion import CKG, GKG, DimensionSensor, PointVote
from geoseg.models.randlanet import RandLANet
from geoseg.models.unet import UNet


class IKDNet(nn.Module):
    """IKD-Net with ablation switches; num_classes counts class 0 ("unlabeled", never a target).

    use_points=False drops the point branch and with it GKG and CKG (they need point maps): the
    model is then the image U-Net. use_gkg=False keeps the point maps but concatenates them
    ungated; use_ckg=False replaces the CKG by U-Net's 1×1 output conv.

    ckg_unlabeled: whether the CKG's class map includes the class-0 ("unlabeled") point score.
    By default it does not: the CKG pools num_classes - 1 class centres from the real classes'
    scores, as the released head (Open3D-ML drops ignored labels from the logits) does; the
    class-0 score is trained by no loss, so as a class centre it would be noise (the ablation
    in docs/ikdnet.md, "CKG classes", measured the two).

    encoder/weights: a pretrained image encoder instead of U-Net's from-scratch one (`UNet`).

    point_vote: in eval mode, average the pixel probabilities with the point branch's for the
    highest point on each pixel (`PointVote`; ours, beyond the paper). Training is unchanged.
    """

    def __init__(
        self,
        in_channels: int = 3,
        point_in_channels: int = 5,
        num_classes: int = 5,
        use_gkg: bool = True,
        use_ckg: bool = True,
        use_points: bool = True,
        widths: Sequence[int] = (64, 128, 256, 512),
        point_widths: Sequence[int] = (16, 64, 128, 256),
        ckg_channels: int = 32,
        ckg_unlabeled: bool = False,
        encoder: str | None = None,
        weights: str | None = None,
        point_vote: bool = False,
    ) -> None:
        super().__init__()
        if len(widths) != len(point_widths):
            raise ValueError("widths and point_widths need the same number of levels")
        use_gkg, use_ckg = use_points and use_gkg, use_points and use_ckg
        self.points = None
        fusion = None
        if use_points:
            self.points = RandLANet(point_in_channels, num_classes, point_widths)
            fusion = self.points.stage_channels
        self.image = UNet(
            in_channels, None if use_ckg else num_classes, widths, fusion, encoder, weights
        )
        self.sensor = DimensionSensor()
        self.gkg = nn.ModuleList(GKG() for _ in widths) if use_gkg else None
        self.ckg = CKG(self.image.out_channels, ckg_channels, num_classes) if use_ckg else None
        self.ckg_first_class = 0 if ckg_unlabeled else 1
        self.vote = PointVote() if use_points and point_vote else None

    def forward(self, batch: Batch) -> ModelOutput:
        if self.points is None:
            return self.image(batch)
        maps = self.image.encode(batch["image"])
        points = batch["points"]
        point_out = self.points(points)
        levels = self.image.levels
        gates: list[Tensor] = []

        def fuse(i: int, x: Tensor) -> Tensor:
            grid = self.sensor(point_out.stages[i], points["pixels"][levels - i], x.shape[-2:])
            if self.gkg is None:
                return torch.cat([x, grid], dim=1)
            fused, gate = self.gkg[i](x, grid)
            gates.append(gate)
            return fused

        features = self.image.decode(maps, fuse)
        if self.ckg is None:
            logits = self.image.outc(features)
        else:
            scores = point_out.logits[..., self.ckg_first_class :].transpose(1, 2)
            coarse = self.sensor(scores, points["pixels"][0], features.shape[-2:])
            logits = self.ckg(features, coarse)
        if self.vote is not None and not self.training:
            z, cells = points["xyz"][0][..., 2], points["pixels"][0]
            logits = self.vote(logits, point_out.logits, z, cells)
        gate_list = gates if self.gkg is not None else None
        return ModelOutput(logits=logits, point_logits=point_out.logits, gates=gate_list)
