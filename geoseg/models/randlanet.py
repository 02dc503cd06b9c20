"""RandLA-Net (Hu et al., CVPR 2020), the point branch of IKD-Net.

Follows the Open3D-ML PyTorch variant the IKD-Net authors built on: LeakyReLU(0.2) after every
shared MLP, BatchNorm with eps 1e-6, residual LFA blocks, random-sample pooling as a max over the
kNN of the retained points and nearest-neighbour upsampling. Point features are kept as
(B, C, N, 1) tensors so one 1×1 Conv2d serves both per-point and per-neighbour MLPs.
All neighbourhoods come precomputed in the batch (see `geoseg.models.batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from geoseg.models.batch import PointsBatch


def gather_neighbours(x: Tensor, idx: Tensor) -> Tensor:
    """Features (B, C, N, 1) of the points indexed by idx (B, M, K) -> (B, C, M, K)."""
    b, c = x.shape[:2]
    _, m, k = idx.shape
    flat = idx.reshape(b, 1, m * k).expand(b, c, m * k)
    return x.squeeze(-1).gather(2, flat).view(b, c, m, k)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class SharedMLP(nn.Sequential):
    """1×1 convolution (+ BatchNorm) (+ activation) shared by all points and neighbours."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        activation: nn.Module | None = None,
        batch_norm: bool = True,
    ) -> None:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, bias=not batch_norm)]
        if batch_norm:
            # eps/momentum of the TF original (decay 0.99 = torch momentum 0.01).
            layers.append(nn.BatchNorm2d(out_channels, eps=1e-6, momentum=0.01))
        if activation is not None:
            layers.append(activation)
        super().__init__(*layers)


