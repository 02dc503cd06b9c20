"""The point pipeline of one tile, as in the IKD-Net authors' code (Open3D-ML, RandLA-Net).

grid sub-sampling -> fixed-size random sample -> projection to pixels -> standardisation ->
augmentation -> kNN / sub-sampling pyramid (`geoseg.models.batch.point_pyramid`). When training
on a GPU the kNN part is left to the device (`neighbours=False`, see `N3CDataModule`).

Pixels are computed from the *original* planimetric coordinates, before standardisation and
augmentation, exactly like the authors' "Dimension Sensor". Rotating, scaling or jittering the
network's xyz therefore never moves a point to another pixel, and the image needs no matching
transform. The augmentations that must touch both modalities are the tile's dihedral views
(`View`: a horizontal flip, then quarter turns): they move xyz and the pixel indices, and the
caller moves the image and mask the same way (`View.apply`).

Everything here is plain numpy (plus scipy inside `point_pyramid`), so it runs in DataLoader
workers and is testable without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np
from affine import Affine

from geoseg.classes import N3C, NOISE_CODES, point_labels
from geoseg.models.batch import Array, point_pyramid, pyramid_levels

POINT_FEATURES = ("intensity", "return_number")
"""Per-point input features after xyz, as in the authors' loader (point_in_channels = 5); the
default of `PointConfig.features`."""

POINT_FIELDS = ("x", "y", "z", *POINT_FEATURES, "classification")
"""The LAS fields the pipeline always reads (plus every extra dimension the file has)."""


def read_points(path: str | Path) -> dict[str, np.ndarray]:
    """A tile's `points.laz` as the `POINT_FIELDS` arrays and its extra dimensions (e.g.
    `label`, `intensity_c1`), x/y/z as float64 map coordinates.

    Decompresses on the calling thread: the DataLoader's forked workers already read in
    parallel, and lazrs's parallel backend hangs in a forked child once the parent has used it
    (its thread pool does not survive the fork)."""
    las = laspy.read(path, laz_backend=laspy.LazBackend.Lazrs)
    names = (*POINT_FIELDS, *las.point_format.extra_dimension_names)
    return {name: np.asarray(las[name]) for name in names}


@dataclass(frozen=True)
class PointConfig:
    """Point sampling and pyramid settings; defaults are the authors' released config.

    grid_size is in metres (z is in metres in every build). `augment` turns on the training
    augmentation of the points: rotation about z, scale and jitter (the views shared with the
    image are the dataset's, `View`). `replace`: draw the sample with replacement, as the
    released code does (`np.random.choice(n, num_points)`), instead of every point at most once
    until the tile runs out (docs/ikdnet.md, deviations). `features`: the per-point inputs after
    xyz (LAS fields or extra dimensions of the build's points.laz, e.g. DFC2018's
    `intensity_c1..3`); the point branch takes 3 + len(features).
    """

    num_points: int = 131072
    grid_size: float = 0.06
    levels: int = 4
    ratio: int = 4
    k: int = 16
    augment: bool = False
    replace: bool = False
    features: tuple[str, ...] = POINT_FEATURES

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))  # lists from YAML / contract
        if not self.features:
            raise ValueError("features must name at least one per-point input")
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


def sample_fixed(
    n: int, num_points: int, rng: np.random.Generator, replace: bool = False
) -> np.ndarray:
    """`num_points` shuffled indices into n points; duplicates pad tiles with fewer points.

    Shuffled, because the pyramid keeps the first N_l points of each level as its random sample.
    With `replace` every index is an independent draw (duplicates even in dense tiles).
    """
    if n == 0:
        raise ValueError("cannot sample points from an empty point cloud")
    if replace:
        return rng.choice(n, num_points, replace=True)
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


@dataclass(frozen=True)
class TileAugment:
    """Training augmentation of a whole tile, shared by image, mask and points (`View`).

    flip: mirror left-right with probability 1/2 (the authors' code has none: our choice, see
    docs/ikdnet.md, deviations); rotate: a uniform number of quarter turns; jitter: per-band
    brightness and contrast of the normalised image, x U(1 - j, 1 + j) + U(-j, j) (in band
    standard deviations), so a model cannot key on one flight's exact colours.
    """

    flip: bool = True
    rotate: bool = False
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def colour(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The jittered (C, H, W) image."""
        bands = image.shape[0]
        scale = rng.uniform(1 - self.jitter, 1 + self.jitter, (bands, 1, 1))
        shift = rng.uniform(-self.jitter, self.jitter, (bands, 1, 1))
        return (image * scale + shift).astype(np.float32)


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass(frozen=True)
class View:
    """A dihedral view of a tile: mirror left-right (`flip`), then `turns` quarter turns
    counter-clockwise (np.rot90). Applied to the image and mask (`apply`), the point pixels
    (`pixels`) and the network's xyz (`xyz`) alike, so every modality sees the same scene.

    Every method takes numpy arrays and torch tensors alike, with any leading axes (a batch),
    so test-time augmentation (`geoseg.train.tta`) moves a collated batch the way the dataset
    moves one tile; `inverse` maps a prediction made in the view back to the tile.
    """

    flip: bool = False
    turns: int = 0

    @staticmethod
    def draw(rng: np.random.Generator, flip: bool, rotate: bool) -> View:
        """A random view: a flip with probability 1/2, a uniform number of quarter turns."""
        mirrored = flip and bool(rng.random() < 0.5)
        return View(mirrored, int(rng.integers(4)) if rotate else 0)

    @property
    def inverse(self) -> View:
        """The view that undoes this one: a mirrored view is its own inverse, turns go back."""
        return View(self.flip, self.turns % 4 if self.flip else -self.turns % 4)

    def apply(self, raster: Array) -> Array:
        """The view of a (..., H, W) array or tensor (a copy: the result is contiguous)."""
        if isinstance(raster, np.ndarray):
            out = raster[..., ::-1] if self.flip else raster
            return np.ascontiguousarray(np.rot90(out, self.turns, axes=(-2, -1)))
        out = raster.flip(-1) if self.flip else raster
        return out.rot90(self.turns, (-2, -1)).contiguous()

    def pixels(self, pixels: Array, size: tuple[int, int]) -> None:
        """Move integer (row, col) (..., 2) on an H x W grid to the view's grid, in place."""
        height, width = size
        if self.turns % 2 and height != width:
            raise ValueError(f"quarter turns need a square tile, not {height}x{width}")
        if self.flip:
            pixels[..., 1] = width - 1 - pixels[..., 1]
        for _ in range(self.turns % 4):  # (r, c) -> (W - 1 - c, r)
            row = width - 1 - pixels[..., 1]
            pixels[..., 1] = pixels[..., 0]
            pixels[..., 0] = row

    def xyz(self, xyz: Array) -> None:
        """Mirror x and turn (x, y) -> (-y, x) per quarter turn, in place (x east, y north);
        xyz is (..., 3)."""
        if self.flip:
            xyz[..., 0] *= -1.0
        for _ in range(self.turns % 4):
            x = -xyz[..., 1]
            xyz[..., 1] = xyz[..., 0]
            xyz[..., 0] = x


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
    return {name: np.asarray(values)[idx] for name, values in arrays.items()}


def sample_points(
    points: dict[str, np.ndarray],
    tile_transform: Affine,
    size: int | tuple[int, int],
    cfg: PointConfig,
    rng: np.random.Generator,
    view: View | None = None,
    neighbours: bool = True,
    score: bool = False,
    num_classes: int = len(N3C),
) -> dict[str, np.ndarray | list[np.ndarray]]:
    """The per-sample part of the pipeline on `select_points`' output (see `prepare_points`);
    `num_classes`: the build's, for `label_counts`."""
    idx = sample_fixed(len(points["x"]), cfg.num_points, rng, cfg.replace)
    x, y, z = (np.asarray(points[name])[idx] for name in ("x", "y", "z"))
    rowcol = points_to_pixels(x, y, tile_transform, size)
    xyz = standardise(np.stack([x, y, z], axis=1))
    missing = [name for name in cfg.features if name not in points]
    if missing:
        raise ValueError(f"the points have no {missing}; they have {sorted(points)}")
    features = standardise(np.stack([points[name][idx] for name in cfg.features], axis=1))
    if cfg.augment:
        xyz, _ = augment(xyz, rng)
    if view is not None:
        view.xyz(xyz)

    pyramid = point_pyramid if neighbours else pyramid_levels
    out: dict[str, np.ndarray | list[np.ndarray]] = dict(
        pyramid(xyz, rowcol, levels=cfg.levels, ratio=cfg.ratio, k=cfg.k)
    )
    if view is not None:
        height, width = _shape(size)
        for level, pixels in enumerate(out["pixels"]):
            view.pixels(pixels, (height // 2**level, width // 2**level))
    out["features"] = features
    labels = point_labels(points)
    out["labels"] = labels[idx].astype(np.int64)
    if score:
        out["label_counts"] = label_counts(points, idx, num_classes, labels)
    return out


def label_counts(
    points: dict[str, np.ndarray],
    idx: np.ndarray,
    num_classes: int = len(N3C),
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Per sampled point, the labels of the tile points it stands for: (len(idx), K) int32,
    K = `num_classes` (the build's; `labels` defaults to `point_labels(points)`).

    Point metrics must count each of the tile's points once, but the network sees a fixed-size
    sample: duplicates pad small tiles and large tiles leave points out. Each point of the tile
    (after `select_points`) is assigned to its first occurrence in the sample or, if it was not
    drawn, to the nearest drawn point in map coordinates (x, y, z in metres), as RandLA-Net's
    test-time projection does; its label is counted there. Duplicates count nothing, and the
    counts of a tile sum to its number of points.
    """
    from scipy.spatial import cKDTree

    labels = (point_labels(points) if labels is None else labels).astype(np.int64)
    owner = np.full(len(labels), -1, dtype=np.int64)
    drawn, first = np.unique(idx, return_index=True)
    owner[drawn] = first
    missing = np.flatnonzero(owner < 0)
    if len(missing):
        xyz = np.stack([points[name] for name in ("x", "y", "z")], axis=1).astype(np.float64)
        _, nearest = cKDTree(xyz[drawn]).query(xyz[missing])
        owner[missing] = first[nearest]
    counts = np.zeros((len(idx), num_classes), dtype=np.int32)
    np.add.at(counts, (owner, labels), 1)
    return counts


def prepare_points(
    arrays: dict[str, np.ndarray],
    tile_transform: Affine,
    size: int | tuple[int, int],
    cfg: PointConfig,
    rng: np.random.Generator,
    view: View | None = None,
    neighbours: bool = True,
) -> dict[str, np.ndarray | list[np.ndarray]]:
    """One tile's `PointsBatch` entries (no batch axis) plus point `labels` (int64, N).

    `select_points(arrays)` then `sample_points`. `view` (e.g. a flip) moves xyz and the pixels;
    the caller moves image and mask to match (`View.apply`). `neighbours=False` skips the kNN
    indices (`neighbors`, `sub_idx`, `interp_idx`), for callers that compute them batched on the
    device (`geoseg.models.batch.neighbour_indices`).
    """
    points = select_points(arrays, cfg.grid_size)
    return sample_points(points, tile_transform, size, cfg, rng, view, neighbours)
