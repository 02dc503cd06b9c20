"""The batch every geoseg model consumes and the output dict every model returns.

The dataset layer produces `Batch`; the models never compute neighbourhoods themselves. The kNN,
sub-sampling and interpolation indices come either from DataLoader workers (scipy cKDTree per
tile) or, when training on a GPU, from `neighbour_indices` on the whole batch on the device
(`geoseg.models.neighbors.grid_knn`), which keeps 131072-point tiles from starving the GPU. Point
levels follow RandLA-Net: level l+1 keeps the first N_l // ratio points of level l (the points
are shuffled once, so "first" is a random sample), and every level carries the (row, col) of its
points on the image grid halved l times, so point features can be placed under the U-Net maps.

`make_dummy_batch` builds a small, geometrically consistent batch for tests and smoke runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TypedDict, TypeVar

import numpy as np
import torch
from torch import Tensor

from geoseg.models.neighbors import knn

Array = TypeVar("Array", np.ndarray, Tensor)


class PointsBatch(TypedDict):
    """Point-cloud pyramid of a batch; B tiles, L sub-sampling levels, N_0 = N points.

    xyz:        L+1 × float32 (B, N_l, 3), standardised coordinates; N_{l+1} = N_l // ratio.
    features:   float32 (B, N, F), standardised (intensity, return number); the network input
                is concat(xyz[0], features), so point_in_channels = 3 + F.
    neighbors:  L × int64 (B, N_l, k), kNN of xyz[l] within xyz[l] (self included).
    sub_idx:    L × int64 (B, N_{l+1}, k), neighbours (in level l) of the points kept at l+1.
    interp_idx: L × int64 (B, N_l, 1), nearest level-(l+1) point of each level-l point.
    pixels:     L+1 × int64 (B, N_l, 2), (row, col) on the H/2^l × W/2^l grid, in range.
    """

    xyz: list[Tensor]
    features: Tensor
    neighbors: list[Tensor]
    sub_idx: list[Tensor]
    interp_idx: list[Tensor]
    pixels: list[Tensor]


class Batch(TypedDict):
    """Model input: a normalised image (B, C, H, W) and the matching point pyramid.

    H and W must be divisible by 2^L (U-Net pooling and the pixel pyramid).
    """

    image: Tensor
    points: PointsBatch


class ModelOutput(TypedDict):
    """Model output; every model returns all three keys.

    logits:       (B, num_classes, H, W) pixel scores.
    point_logits: (B, N, num_classes) per-point scores, None for image-only models.
    gates:        GKG spatial gates (B, 1, H_i, W_i), coarsest first, None without GKG.
    """

    logits: Tensor
    point_logits: Tensor | None
    gates: list[Tensor] | None


def class_probabilities(logits: Tensor, dim: int) -> Tensor:
    """Softmax over the real classes (index 1 on) along `dim`, in float32: the class-0
    ("unlabeled") score is never trained, so it takes no share of the probability."""
    return logits.narrow(dim, 1, logits.shape[dim] - 1).float().softmax(dim)


def probabilities_as_logits(probabilities: Tensor, dim: int) -> Tensor:
    """log of the real classes' probabilities with class 0 in front at the floor (finite), so
    that arg-max, a softmax or a cross-entropy read them as they read a model's logits."""
    floor = torch.finfo(probabilities.dtype).tiny
    log = probabilities.clamp_min(floor).log()
    shape = list(log.shape)
    shape[dim] = 1
    return torch.cat([log.new_full(shape, math.log(floor)), log], dim)


