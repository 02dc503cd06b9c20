"""The point pipeline of one tile, as in the IKD-Net authors' code (Open3D-ML, RandLA-Net).

grid sub-sampling -> fixed-size random sample -> projection to pixels -> standardisation ->
augmentation -> kNN / sub-sampling pyramid (`geoseg.models.batch.point_pyramid`). When training
on a GPU the kNN part is left to the device (`neighbours=False`, see `N3CDataModule`).

Pixels are computed from the *original* planimetric coordinates, before standardisation and
augmentation, exactly like the authors' "Dimension Sensor". Rotating, scaling or jittering the
network's xyz therefore never moves a point to another pixel, and the image needs no matching
transform. The one augmentation that must touch both modalities is the horizontal flip: it
mirrors x and flips the pixel columns, and the caller flips the image and mask the same way.

Everything here is plain numpy (plus scipy inside `point_pyramid`), so it runs in DataLoader
workers and is testable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np
from affine import Affine

from geoseg.classes import NOISE_CODES, remap_asprs
from geoseg.models.batch import point_pyramid, pyramid_levels

POINT_FEATURES = ("intensity", "return_number")
"""Per-point input features after xyz, as in the authors' loader (point_in_channels = 5)."""

POINT_FIELDS = ("x", "y", "z", *POINT_FEATURES, "classification")
"""The LAS fields the pipeline reads."""


def read_points(path: str | Path) -> dict[str, np.ndarray]:
    """A tile's `points.laz` as the `POINT_FIELDS` arrays, x/y/z as float64 map coordinates."""
    las = laspy.read(path)
    return {name: np.asarray(las[name]) for name in POINT_FIELDS}


@dataclass(frozen=True)
class PointConfig:
    """Point sampling and pyramid settings; defaults are the authors' released config.

    grid_size is in metres (z is in metres in every build). `augment` turns on the training
    augmentation: rotation about z, scale, jitter and a horizontal flip shared with the image.
    """

    num_points: int = 131072
    grid_size: float = 0.06
    levels: int = 4
    ratio: int = 4
    k: int = 16
    augment: bool = False

    def __post_init__(self) -> None:
        needed = self.k * self.ratio ** (self.levels - 1)
        if self.num_points < max(needed, self.ratio**self.levels):
            raise ValueError(
                f"num_points={self.num_points} is too few for {self.levels} levels of ratio "
                f"{self.ratio} with k={self.k} (needs >= {needed})"
            )


@dataclass(frozen=True)
class Augmentation:
    """What `augment` drew, so a test or a caller can reproduce or undo it."""

    angle: float
    scale: float


def grid_subsample(xyz: np.ndarray, grid_size: float) -> np.ndarray:
    """Sorted indices of one point per occupied voxel of side `grid_size`.

    Unlike Open3D-ML's barycentres, this keeps a real point per voxel: averaging would blend
    classes at object edges and makes no sense for return numbers.
    """
    if grid_size <= 0 or len(xyz) == 0:
        return np.arange(len(xyz))
    voxels = np.floor((xyz - xyz.min(axis=0)) / grid_size).astype(np.int64)
    dims = voxels.max(axis=0) + 1
    keys = (voxels[:, 0] * dims[1] + voxels[:, 1]) * dims[2] + voxels[:, 2]
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def sample_fixed(n: int, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """`num_points` shuffled indices into n points; duplicates pad tiles with fewer points.

    Shuffled, because the pyramid keeps the first N_l points of each level as its random sample.
    """
    if n == 0:
        raise ValueError("cannot sample points from an empty point cloud")
    if n >= num_points:
        return rng.choice(n, num_points, replace=False)
    idx = np.concatenate([np.arange(n), rng.choice(n, num_points - n)])
    return rng.permutation(idx)


def standardise(values: np.ndarray) -> np.ndarray:
    """Per-column zero mean and unit std (float32); constant columns are only centred."""
    values = np.asarray(values, dtype=np.float64)
    std = values.std(axis=0)
    std[std == 0] = 1.0
    return ((values - values.mean(axis=0)) / std).astype(np.float32)


def augment(
    xyz: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.9, 1.1),
    jitter: float = 0.001,
) -> tuple[np.ndarray, Augmentation]:
    """Rotate about z, scale isotropically, add Gaussian jitter and re-centre (authors' recipe).

    Only the network's xyz change; pixels come from the original coordinates (module docstring).
    """
    angle = float(rng.uniform(0.0, 2.0 * np.pi))
    scale = float(rng.uniform(*scale_range))
    c, s = np.cos(angle), np.sin(angle)
    x, y = xyz[:, 0].astype(np.float64), xyz[:, 1].astype(np.float64)
    # elementwise, not `xyz @ rotation.T`: that (N, 3) x (3, 3) BLAS call took ~55 ms instead of
    # ~1 ms for 131072 points when OpenBLAS threads contend for the cores of DataLoader workers
    out = np.stack([c * x - s * y, s * x + c * y, xyz[:, 2]], axis=1)
    out = out * scale + rng.normal(0.0, jitter, size=xyz.shape)
    out -= out.mean(axis=0)
    return out.astype(np.float32), Augmentation(angle, scale)


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def points_to_pixels(
    x: np.ndarray, y: np.ndarray, transform: Affine, size: int | tuple[int, int]
) -> np.ndarray:
    """Continuous (row, col) (N, 2) of map coordinates on a raster, clipped inside it.

    Continuous, so `point_pyramid` can floor them at every level; floor(row), floor(col) is the
    pixel the builder rasterised the point into. Points just outside (LAS quantisation at the
    tile edge) are clipped onto the border pixels, as in the authors' code.
    """
    height, width = _shape(size)
    inv = ~transform
    col = inv.a * x + inv.b * y + inv.c
    row = inv.d * x + inv.e * y + inv.f
    upper = np.nextafter(np.array([height, width], dtype=np.float64), 0.0)
    return np.clip(np.stack([row, col], axis=1), 0.0, upper)


