"""IKD-Net's 2D–3D fusion blocks: Dimension Sensor, GKG spatial gate, CKG class attention, and
our inference-time point vote."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from geoseg.models.batch import class_probabilities, probabilities_as_logits


class DimensionSensor(nn.Module):
    """Place per-point features on an image grid, then densify with a stride-1 max-pool.

    The grid starts at zero, as in the authors' code, so cells with no point within the pooling
    window stay 0 and the pool acts like a ReLU wherever a window holds an empty cell. Several
    points falling on one cell keep their per-channel maximum (scatter_reduce "amax"): the
    authors' `index_put` keeps an arbitrary one (the last write, nondeterministic on GPU), and the
    maximum is deterministic and consistent with the max-pool that follows.
    """

    def __init__(self, kernel_size: int = 5) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    @staticmethod
    def scatter(features: Tensor, pixels: Tensor, size: tuple[int, int]) -> Tensor:
        """features (B, C, N) or (B, C, N, 1), pixels (B, N, 2) (row, col) -> (B, C, H, W)."""
        features = features.flatten(2)
        b, c, _ = features.shape
        h, w = size
        flat = (pixels[..., 0] * w + pixels[..., 1]).unsqueeze(1).expand(-1, c, -1)
        grid = features.new_zeros(b, c, h * w)
        grid = grid.scatter_reduce(2, flat, features, reduce="amax", include_self=False)
        return grid.view(b, c, h, w)

    def forward(self, features: Tensor, pixels: Tensor, size: tuple[int, int]) -> Tensor:
        return self.pool(self.scatter(features, pixels, size))


class GKG(nn.Module):
    """Global knowledge-guided gate (the authors' CBAM-style `SpatialGate`).

    A spatial gate computed from the point map P re-weights the image features I, so the LiDAR
    geometry decides where image evidence counts; the gated image and P are concatenated.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, image: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """image (B, Ci, H, W), points (B, Cp, H, W) -> (B, Ci+Cp, H, W), gate (B, 1, H, W)."""
        pooled = torch.cat([points.amax(1, keepdim=True), points.mean(1, keepdim=True)], dim=1)
        gate = torch.sigmoid(self.bn(self.conv(pooled)))
        return torch.cat([image * gate, points], dim=1), gate


class CKG(nn.Module):
    """Class knowledge-guided module: ACFNet-style attentional class features.

    The point branch's coarse class map P (B, K, H, W) pools the reduced image features F' into
    K class centres E = P·F'ᵀ (B, K, C'); A = softmax(E) over the C' channels (as in the
    released code, not over classes); O = Conv1×1(Aᵀ·P) are class-attended features, and the
    logits come from concat(O, F).
    """

    def __init__(self, in_channels: int = 64, mid_channels: int = 32, num_classes: int = 5) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.2),
        )
        self.project = nn.Conv2d(mid_channels, mid_channels, 1)
        self.classify = nn.Conv2d(mid_channels + in_channels, num_classes, 1)

    def forward(self, features: Tensor, coarse: Tensor) -> Tensor:
        """features (B, C, H, W), coarse (B, K, H, W) -> logits (B, num_classes, H, W)."""
        b, _, h, w = features.shape
        reduced = self.reduce(features).flatten(2)  # B × C' × HW
        class_map = coarse.flatten(2)  # B × K × HW
        centres = torch.bmm(class_map, reduced.transpose(1, 2))  # B × K × C'
        attention = centres.softmax(dim=-1).transpose(1, 2)  # B × C' × K
        attended = torch.bmm(attention, class_map).view(b, -1, h, w)
        return self.classify(torch.cat([self.project(attended), features], dim=1))


def top_point_map(values: Tensor, z: Tensor, pixels: Tensor, size: tuple[int, int]) -> Tensor:
    """values (B, N, C) of the points, z (B, N), pixels (B, N, 2) (row, col) -> (B, C, H, W):
    each pixel holds the values of its highest point (ties: their per-channel maximum), the
    rule the pixel labels are made with (`geoseg.builder.rasterize`); pixels under no point
    hold NaN."""
    h, w = size
    flat = pixels[..., 0] * w + pixels[..., 1]
    top = z.new_full((z.shape[0], h * w), -torch.inf).scatter_reduce(1, flat, z, "amax")
    highest = z >= top.gather(1, flat)
    source = values.masked_fill(~highest.unsqueeze(-1), -torch.inf).transpose(1, 2)
    grid = DimensionSensor.scatter(source, pixels, size)  # every point cell holds a top point
    return grid.masked_fill(top.isinf().view(-1, 1, h, w), torch.nan)


class PointVote(nn.Module):
    """Late fusion at inference (ours, not the paper's): on every pixel under a point, the
    pixel head's class probabilities are averaged with those the point branch gives the
    pixel's highest point; other pixels keep the pixel head's.

    Why: the pixel labels *are* the highest labelled LiDAR point's class, and the point branch,
    which sees heights, scores far higher on the points than the pixel head on the pixels
    (docs/accuracy.md). Each head is trained on its own labels (L_img, L_pc) as in the released
    code; the vote only combines them, so it acts in eval mode only (as dropout acts in
    training only) and a checkpoint trained without it can be scored with it.
    Returns logits in the form of `probabilities_as_logits`.
    """

    def forward(self, logits: Tensor, point_logits: Tensor, z: Tensor, pixels: Tensor) -> Tensor:
        """logits (B, K, H, W), point_logits (B, N, K), z (B, N), pixels (B, N, 2)."""
        image = class_probabilities(logits, 1)
        points = class_probabilities(point_logits, 2)
        votes = top_point_map(points, z.float(), pixels, logits.shape[-2:])
        mixed = torch.where(votes.isnan(), image, (image + votes) / 2)
        return probabilities_as_logits(mixed, 1)