class LocSE(nn.Module):
    """Local spatial encoding: neighbour features concatenated with an encoded geometry.

    The first LocSE of an LFA block encodes the 10-d relative position (distance, offset, centre,
    neighbour); the second one re-encodes the first one's output, as in RandLA-Net.
    """

    def __init__(self, geometry_channels: int, out_channels: int) -> None:
        super().__init__()
        self.mlp = SharedMLP(geometry_channels, out_channels, _act())

    @staticmethod
    def relative_positions(xyz: Tensor, idx: Tensor) -> Tensor:
        """xyz (B, 3, N, 1), idx (B, N, K) -> (B, 10, N, K) relative position encoding."""
        neighbours = gather_neighbours(xyz, idx)
        centres = xyz.expand_as(neighbours)
        offset = centres - neighbours
        dist = offset.square().sum(1, keepdim=True).sqrt()
        return torch.cat([dist, offset, centres, neighbours], dim=1)

    def forward(self, geometry: Tensor, features: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Return concat(neighbour features, encoded geometry) and the encoded geometry."""
        encoded = self.mlp(geometry)
        return torch.cat([gather_neighbours(features, idx), encoded], dim=1), encoded


class AttentivePooling(nn.Module):
    """Softmax attention over the K neighbours, weighted sum, then a shared MLP."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.score = nn.Linear(in_channels, in_channels, bias=False)
        self.mlp = SharedMLP(in_channels, out_channels, _act())

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, N, K) -> (B, out, N, 1)."""
        scores = self.score(x.permute(0, 2, 3, 1)).softmax(dim=2).permute(0, 3, 1, 2)
        return self.mlp((x * scores).sum(dim=-1, keepdim=True))


class LFA(nn.Module):
    """Local feature aggregation (dilated residual block): in -> 2·d_out channels."""

    def __init__(self, in_channels: int, d_out: int) -> None:
        super().__init__()
        self.mlp1 = SharedMLP(in_channels, d_out // 2, _act())
        self.lse1 = LocSE(10, d_out // 2)
        self.pool1 = AttentivePooling(d_out, d_out // 2)
        self.lse2 = LocSE(d_out // 2, d_out // 2)
        self.pool2 = AttentivePooling(d_out, d_out)
        self.mlp2 = SharedMLP(d_out, 2 * d_out)
        self.shortcut = SharedMLP(in_channels, 2 * d_out)
        self.act = _act()

    def forward(self, xyz: Tensor, features: Tensor, idx: Tensor) -> Tensor:
        """xyz (B, 3, N, 1), features (B, C, N, 1), idx (B, N, K) -> (B, 2·d_out, N, 1)."""
        x, geometry = self.lse1(LocSE.relative_positions(xyz, idx), self.mlp1(features), idx)
        x, _ = self.lse2(geometry, self.pool1(x), idx)
        return self.act(self.mlp2(self.pool2(x)) + self.shortcut(features))


def random_sample(features: Tensor, sub_idx: Tensor) -> Tensor:
    """Pool (B, C, N, 1) to the retained points: max over their kNN sub_idx (B, N', K)."""
    return gather_neighbours(features, sub_idx).amax(dim=-1, keepdim=True)


def nearest_upsample(features: Tensor, interp_idx: Tensor) -> Tensor:
    """Copy (B, C, N', 1) features to the denser level via interp_idx (B, N, 1)."""
    return gather_neighbours(features, interp_idx)


class PointOutput(NamedTuple):
    """Per-point logits (B, N, num_classes) and the features fusion needs, coarsest first.

    stages[i] is (B, C_i, N_{L-i}, 1): the bottleneck at level L, then decoder stages at levels
    L-1 ... 1 (the last decoder stage, at level 0, feeds the head).
    """

    logits: Tensor
    stages: list[Tensor]


class RandLANet(nn.Module):
    """RandLA-Net encoder-decoder with the per-point classification head.

    d_out sets the number of levels and their widths (LFA stage l outputs 2·d_out[l] channels);
    the defaults are the IKD-Net / SemanticKITTI ones.
    """

    def __init__(
        self,
        point_in_channels: int = 5,
        num_classes: int = 5,
        d_out: Sequence[int] = (16, 64, 128, 256),
        stem_channels: int = 8,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.fc0 = nn.Linear(point_in_channels, stem_channels)
        self.bn0 = nn.BatchNorm2d(stem_channels, eps=1e-6, momentum=0.01)
        self.act0 = _act()
        self.encoder = nn.ModuleList()
        enc_channels = [stem_channels]
        for width in d_out:
            self.encoder.append(LFA(enc_channels[-1], width))
            enc_channels.append(2 * width)
        deepest = enc_channels[-1]
        self.bottleneck = SharedMLP(deepest, deepest, _act())
        # Skips: LFA output of level 0, then the pooled LFA outputs at levels 1..L-1.
        skips = [enc_channels[1], *enc_channels[1:-1]][::-1]
        self.decoder = nn.ModuleList()
        channels = deepest
        self.stage_channels = [deepest]
        for skip in skips:
            self.decoder.append(SharedMLP(skip + channels, skip, _act()))
            channels = skip
            self.stage_channels.append(skip)
        self.stage_channels.pop()  # the level-0 decoder output goes to the head only
        self.head = nn.Sequential(
            SharedMLP(channels, 64, _act()),
            SharedMLP(64, 32, _act()),
            nn.Dropout(dropout),
            SharedMLP(32, num_classes, batch_norm=False),
        )

    @property
    def levels(self) -> int:
        return len(self.encoder)

    def forward(self, points: PointsBatch) -> PointOutput:
        xyz = [c.transpose(1, 2).unsqueeze(-1) for c in points["xyz"]]
        x = self.fc0(torch.cat([points["xyz"][0], points["features"]], dim=-1))
        x = self.act0(self.bn0(x.transpose(1, 2).unsqueeze(-1)))
        skips = []
        for level, lfa in enumerate(self.encoder):
            x = lfa(xyz[level], x, points["neighbors"][level])
            if level == 0:
                skips.append(x)
            x = random_sample(x, points["sub_idx"][level])
            if level < self.levels - 1:
                skips.append(x)
        x = self.bottleneck(x)
        stages = [x]
        for i, mlp in enumerate(self.decoder):
            level = self.levels - 1 - i
            up = nearest_upsample(x, points["interp_idx"][level])
            x = mlp(torch.cat([skips[level], up], dim=1))
            stages.append(x)
        logits = self.head(x).squeeze(-1).transpose(1, 2)
        return PointOutput(logits=logits, stages=stages[:-1])