def pixels_to_points(pixels: np.ndarray, transform: Affine) -> np.ndarray:
    """Map coordinates (N, 2) of the centres of integer (row, col) pixels (N, 2)."""
    rows, cols = pixels[:, 0] + 0.5, pixels[:, 1] + 0.5
    x = transform.a * cols + transform.b * rows + transform.c
    y = transform.d * cols + transform.e * rows + transform.f
    return np.stack([x, y], axis=1)


def select_points(arrays: dict[str, np.ndarray], grid_size: float) -> dict[str, np.ndarray]:
    """The deterministic part of the pipeline: a tile's non-noise, grid-subsampled points.

    `arrays` holds the LAS fields of `POINT_FIELDS` (x, y, z in map units, metres; ASPRS
    classification). Noise points are dropped first: they never label or shape a pixel in the
    build, and one stray high-noise point would dominate the xyz standardisation. Nothing here is
    random, so the training cache stores this result once per tile (`geoseg.datasets.cache`).
    """
    keep = ~np.isin(np.asarray(arrays["classification"]), list(NOISE_CODES))
    xyz = np.stack([arrays["x"], arrays["y"], arrays["z"]], axis=1)[keep]
    if len(xyz) == 0:
        raise ValueError("tile has no non-noise points")
    idx = np.flatnonzero(keep)[grid_subsample(xyz, grid_size)]
    return {name: np.asarray(arrays[name])[idx] for name in POINT_FIELDS}


def sample_points(
    points: dict[str, np.ndarray],
    tile_transform: Affine,
    size: int | tuple[int, int],
    cfg: PointConfig,
    rng: np.random.Generator,
    flip: bool = False,
    neighbours: bool = True,
) -> dict[str, np.ndarray | list[np.ndarray]]:
    """The per-sample part of the pipeline on `select_points`' output (see `prepare_points`)."""
    idx = sample_fixed(len(points["x"]), cfg.num_points, rng)
    x, y, z = (np.asarray(points[name])[idx] for name in ("x", "y", "z"))
    rowcol = points_to_pixels(x, y, tile_transform, size)
    xyz = standardise(np.stack([x, y, z], axis=1))
    features = standardise(np.stack([points[name][idx] for name in POINT_FEATURES], axis=1))
    if cfg.augment:
        xyz, _ = augment(xyz, rng)
    if flip:
        xyz[:, 0] *= -1.0

    pyramid = point_pyramid if neighbours else pyramid_levels
    out: dict[str, np.ndarray | list[np.ndarray]] = dict(
        pyramid(xyz, rowcol, levels=cfg.levels, ratio=cfg.ratio, k=cfg.k)
    )
    if flip:
        width = _shape(size)[1]
        for level, pixels in enumerate(out["pixels"]):
            pixels[:, 1] = width // 2**level - 1 - pixels[:, 1]
    out["features"] = features
    out["labels"] = remap_asprs(np.asarray(points["classification"])[idx]).astype(np.int64)
    return out


def prepare_points(
    arrays: dict[str, np.ndarray],
    tile_transform: Affine,
    size: int | tuple[int, int],
    cfg: PointConfig,
    rng: np.random.Generator,
    flip: bool = False,
    neighbours: bool = True,
) -> dict[str, np.ndarray | list[np.ndarray]]:
    """One tile's `PointsBatch` entries (no batch axis) plus N3C point `labels` (int64, N).

    `select_points(arrays)` then `sample_points`. `flip` mirrors the tile left-right (x and
    pixel columns); the caller flips image and mask to match. `neighbours=False` skips the kNN
    indices (`neighbors`, `sub_idx`, `interp_idx`), for callers that compute them batched on the
    device (`geoseg.models.batch.neighbour_indices`).
    """
    points = select_points(arrays, cfg.grid_size)
    return sample_points(points, tile_transform, size, cfg, rng, flip, neighbours)
