"""The N3C-California label scheme: ASPRS LAS classification codes -> 4 land-cover classes.

One table used by the builder (labels), the datasets (ignore index) and the models (head size),
so the mapping can never drift between them.
"""

from __future__ import annotations

import numpy as np

UNLABELED = 0
"""Label value for pixels/points without a usable class (ignored in losses and metrics)."""

CLASS_NAMES: tuple[str, ...] = ("unlabeled", "others", "ground", "tree", "building")
"""Index = label value stored in `label` COGs and in the `classification` of tile points."""

CLASS_DESCRIPTIONS: tuple[str, ...] = (
    "no usable LiDAR class (ASPRS 0, 1, 7, 12, >= 18, unmapped codes) or no point",
    "ASPRS 3 low vegetation, 9 water, 17 bridge deck",
    "ASPRS 2 ground",
    "ASPRS 4 medium and 5 high vegetation",
    "ASPRS 6 building",
)

CLASS_COLORS: dict[int, tuple[int, int, int, int]] = {
    0: (0, 0, 0, 0),
    1: (255, 170, 0, 255),  # others: low vegetation, water, bridge deck
    2: (196, 160, 116, 255),  # ground
    3: (34, 139, 34, 255),  # tree
    4: (220, 20, 60, 255),  # building
}

# ASPRS code -> N3C class, as in the IKD-Net authors' loader (multisantaclara.py).
ASPRS_TO_N3C: dict[int, int] = {3: 1, 9: 1, 17: 1, 2: 2, 4: 3, 5: 3, 6: 4}

NOISE_CODES: frozenset[int] = frozenset({7, 18})
"""ASPRS low/high noise: never used for labels nor for the DSM."""

_LUT = np.zeros(256, dtype=np.uint8)
for _code, _cls in ASPRS_TO_N3C.items():
    _LUT[_code] = _cls


def remap_asprs(codes: np.ndarray) -> np.ndarray:
    """Map ASPRS classification codes (uint8, any shape) to N3C labels (0 = unlabeled)."""
    return _LUT[np.asarray(codes, dtype=np.uint8)]
