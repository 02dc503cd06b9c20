"""Exact kNN: the grid search (run on CPU here) against brute force and scipy's cKDTree."""

from __future__ import annotations

from pathlib import Path

import laspy
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from geoseg.datasets.points import sample_fixed, standardise
from geoseg.models.neighbors import brute_force_knn, grid_knn, knn

K = 16


def assert_same_neighbours(
    query: np.ndarray, reference: np.ndarray, a: np.ndarray, b: np.ndarray, rtol: float = 1e-5
) -> None:
    """Two kNN results (M, k) agree: equal distances rank by rank, and the same points except
    among ties. Duplicated points (padding) count as one point; distances are compared in
    float64, so float32/float64 last-ulp near-ties may swap, but nothing else."""
    query, reference = query.astype(np.float64), reference.astype(np.float64)
    da = ((reference[a] - query[:, None]) ** 2).sum(-1)
    db = ((reference[b] - query[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(da, db, rtol=rtol, atol=1e-12)
    assert (np.diff(da, axis=1) >= -rtol * da[:, 1:]).all(), "not sorted nearest first"
    _, point_id = np.unique(reference, axis=0, return_inverse=True)
    point_id = point_id.ravel()
    sure = da < da[:, -1:] * (1 - 10 * rtol) - 1e-12  # not tied with the k-th neighbour
    ids_a = np.sort(np.where(sure, point_id[a], -1), axis=1)
    ids_b = np.sort(np.where(sure, point_id[b], -1), axis=1)
    np.testing.assert_array_equal(ids_a, ids_b)


def ckdtree(query: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    return cKDTree(reference).query(query, k=k)[1].reshape(len(query), k)


def adversarial(name: str, rng: np.random.Generator, n: int = 1500) -> np.ndarray:
    """Point sets that break naive grids: degenerate extents, density contrasts, duplicates."""
    u = rng.uniform(size=(n, 3))
    if name == "uniform":
        return u
    if name == "vertical_wall":  # zero extent along y
        return np.c_[u[:, 0], np.zeros(n), 30 * u[:, 2]]
    if name == "line":  # two zero extents
        return np.c_[u[:, 0], np.zeros(n), np.zeros(n)]
    if name == "duplicates":  # 100 points, each 30 times: more copies than k
        return np.repeat(u[:50], 30, axis=0)
    if name == "clusters":  # a 1e-4-wide blob next to a sparse cloud: cells hold > k points
        return np.r_[0.5 + 1e-4 * rng.normal(size=(n // 2, 3)), 10 * u[: n - n // 2]]
    if name == "lattice":  # exact distance ties everywhere
        g = np.arange(11, dtype=np.float64)
        return np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    if name == "outlier":  # one far point stretches the bounding box
        return np.r_[u[:-1], [[1e4, 1e4, 1e4]]]
    if name == "identical":
        return np.ones((200, 3))
    raise ValueError(name)


CASES = (
    "uniform",
    "vertical_wall",
    "line",
    "duplicates",
    "clusters",
    "lattice",
    "outlier",
    "identical",
)


@pytest.mark.parametrize("name", CASES)
def test_grid_equals_brute_force_exactly(name: str) -> None:
    pts = torch.from_numpy(adversarial(name, np.random.default_rng(0))).float()
    expected = brute_force_knn(pts, pts, K)
    np.testing.assert_array_equal(grid_knn(pts, pts, K).numpy(), expected.numpy())
    # every path of the search: several rounds, chunking, and a brute-force fallback
    tight = grid_knn(pts, pts, K, cell_points=0.5, rounds=1, max_candidates=2**16)
    np.testing.assert_array_equal(tight.numpy(), expected.numpy())


@pytest.mark.parametrize("name", CASES)
def test_grid_agrees_with_ckdtree(name: str) -> None:
    pts = adversarial(name, np.random.default_rng(1)).astype(np.float32)
    found = grid_knn(torch.from_numpy(pts), torch.from_numpy(pts), K).numpy()
    assert_same_neighbours(pts, pts, found, ckdtree(pts, pts, K))


def test_ties_are_ordered_by_index() -> None:
    pts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 0, -1], [5, 5, 5]])
    np.testing.assert_array_equal(grid_knn(pts, pts[:1], 1).numpy(), [[0]] * 6)
    np.testing.assert_array_equal(grid_knn(pts[:1], pts, 5).numpy(), [[0, 1, 2, 3, 4]])


def test_other_query_set_batched_tiles_and_k_above_cell_counts() -> None:
    """Queries outside the reference's box, tiles of very different scales in one batch, and
    k = 100 (many cells' worth of points): each tile gets its own indices."""
    rng = np.random.default_rng(2)
    ref = np.stack([rng.uniform(size=(2000, 3)), 1e3 * rng.normal(size=(2000, 3))])
    qry = np.stack([rng.uniform(-2, 3, size=(700, 3)), 1e3 * rng.normal(size=(700, 3))])
    ref_t, qry_t = torch.from_numpy(ref).float(), torch.from_numpy(qry).float()
    for k in (1, K, 100):
        found = grid_knn(qry_t, ref_t, k)
        assert found.shape == (2, 700, k) and found.dtype == torch.int64
        np.testing.assert_array_equal(found.numpy(), brute_force_knn(qry_t, ref_t, k).numpy())
        for tile in range(2):
            q, r = qry_t[tile].numpy(), ref_t[tile].numpy()
            assert_same_neighbours(q, r, found[tile].numpy(), ckdtree(q, r, k))


def test_real_lidar_tiles_agree_with_ckdtree(sample_build: Path) -> None:
    """Standardised points of real sample tiles, padded with duplicates as the pipeline does."""
    rng = np.random.default_rng(0)
    tiles = sorted((sample_build / "tiles").glob("*/points.laz"))
    assert tiles
    clouds = []
    for path in tiles[:: max(1, len(tiles) // 3)][:3]:
        las = laspy.read(path)
        xyz = np.stack([las.x, las.y, las.z], axis=1)
        clouds.append(standardise(xyz[sample_fixed(len(xyz), 4096, rng)]))
    batch = torch.from_numpy(np.stack(clouds))
    found = grid_knn(batch, batch, K)
    np.testing.assert_array_equal(found[0].numpy(), brute_force_knn(batch[0], batch[0], K).numpy())
    for cloud, idx in zip(clouds, found.numpy(), strict=True):
        assert_same_neighbours(cloud, cloud, idx, ckdtree(cloud, cloud, K))


def test_knn_dispatch_numpy_and_torch() -> None:
    rng = np.random.default_rng(3)
    pts = rng.uniform(size=(500, 3)).astype(np.float32)
    expected = ckdtree(pts, pts, 8)
    out = knn(pts, pts, 8)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    np.testing.assert_array_equal(out, expected)
    tensor = torch.from_numpy(pts)
    np.testing.assert_array_equal(knn(tensor, tensor, 8).numpy(), expected)  # CPU: cKDTree
    batched = knn(tensor.expand(2, -1, -1), tensor.expand(2, -1, -1), 8)
    assert batched.shape == (2, 500, 8)
    np.testing.assert_array_equal(batched[1].numpy(), expected)


def test_bad_inputs_are_refused() -> None:
    pts = torch.zeros(10, 3)
    with pytest.raises(ValueError, match="k=11"):
        grid_knn(pts, pts, 11)
    with pytest.raises(ValueError, match="expected"):
        grid_knn(torch.zeros(10, 2), pts, 3)
    with pytest.raises(ValueError, match="query"):
        grid_knn(torch.zeros(2, 10, 3), torch.zeros(3, 10, 3), 3)
