"""The from-scratch U-Net of the IKD-Net image branch (milesial Pytorch-UNet design, bilinear).

With widths (64, 128, 256, 512) it is milesial's bilinear U-Net: encoder 64-128-256-512-512,
decoder Up(1024→256), Up(512→128), Up(256→64), Up(128→64). `fusion_channels` widens the input of
each Up block by the channels another branch concatenates before it, which is how IKD-Net
inserts the point maps; with zeros it is the plain image U-Net.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from geoseg.models.batch import Batch, ModelOutput
from geoseg.models.pretrained import create_encoder


class DoubleConv(nn.Sequential):
    """(3×3 conv, BN, ReLU) × 2; the middle width is a parameter as in milesial's Up."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None):
        mid = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2×2 max-pool then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Bilinear ×2 upsampling, concat with the encoder skip, DoubleConv (mid = in // 2)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """U-Net over batch["image"]; len(widths) = number of poolings.

    The deepest encoder stage keeps widths[-1] channels (milesial's bilinear `factor`), and Up
    stage i outputs the width of the skip two levels above it (the shallowest two output
    widths[0]). num_classes=None leaves out the 1×1 output conv, for a model with its own head.

    `encoder` swaps the from-scratch encoder for a pretrained one (`geoseg.models.pretrained`,
    e.g. "efficientnet-lite0" with weights "imagenet", or "resnet50" with a TorchGeo weight
    name): its maps at strides 2 .. 2^levels become the skips and the bottleneck, a DoubleConv
    on the image gives the stride-1 skip, and the decoder keeps the widths above.
    """

    def __init__(
        self,
        in_channels: int = 4,
        num_classes: int | None = 5,
        widths: Sequence[int] = (64, 128, 256, 512),
        fusion_channels: Sequence[int] | None = None,
        encoder: str | None = None,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        levels = len(widths)
        fusion = list(fusion_channels) if fusion_channels is not None else [0] * levels
        if len(fusion) != levels:
            raise ValueError(f"fusion_channels needs {levels} entries, got {len(fusion)}")
        if weights is not None and encoder is None:
            raise ValueError("weights need a pretrained encoder (encoder=...)")
        self.inc = DoubleConv(in_channels, widths[0])
        self.backbone = None
        if encoder is None:
            enc = [*widths, widths[-1]]  # channels at strides 1 .. 2^levels
            self.downs = nn.ModuleList(
                Down(w, o) for w, o in itertools.pairwise(enc)
            )
        else:
            self.backbone = create_encoder(encoder, in_channels, levels, weights)
            enc = [widths[0], *self.backbone.out_channels[1:]]
            self.downs = nn.ModuleList()
        self._levels = levels
        self.ups = nn.ModuleList()
        channels = enc[-1]
        for i in range(levels):
            skip = enc[levels - 1 - i]
            out = widths[max(levels - 2 - i, 0)]
            self.ups.append(Up(channels + fusion[i] + skip, out))
            channels = out
        self.out_channels = channels
        self.outc = nn.Conv2d(channels, num_classes, 1) if num_classes else None

    @property
    def levels(self) -> int:
        return self._levels

    def encode(self, image: Tensor) -> list[Tensor]:
        """Encoder maps, shallowest first: levels + 1 tensors at H/2^l."""
        factor = 2**self.levels
        if image.shape[-2] % factor or image.shape[-1] % factor:
            raise ValueError(f"image size {tuple(image.shape[-2:])} must be divisible by {factor}")
        maps = [self.inc(image)]
        if self.backbone is not None:
            return maps + list(self.backbone(image)[1:])
        for down in self.downs:
            maps.append(down(maps[-1]))
        return maps

    def decode(
        self, maps: list[Tensor], fuse: Callable[[int, Tensor], Tensor] | None = None
    ) -> Tensor:
        """Full-resolution features; fuse(i, x) may widen x before Up stage i (coarsest first)."""
        x = maps[-1]
        for i, up in enumerate(self.ups):
            x = up(fuse(i, x) if fuse else x, maps[-2 - i])
        return x

    def forward(self, batch: Batch) -> ModelOutput:
        if self.outc is None:
            raise RuntimeError("UNet built without an output conv (num_classes=None)")
        logits = self.outc(self.decode(self.encode(batch["image"])))
        return ModelOutput(logits=logits, point_logits=None, gates=None)
