#!/usr/bin/env python3
"""A tiny, seeded ISPRS Vaihingen release with the official names, formats and colour codes.

`python tests/data/vaihingen/data.py OUT` writes it; the tests call `generate` into a temporary
folder. Layout as the 2D labelling release unpacks (docs/datasets.md):

    top/top_mosaic_09cm_area{N}.tif          3 x uint8 IR, R, G; geotransform, no CRS
    dsm/dsm_09cm_matching_area{N}.tif        1 x float32 metres; same grid
    gts_for_participants/top_mosaic_09cm_area{N}.tif                3 x uint8 colour codes
    gts_eroded_for_participants/top_mosaic_09cm_area{N}_noBoundary.tif   black boundaries
    ALS/Vaihingen_Strip_03.LAS, ALS/Vaihingen_Strip_05.LAS            LAS 1.2 PF1, no CRS
    3D/Vaihingen3D_Traininig.pts, 3D/Vaihingen3D_EVAL_WITH_REF.pts    X Y Z I rn nr label

Areas 1, 3, 11 are training, 5 validation (a default --val-areas), 2 and 4 test. Each area is
a small synthetic scene (roads, buildings, trees, cars, clutter on grass) whose image, DSM and
LiDAR agree with its reference; the .pts files only cover areas 1 and 3, like the real 3D
labelling subsets cover only part of the 2D areas.
"""

from __future__ import annotations

import sys
from pathlib import Path

import laspy
import numpy as np
import rasterio
from affine import Affine

AREAS = {1: (0, 0), 3: (1, 0), 11: (2, 0), 5: (0, 1), 2: (1, 1), 4: (2, 1)}
"""Area number -> (column, row) of its place in the fixture's mosaic."""
ORIGIN = (496900.0, 5420300.0)
GSD = 0.09
WIDTH, HEIGHT = 80, 72
"""Area size in px: not a multiple of the tests' 32 px tiles, so edge tiles are padded."""
SPACING = 10.0
"""Metres between area origins (areas are 7.2 x 6.5 m)."""

PALETTE = {
    1: (255, 255, 255),  # impervious surfaces
    2: (0, 0, 255),  # building
    3: (0, 255, 255),  # low vegetation
    4: (0, 255, 0),  # tree
    5: (255, 255, 0),  # car
    6: (255, 0, 0),  # clutter
}
IRRG = {1: (90, 120, 115), 2: (110, 150, 120), 3: (200, 110, 120), 4: (180, 70, 90),
        5: (60, 180, 60), 6: (140, 140, 40)}  # fmt: skip
HEIGHT_ABOVE = {1: 0.0, 2: 8.0, 3: 0.2, 4: 10.0, 5: 1.5, 6: 0.8}
INTENSITY = {1: 40, 2: 90, 3: 150, 4: 120, 5: 60, 6: 80}
GROUND = 255.0


def area_origin(area: int) -> tuple[float, float]:
    col, row = AREAS[area]
    return ORIGIN[0] + col * SPACING, ORIGIN[1] - row * SPACING


def scene(rng: np.random.Generator) -> np.ndarray:
    """(H, W) labels 1..6: grass, a road with cars, buildings, trees, a clutter blob."""
    label = np.full((HEIGHT, WIDTH), 3, np.uint8)
    r = int(rng.integers(20, 50))
    label[r : r + 8, :] = 1
    for _ in range(2):
        c = int(rng.integers(0, WIDTH - 8))
        label[r + 2 : r + 5, c : c + 6] = 5
    for _ in range(2):
        y, x = int(rng.integers(0, r - 14)), int(rng.integers(0, WIDTH - 20))
        label[y : y + 12, x : x + 18] = 2
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    for _ in range(3):
        cy, cx = int(rng.integers(r + 12, HEIGHT)), int(rng.integers(0, WIDTH))
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 4
    y, x = int(rng.integers(r + 10, HEIGHT - 4)), int(rng.integers(0, WIDTH - 4))
    label[y : y + 4, x : x + 4] = 6
    return label


def colours(label: np.ndarray, table: dict[int, tuple[int, int, int]]) -> np.ndarray:
    out = np.zeros((3, *label.shape), np.uint8)
    for value, rgb in table.items():
        out[:, label == value] = np.array(rgb, np.uint8)[:, None]
    return out


