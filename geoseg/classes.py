"""Class sets: the label values of a build, their names and colours; N3C-California's here.

A build declares its class set in stats.json (`class_names`, `class_colors`), a checkpoint in its
contract, a prediction in its STAC item: everything downstream reads it from there, so one build
can hold N3C's ASPRS-derived classes and another ISPRS Vaihingen's. Label value 0 is always
"unlabeled" (ignored by losses and metrics). The N3C table below is used by the builder (labels),
and is the fallback for builds made before class sets were recorded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RGBA = tuple[int, int, int, int]

UNLABELED = 0
"""Label value for pixels/points without a usable class (ignored in losses and metrics)."""

UNLABELED_NAME = "unlabeled"
"""The name of label 0 in every class set."""

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


@dataclass(frozen=True)
class ClassSet:
    """Names, RGBA colours and descriptions indexed by label value; 0 is "unlabeled"."""

    name: str
    names: tuple[str, ...]
    colors: tuple[RGBA, ...]
    descriptions: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names or self.names[0] != UNLABELED_NAME:
            raise ValueError(f"class set {self.name!r}: label 0 must be 'unlabeled'")
        if not len(self.names) == len(self.colors) == len(self.descriptions):
            raise ValueError(f"class set {self.name!r}: names, colors, descriptions differ in size")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"class set {self.name!r}: duplicate class names")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def real(self) -> tuple[str, ...]:
        """The classes that are ever a target: all but 0."""
        return self.names[1:]

    def colormap(self) -> dict[int, RGBA]:
        """GDAL colour table {value: rgba}."""
        return dict(enumerate(self.colors))

    def stats_keys(self) -> dict[str, Any]:
        """The stats.json keys a build records its class set under."""
        return {
            "class_names": list(self.names),
            "class_colors": {n: list(c) for n, c in zip(self.names, self.colors, strict=True)},
            "class_descriptions": list(self.descriptions),
        }

    def contract_keys(self) -> dict[str, Any]:
        """The model-contract keys a checkpoint records its class set under."""
        return {"class_names": list(self.names), "class_colors": [list(c) for c in self.colors]}

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any], name: str = "build") -> ClassSet:
        """The class set of a build's stats.json; N3C for builds made before it was recorded."""
        names = stats.get("class_names")
        if not names:
            return N3C
        colors = stats.get("class_colors") or {}
        descriptions = stats.get("class_descriptions") or [""] * len(names)
        return cls(
            name,
            tuple(names),
            tuple(_rgba(colors.get(n, (0, 0, 0, 0))) for n in names),
            tuple(descriptions),
        )

    @classmethod
    def from_contract(cls, contract: Mapping[str, Any], name: str = "model") -> ClassSet:
        """The class set of a checkpoint's model contract."""
        names = contract["class_names"]
        return cls(
            name,
            tuple(names),
            tuple(_rgba(c) for c in contract["class_colors"]),
            ("",) * len(names),
        )


def _rgba(color: Sequence[int]) -> RGBA:
    values = [int(v) for v in color]
    if len(values) == 3:
        values.append(255)
    if len(values) != 4 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"bad colour {list(color)}: expected 3 or 4 values in 0..255")
    return (values[0], values[1], values[2], values[3])


N3C = ClassSet(
    "n3c",
    CLASS_NAMES,
    tuple(CLASS_COLORS[i] for i in range(len(CLASS_NAMES))),
    CLASS_DESCRIPTIONS,
)
"""N3C-California: ASPRS LAS classes -> others / ground / tree / building."""


def build_classes(root: str | Path) -> ClassSet:
    """The class set of a build folder (its stats.json); N3C for a build without one recorded."""
    path = Path(root) / "stats.json"
    return ClassSet.from_stats(json.loads(path.read_text()) if path.is_file() else {}, "build")


LABEL_DIM = "label"
"""Optional LAS extra dimension holding each point's class in the build's own class set
(`geoseg prepare` builds); without it, points are labelled from their ASPRS classification."""


def point_labels(points: Mapping[str, np.ndarray]) -> np.ndarray:
    """Class labels of points (LAS fields by name): the `label` dimension if the build wrote
    one, else N3C's remapping of the ASPRS classification.

    A `laspy.LasData` has no `__contains__`: `in` would iterate it point by point (a header
    deep copy each, seconds per tile), so its dimension names are asked instead."""
    fmt = getattr(points, "point_format", None)
    names = set(fmt.dimension_names) if fmt is not None else points.keys()
    if LABEL_DIM in names:
        return np.asarray(points[LABEL_DIM], np.uint8)
    return remap_asprs(np.asarray(points["classification"]))
