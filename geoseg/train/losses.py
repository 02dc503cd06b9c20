"""The IKD-Net holistic loss L = w_img·L_img + w_pc·L_pc + w_sc·L_pi-SC.

L_img and L_pc follow the authors' released `get_loss` (weighted cross-entropy, label 0 ignored,
w_c = 1/(f_c + 0.02)). The paper names L_pi-SC but never defines it, and gives no term weights;
our definition (a point–pixel Jensen–Shannon consistency) and the weights 1, 1, 1 are our
assumptions, argued in docs/ikdnet.md ("Loss").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geoseg.classes import N3C, UNLABELED
from geoseg.models.batch import ModelOutput

Detach = Literal["none", "point", "pixel"]


def class_weights(
    counts: Mapping[str, int] | Sequence[int],
    class_names: Sequence[str] = N3C.names,
    offset: float = 0.02,
) -> Tensor:
    """Weights w_c = 1/(f_c + offset) indexed by label value; w_0 = 0 (unlabeled never counts).

    `counts` is a stats.json class-count dict keyed by class name ("pixels" or "points"; missing
    names count 0, "unlabeled" is ignored), or a sequence indexed by label value (K entries) or
    over the real classes 1..K-1, for the build's `class_names` (K of them, label 0 first).
    f_c = count_c / Σ real counts, so the weights follow the build actually trained on instead
    of the authors' hard-coded N3C counts. The offset bounds the weight of absent classes at
    1/offset.
    """
    class_names = tuple(class_names)
    real = class_names[1:]
    if isinstance(counts, Mapping):
        unknown = set(counts) - set(class_names)
        if unknown:
            raise ValueError(f"unknown class names {sorted(unknown)}; expected {class_names}")
        values = [counts.get(name, 0) for name in real]
    elif len(counts) == len(class_names):
        values = list(counts[1:])
    elif len(counts) == len(real):
        values = list(counts)
    else:
        raise ValueError(f"expected {len(real)} or {len(class_names)} counts, got {len(counts)}")
    freq = torch.tensor(values, dtype=torch.float64)
    if (freq < 0).any():
        raise ValueError(f"class counts must be non-negative, got {values}")
    total = freq.sum()
    if total == 0:
        raise ValueError("all class counts are zero: no labelled data to derive weights from")
    weights = torch.zeros(len(class_names), dtype=torch.float64)
    weights[1:] = 1.0 / (freq / total + offset)
    return weights.float()


def _weighted_ce(logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Class-weighted CE averaged over labelled targets; 0 (with a graph) when none are labelled.

    A tile with no labelled pixels must not turn the batch loss into NaN (0/0 in the mean).
    """
    if not (target != UNLABELED).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, weight=weight, ignore_index=UNLABELED)


def gather_pixels(logits: Tensor, pixels: Tensor) -> Tensor:
    """Pixel scores (B, C, H, W) under each point's (row, col) (B, N, 2) -> (B, N, C)."""
    _, c, _, w = logits.shape
    flat = (pixels[..., 0] * w + pixels[..., 1]).unsqueeze(1).expand(-1, c, -1)
    return logits.flatten(2).gather(2, flat).transpose(1, 2)


def point_pixel_consistency(
    point_logits: Tensor,
    pixel_logits: Tensor,
    temperature: float = 1.0,
    detach: Detach = "none",
) -> Tensor:
    """Mean Jensen–Shannon divergence (× T²) between paired point and pixel predictions (M, C).

    Distributions are softmax(logits / T) over the real classes 1..C-1: the class-0 logit is
    never trained, so comparing it would only add noise. JS is symmetric, bounded by ln 2 and
    0 exactly when both sides agree; T² keeps gradient magnitudes comparable across
    temperatures (Hinton et al. 2015). `detach` stops gradients into one side ("point": the
    points only teach the pixels; "pixel": the reverse).
    """
    if detach not in ("none", "point", "pixel"):
        raise ValueError(f"detach must be 'none', 'point' or 'pixel', got {detach!r}")
    if point_logits.numel() == 0:
        return point_logits.sum() * 0.0
    if detach == "point":
        point_logits = point_logits.detach()
    elif detach == "pixel":
        pixel_logits = pixel_logits.detach()
    log_p = F.log_softmax(point_logits[:, 1:] / temperature, dim=1)
    log_q = F.log_softmax(pixel_logits[:, 1:] / temperature, dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(1)
    return 0.5 * (kl_p + kl_q).mean() * temperature**2


class HolisticLoss(nn.Module):
    """L_total = w_img·L_img + w_pc·L_pc + w_sc·L_pi-SC; returns {total, img, pc, sc}.

    - L_img: weighted CE of `logits` vs the pixel mask, label 0 ignored (authors' `get_loss`).
    - L_pc: weighted CE of `point_logits` vs point labels, label 0 ignored.
    - L_pi-SC: `point_pixel_consistency` between each labelled point and the pixel logits at its
      full-resolution (row, col); our definition, the paper gives none.

    The weights (default 1, 1, 1) are our assumption: the paper publishes none. Image-only
    models (point_logits None) get L_pc = L_pi-SC = 0. `point_weights` defaults to the pixel
    weights; pass `class_weights(stats["points"])` to weight by point frequencies.
    """

    pixel_weights: Tensor
    point_weights: Tensor

    def __init__(
        self,
        pixel_weights: Tensor,
        point_weights: Tensor | None = None,
        w_img: float = 1.0,
        w_pc: float = 1.0,
        w_sc: float = 1.0,
        temperature: float = 1.0,
        sc_detach: Detach = "none",
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.register_buffer("pixel_weights", pixel_weights.float().clone())
        point = pixel_weights if point_weights is None else point_weights
        self.register_buffer("point_weights", point.float().clone())
        self.w_img, self.w_pc, self.w_sc = w_img, w_pc, w_sc
        self.temperature = temperature
        self.sc_detach: Detach = sc_detach

    def forward(
        self,
        output: ModelOutput,
        mask: Tensor,
        point_labels: Tensor | None = None,
        pixels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms for one batch.

        mask: int64 (B, H, W) labels; point_labels: int64 (B, N); pixels: the batch's
        `points["pixels"][0]` (B, N, 2). The last two are required when the model has points.
        """
        logits = output["logits"]
        img = _weighted_ce(logits, mask, self.pixel_weights)
        zero = img.new_zeros(())
        pc, sc = zero, zero
        point_logits = output["point_logits"]
        if point_logits is not None:
            if point_labels is None or pixels is None:
                raise ValueError("a model with point_logits needs point_labels and pixels")
            pc = _weighted_ce(point_logits.transpose(1, 2), point_labels, self.point_weights)
            labelled = point_labels != UNLABELED
            under = gather_pixels(logits, pixels)
            sc = point_pixel_consistency(
                point_logits[labelled], under[labelled], self.temperature, self.sc_detach
            )
        total = self.w_img * img + self.w_pc * pc + self.w_sc * sc
        return {"total": total, "img": img, "pc": pc, "sc": sc}
