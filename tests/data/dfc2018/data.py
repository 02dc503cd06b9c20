#!/usr/bin/env python3
"""A tiny, seeded DFC2018 (Houston) release with the official folder and file names.

`python tests/data/dfc2018/data.py OUT` writes it; the tests call `generate` into a temporary
folder. Layout as `phase2.zip` unpacks (docs/datasets.md), all in NAD83 / UTM 15N:

    2018IEEE_Contest/Phase2/
      Final RGB HR Imagery/UH_NAD83_<xmin>_<ymin>.tif        3 x uint8, 5 cm
      Lidar GeoTiff Rasters/DSM_C12/UH17c_GEF051.tif         float32 0.5 m (1e10 = no data)
      Lidar GeoTiff Rasters/Intensity_C{1,2,3}/UH17_GI{1,2,3}F051.tif   float32 0.5 m
      Lidar Point Cloud Tiles/C{1,2,3}/<xmin>_<ymin>.las     LAS 1.2 PF1, no CRS record
      FullHSIDataset/20170218_UH_CASI_S4_NAD83.pix           48 x uint16, 1 m (PCIDSK)
      TrainingGT/2018_IEEE_GRSS_DFC_GT_TR.tif                uint8 0..20, 0.5 m
    test_labels.tif (beside the release, as --test-labels)   uint8 0..20 over the scene

The scene is 4 x 2 VHR tiles of 32 m (the real ones are ~596 x 601 m); the training ground
truth covers part of the southern row, 120 x 56 px, so with the tests' 32 px tiles the cells
on its east and south edges straddle the train/test border, as in the real release.
"""

from __future__ import annotations

import sys
from pathlib import Path

import laspy
import numpy as np
import rasterio
from affine import Affine

CRS = "EPSG:26915"
WEST, SOUTH = 271460.0, 3289689.0
TILE_M, COLS, ROWS = 32.0, 4, 2
GT_ORIGIN = (271492.0, 3289721.0)
GT_SHAPE = (56, 120)
"""Training ground truth rows x cols at 0.5 m: x 271492..271552, y 3289693..3289721."""
NORTH = SOUTH + ROWS * TILE_M
CLASS_COLOUR = np.random.default_rng(2018).integers(20, 236, (21, 3)).astype(np.uint8)
HEIGHT_ABOVE = np.array([0, 0.1, 0.1, 0.05, 12, 9, 0, -0.5, 7, 15, 0, 0.1, 0, 0, 0, 0.3, 0, 0,
                         1.5, 4, 6], np.float32)  # fmt: skip
GROUND = 12.0


def scene(rng: np.random.Generator) -> np.ndarray:
    """Class values 1..20 over the scene at 0.5 m: rectangles of every class on grass."""
    h, w = int(ROWS * TILE_M * 2), int(COLS * TILE_M * 2)
    label = np.ones((h, w), np.uint8)
    for value in rng.permutation(np.arange(2, 21).repeat(4)):
        y, x = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
        label[y : y + int(rng.integers(3, 12)), x : x + int(rng.integers(3, 12))] = value
    return label


def write(path: Path, data: np.ndarray, transform: Affine, nodata=None, driver="GTiff") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver=driver, width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype.name, crs=CRS,
                       transform=transform, nodata=nodata) as dst:  # fmt: skip
        dst.write(data)


def write_las(path: Path, x, y, z, intensity, returns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = laspy.LasHeader(point_format=1, version="1.2")
    header.scales = np.array([0.01, 0.01, 0.01])
    header.offsets = np.array([WEST, SOUTH, 0.0])
    las = laspy.LasData(header)
    las.x, las.y, las.z = x, y, z
    las.intensity = intensity
    las.return_number = returns
    las.number_of_returns = returns
    las.classification = np.where(z > GROUND + 0.5, 1, 2).astype(np.uint8)
    las.write(str(path))


def generate(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    release = root / "2018IEEE_Contest" / "Phase2"
    label = scene(rng)
    half = Affine(0.5, 0, WEST, 0, -0.5, NORTH)
    dsm = GROUND + HEIGHT_ABOVE[label]
    dsm[:4, :4] = 1e10  # the release's fill value
    lidar = release / "Lidar GeoTiff Rasters"
    write(lidar / "DSM_C12" / "UH17c_GEF051.tif", dsm[None].astype(np.float32), half)
    brightness = rng.uniform(50, 400, (3, 21)).astype(np.float32)
    for c in range(3):
        write(lidar / f"Intensity_C{c + 1}" / f"UH17_GI{c + 1}F051.tif",
              brightness[c][label][None], half)  # fmt: skip
    fine = np.repeat(np.repeat(label, 10, 0), 10, 1)  # 5 cm
    for col in range(COLS):
        for row in range(ROWS):
            x0, y1 = WEST + col * TILE_M, NORTH - row * TILE_M
            r, c = slice(row * 640, (row + 1) * 640), slice(col * 640, (col + 1) * 640)
            rgb = CLASS_COLOUR[fine[r, c]].transpose(2, 0, 1) + rng.integers(0, 12, (3, 640, 640))
            name = f"UH_NAD83_{x0:.0f}_{y1 - TILE_M:.0f}.tif"
            write(release / "Final RGB HR Imagery" / name, rgb.clip(1, 255).astype(np.uint8),
                  Affine(0.05, 0, x0, 0, -0.05, y1))  # fmt: skip
            for channel in range(3):
                n = int(TILE_M * TILE_M * 6)
                x, y = x0 + rng.uniform(0, TILE_M, n), y1 - rng.uniform(0, TILE_M, n)
                pr = ((NORTH - y) * 2).astype(int).clip(0, label.shape[0] - 1)
                pc = ((x - WEST) * 2).astype(int).clip(0, label.shape[1] - 1)
                cls = label[pr, pc]
                z = GROUND + HEIGHT_ABOVE[cls] + rng.normal(0, 0.05, n)
                inten = (brightness[channel][cls] + rng.normal(0, 5, n)).clip(0, 65535)
                write_las(release / "Lidar Point Cloud Tiles" / f"C{channel + 1}" /
                          f"{x0:.0f}_{y1 - TILE_M:.0f}.las", x, y, z, inten.astype(np.uint16),
                          np.ones(n, np.uint8))  # fmt: skip
    hsi = rng.integers(100, 200, (48, 1, 1)) * label[::2, ::2][None].astype(np.uint16)
    write(release / "FullHSIDataset" / "20170218_UH_CASI_S4_NAD83.pix", hsi.astype(np.uint16),
          Affine(1.0, 0, WEST, 0, -1.0, NORTH), driver="PCIDSK")  # fmt: skip
    r0, c0 = int((NORTH - GT_ORIGIN[1]) * 2), int((GT_ORIGIN[0] - WEST) * 2)
    gt = label[r0 : r0 + GT_SHAPE[0], c0 : c0 + GT_SHAPE[1]].copy()
    gt[:3, :10] = 0  # undefined
    write(release / "TrainingGT" / "2018_IEEE_GRSS_DFC_GT_TR.tif", gt[None],
          Affine(0.5, 0, GT_ORIGIN[0], 0, -0.5, GT_ORIGIN[1]))  # fmt: skip
    write(root / "test_labels.tif", label[None], half)
    return root


if __name__ == "__main__":
    generate(Path(sys.argv[1]))
