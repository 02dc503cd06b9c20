"""Turn a tile's points into per-pixel rasters: label, DSM, intensity, number of returns.

Label rule (documented in docs/dataset.md): among the *labelled* points of a pixel (ASPRS codes
that map to an N3C class), the **highest point wins**. An orthophoto shows the top surface, so a
roof or canopy above ground is what the image pixel shows; noise (7, 18), unclassified (1), overlap
(12) and codes >= 18 never label a pixel, and pixels without a labelled point stay unlabeled (0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geoseg.builder.grid import Area
from geoseg.classes import NOISE_CODES, UNLABELED, remap_asprs

FLOAT_NODATA = -9999.0


@dataclass
class TileRasters:
    label: np.ndarray  # uint8, 0 = unlabeled
    dsm: np.ndarray  # float32 m, FLOAT_NODATA where no point
    intensity: np.ndarray  # float32 mean intensity, FLOAT_NODATA where no point
    num_returns: np.ndarray  # uint8 max number of returns, 0 where no point


def pixel_index(x: np.ndarray, y: np.ndarray, tile: Area) -> np.ndarray:
    """Flat pixel index (row * size + col) of each point; -1 outside the tile."""
    xmin, _, _, ymax = tile.bounds
    col = np.floor((x - xmin) / tile.gsd).astype(np.int64)
    row = np.floor((ymax - y) / tile.gsd).astype(np.int64)
    ok = (col >= 0) & (col < tile.size) & (row >= 0) & (row < tile.size)
    return np.where(ok, row * tile.size + col, -1)


def _top_per_pixel(pix: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each occupied pixel, the index of its highest point (ties: the later point)."""
    order = np.lexsort((z, pix))
    spix = pix[order]
    last = np.flatnonzero(np.r_[spix[1:] != spix[:-1], True])
    return spix[last], order[last]


def rasterize(arrays: dict[str, np.ndarray], tile: Area) -> TileRasters:
    n = tile.size * tile.size
    pix = pixel_index(arrays["x"], arrays["y"], tile)
    cls = np.asarray(arrays["classification"], np.uint8)
    not_noise = ~np.isin(cls, list(NOISE_CODES)) & (pix >= 0)

    label = np.full(n, UNLABELED, np.uint8)
    n3c = remap_asprs(cls)
    labelled = (n3c != UNLABELED) & not_noise
    if labelled.any():
        p, i = _top_per_pixel(pix[labelled], arrays["z"][labelled])
        label[p] = n3c[labelled][i]

    dsm = np.full(n, -np.inf)
    intensity = np.full(n, FLOAT_NODATA, np.float32)
    nret = np.zeros(n, np.uint8)
    if not_noise.any():
        p = pix[not_noise]
        np.maximum.at(dsm, p, arrays["z"][not_noise])
        count = np.bincount(p, minlength=n)
        total = np.bincount(
            p, weights=arrays["intensity"][not_noise].astype(np.float64), minlength=n
        )
        has = count > 0
        intensity[has] = (total[has] / count[has]).astype(np.float32)
        np.maximum.at(nret, p, np.asarray(arrays["number_of_returns"], np.uint8)[not_noise])
    dsm = np.where(np.isfinite(dsm), dsm, FLOAT_NODATA).astype(np.float32)
    shape = (tile.size, tile.size)
    return TileRasters(
        label.reshape(shape), dsm.reshape(shape), intensity.reshape(shape), nret.reshape(shape)
    )