def eroded(label: np.ndarray) -> np.ndarray:
    """The no-boundary reference: pixels next to another class (8-neighbourhood) set to 0."""
    padded = np.pad(label, 1, mode="edge")
    edge = np.zeros(label.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shifted = padded[1 + dy : 1 + dy + label.shape[0], 1 + dx : 1 + dx + label.shape[1]]
            edge |= shifted != label
    out = label.copy()
    out[edge] = 0
    return out


def write_tif(path: Path, data: np.ndarray, transform: Affine | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1],
               "count": data.shape[0], "dtype": data.dtype.name, "crs": None}  # fmt: skip
    if transform is not None:
        profile["transform"] = transform
    if data.shape[0] == 3:
        profile["photometric"] = "RGB"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)


def points(label: np.ndarray, dsm: np.ndarray, x0: float, y0: float, rng) -> dict[str, np.ndarray]:
    """~30 points/m² over one area: z from the DSM, intensity by class, 2 returns under trees."""
    n = int(WIDTH * HEIGHT * GSD * GSD * 30)
    col, row = rng.uniform(0, WIDTH, n), rng.uniform(0, HEIGHT, n)
    cls = label[row.astype(int), col.astype(int)]
    tree = cls == 4
    nret = np.where(tree, 2, 1).astype(np.uint8)
    rn = np.where(tree & (rng.random(n) < 0.4), 2, 1).astype(np.uint8)
    z = dsm[row.astype(int), col.astype(int)] + rng.normal(0, 0.05, n)
    z[rn == 2] = GROUND + rng.normal(0, 0.05, int((rn == 2).sum()))
    inten = np.array([INTENSITY[int(c)] for c in cls]) + rng.integers(0, 10, n)
    return {"x": x0 + col * GSD, "y": y0 - row * GSD, "z": z, "intensity": inten,
            "return_number": rn, "number_of_returns": nret, "label": cls}  # fmt: skip


def write_las(path: Path, pts: dict[str, np.ndarray]) -> None:
    """LAS 1.2, point format 1 (the ALS50 era's), no CRS record (assigned from --crs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = laspy.LasHeader(point_format=1, version="1.2")
    header.scales = np.array([0.01, 0.01, 0.01])
    header.offsets = np.array([ORIGIN[0], ORIGIN[1] - 100, 0.0])
    las = laspy.LasData(header)
    for name in ("x", "y", "z", "intensity", "return_number", "number_of_returns"):
        setattr(las, name, pts[name])
    las.classification = np.ones(len(pts["x"]), np.uint8)
    las.write(str(path))


def write_pts(path: Path, pts: dict[str, np.ndarray]) -> None:
    """The 3D-labelling text format; the last column is a 3D class (0..8), unused by geoseg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [pts[k] for k in ("x", "y", "z", "intensity", "return_number", "number_of_returns")]
    table = np.column_stack([*columns, pts["label"] % 9])
    np.savetxt(path, table, fmt=["%.2f", "%.2f", "%.2f", "%d", "%d", "%d", "%d"])


def generate(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    strips: dict[str, list[dict[str, np.ndarray]]] = {"03": [], "05": []}
    pts3d: dict[str, list[dict[str, np.ndarray]]] = {"Traininig": [], "EVAL_WITH_REF": []}
    for area in AREAS:
        label = scene(rng)
        x0, y0 = area_origin(area)
        transform = Affine(GSD, 0, x0, 0, -GSD, y0)
        irrg = colours(label, IRRG).astype(np.int16) + rng.integers(-8, 9, (3, HEIGHT, WIDTH))
        write_tif(root / f"top/top_mosaic_09cm_area{area}.tif", irrg.clip(1, 255).astype(np.uint8),
                  transform)  # fmt: skip
        dsm = GROUND + np.vectorize(HEIGHT_ABOVE.get)(label).astype(np.float32)
        write_tif(root / f"dsm/dsm_09cm_matching_area{area}.tif", dsm[None], transform)
        write_tif(root / f"gts_for_participants/top_mosaic_09cm_area{area}.tif",
                  colours(label, PALETTE), None)  # fmt: skip
        write_tif(root / f"gts_eroded_for_participants/top_mosaic_09cm_area{area}_noBoundary.tif",
                  colours(eroded(label), PALETTE), None)  # fmt: skip
        pts = points(label, dsm, x0, y0, rng)
        strips["03" if AREAS[area][0] < 2 else "05"].append(pts)
        if area == 1:
            pts3d["Traininig"].append(pts)
        elif area == 3:
            pts3d["EVAL_WITH_REF"].append(pts)
    for name, parts in strips.items():
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        write_las(root / f"ALS/Vaihingen_Strip_{name}.LAS", merged)
    for name, parts in pts3d.items():
        write_pts(root / f"3D/Vaihingen3D_{name}.pts", parts[0])
    return root


if __name__ == "__main__":
    generate(Path(sys.argv[1]))
