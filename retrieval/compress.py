"""Visual token compression (VTC): parameter-free bilinear down-sampling of the ViT feature grid.

Magic-MM-Embedding (papers.md part 2, §2.1) inserts Φ = bilinear interpolation between the vision
encoder and the connector: an H×W grid of C-dim features becomes (H/s)×(W/s), so the language
model sees exactly 1/s² of the visual tokens (InternVL3: 32×32 → 16×16 → pixel shuffle → 64 per
448-px tile). It has no weights, so a pretrained connector keeps working and gradients flow to
the encoder unchanged. With align_corners=False and s = 2 it equals 2×2 average pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def downsample_grid(grid: Tensor, s: int) -> Tensor:
    """(B, H, W, C) feature grid -> (B, H/s, W/s, C); s = 1 returns `grid` itself.

    H and W must be multiples of s: a rounded grid would break the exact 1/s² token count that
    the prompt's image placeholders (and the efficiency claim) rely on.
    """
    if s < 1:
        raise ValueError(f"compression factor must be >= 1, got {s}")
    if s == 1:
        return grid
    _, h, w, _ = grid.shape
    compressed_count((h, w), s)  # raises unless H and W are multiples of s
    chw = grid.permute(0, 3, 1, 2)
    out = F.interpolate(chw, size=(h // s, w // s), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1)


def compress_tokens(
    tokens: Tensor, s: int, *, grid: tuple[int, int] | None = None, prefix: int = 0
) -> Tensor:
    """(B, prefix + H*W, C) token sequence -> (B, prefix + H*W/s², C).

    `prefix` tokens (a CLS token, registers) are not part of the spatial grid and pass through
    unchanged in front. `grid` = (H, W) for non-square grids; square when omitted.
    """
    b, n, c = tokens.shape
    spatial = n - prefix
    if grid is None:
        side = math.isqrt(spatial)
        if side * side != spatial:
            raise ValueError(
                f"{spatial} spatial tokens do not form a square grid; pass grid=(H, W)"
            )
        grid = (side, side)
    if grid[0] * grid[1] != spatial:
        raise ValueError(f"grid {grid[0]}x{grid[1]} does not match {spatial} spatial tokens")
    if s == 1:
        return tokens
    head, body = tokens[:, :prefix], tokens[:, prefix:].reshape(b, grid[0], grid[1], c)
    small = downsample_grid(body, s).reshape(b, -1, c)
    return torch.cat([head, small], dim=1)


def compressed_count(grid: tuple[int, int], s: int) -> int:
    """Spatial tokens left after compression: exactly H*W/s²; ValueError unless s divides H, W."""
    h, w = grid
    if h % s or w % s:
        raise ValueError(f"feature grid {h}x{w} is not divisible by compression factor {s}")
    return (h // s) * (w // s)