def pyramid_levels(
    xyz: np.ndarray, rowcol: np.ndarray, levels: int = 4, ratio: int = 4, k: int = 16
) -> dict[str, list[np.ndarray]]:
    """The `xyz` and `pixels` levels of one shuffled point cloud: the cheap part of the pyramid.

    xyz (N, 3) are the network's coordinates; rowcol (N, 2) are the continuous (row, col) image
    positions of the points at full resolution (e.g. from the geotransform). Level l keeps the
    first N // ratio^l points; k only checks that every level but the last has k points.
    """
    n_levels = [len(xyz) // ratio**level for level in range(levels + 1)]
    if n_levels[-1] < 1 or n_levels[-2] < k:
        raise ValueError(f"{len(xyz)} points are too few for {levels} levels with k={k}")
    return {
        "xyz": [xyz[:n].astype(np.float32) for n in n_levels],
        "pixels": [np.floor(rowcol[:n] / 2**lv).astype(np.int64) for lv, n in enumerate(n_levels)],
    }


def neighbour_indices(
    xyz: Sequence[Array], k: int = 16, search: Callable[[Array, Array, int], Array] = knn
) -> dict[str, list[Array]]:
    """`neighbors`, `sub_idx` and `interp_idx` of the `xyz` levels of a pyramid.

    Works on one tile's numpy levels (N_l, 3) (DataLoader workers, cKDTree) and on a batch's
    torch levels (B, N_l, 3) on the training device (`N3CDataModule.on_after_batch_transfer`):
    `search` is `knn` (dispatching on the array type) or e.g. `grid_knn`.
    """
    out: dict[str, list[Array]] = {"neighbors": [], "sub_idx": [], "interp_idx": []}
    for pts, kept in itertools.pairwise(xyz):
        neighbors = search(pts, pts, k)
        out["neighbors"].append(neighbors)
        out["sub_idx"].append(neighbors[..., : kept.shape[-2], :])
        out["interp_idx"].append(search(pts, kept, 1))
    return out


def point_pyramid(
    xyz: np.ndarray, rowcol: np.ndarray, levels: int = 4, ratio: int = 4, k: int = 16
) -> dict[str, list[np.ndarray]]:
    """Neighbourhoods, sub-sampling and pixel pyramids of one shuffled point cloud.

    `pyramid_levels` + `neighbour_indices`: numpy arrays keyed like `PointsBatch` (without
    `features`), without batch axis.
    """
    out = pyramid_levels(xyz, rowcol, levels, ratio, k)
    return out | neighbour_indices(out["xyz"], k)


def make_dummy_batch(
    batch_size: int = 2,
    image_size: int = 64,
    num_points: int = 4096,
    levels: int = 4,
    ratio: int = 4,
    k: int = 16,
    in_channels: int = 4,
    seed: int = 0,
) -> Batch:
    """A random but geometrically consistent batch (real kNN, 1-NN interpolation, projection).

    Points are uniform over a square tile of `image_size` 1-m pixels with a random height; the
    pixel pyramids come from their planimetric position, so they are what a real tile gives.
    """
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(batch_size):
        plan = rng.uniform(0, image_size, size=(num_points, 2))  # (x east, y north) in pixels
        z = rng.normal(0.0, 5.0, size=(num_points, 1))
        xyz = np.concatenate([plan, z], axis=1)
        rowcol = np.stack([image_size - plan[:, 1], plan[:, 0]], axis=1)  # north-up raster
        rowcol = np.clip(rowcol, 0, image_size - 1e-6)
        xyz = (xyz - xyz.mean(0)) / xyz.std(0)
        samples.append(point_pyramid(xyz, rowcol, levels=levels, ratio=ratio, k=k))

    def stack(key: str) -> list[Tensor]:
        return [
            torch.from_numpy(np.stack([s[key][i] for s in samples]))
            for i in range(len(samples[0][key]))
        ]

    features = rng.standard_normal((batch_size, num_points, 2)).astype(np.float32)
    image = rng.standard_normal((batch_size, in_channels, image_size, image_size))
    return Batch(
        image=torch.from_numpy(image.astype(np.float32)),
        points=PointsBatch(
            xyz=stack("xyz"),
            features=torch.from_numpy(features),
            neighbors=stack("neighbors"),
            sub_idx=stack("sub_idx"),
            interp_idx=stack("interp_idx"),
            pixels=stack("pixels"),
        ),
    )
