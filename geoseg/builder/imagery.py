"""Resample NAIP scenes onto a tile grid.

We read a source window with a plain `read()` and warp the array ourselves: NAIP files tag band 4
(NIR) as *alpha*, and letting GDAL warp the dataset would treat NIR as a transparency mask (slow
path, and NIR = 0 pixels turn into nodata). Only the window around the tile is read, so a signed
HTTPS COG costs a few range requests, not the whole scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import rasterio
from pyproj import CRS
from rasterio.errors import RasterioError
from rasterio.warp import Resampling, reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from geoseg.builder.errors import TileError, short_reason
from geoseg.builder.grid import TileSpec, same_horizontal_crs
from geoseg.stac.items import ImageryItem
from geoseg.stac.remote import read_with_retries
from geoseg.stac.retry import DEFAULT_POLICY, RetryPolicy
from geoseg.stac.signing import Signer

BANDS = ("red", "green", "blue", "nir")
IMAGE_NODATA = 0


@dataclass
class TileImage:
    data: np.ndarray
    """(4, size, size) uint8, R, G, B, NIR; 0 where no scene covers the pixel."""
    valid: np.ndarray
    """(size, size) bool: pixel covered by imagery."""
    items: list[str]
    """Ids of the scenes that contributed, in mosaic order."""
    missing_bands: list[str]


def pick_scenes(items: list[ImageryItem]) -> list[ImageryItem]:
    """Newest acquisition year first; within it, newest date then id. One year per tile.

    Mixing years inside a tile mixes seasons and construction states, so only the newest year
    that covers the tile is used (earlier years would only fill holes that NAIP doesn't have).
    """
    if not items:
        return []
    year = max(i.year for i in items)
    same = [i for i in items if i.year == year]
    return sorted(same, key=lambda i: (i.datetime, i.id), reverse=True)


def _resampling(src_res: float, gsd: float) -> Resampling:
    # Downsampling (0.6 m NAIP -> 1 m) needs area averaging against aliasing; upsampling: bilinear.
    return Resampling.average if gsd > 1.2 * src_res else Resampling.bilinear


def _read_scene(path: str, item: ImageryItem, tile: TileSpec) -> tuple[np.ndarray, np.ndarray]:
    """Warp one scene onto the tile grid: (bands, size, size) uint8 and its coverage mask."""
    size = tile.size
    with rasterio.open(path) as src:
        if src.crs is None:
            raise TileError(f"imagery {item.id}: file has no CRS")
        if not same_horizontal_crs(CRS.from_wkt(item.crs_wkt), CRS.from_wkt(src.crs.to_wkt())):
            raise TileError(
                f"imagery {item.id}: CRS mismatch (item says "
                f"{CRS.from_wkt(item.crs_wkt).name!r}, file is {src.crs.to_string()!r})"
            )
        if src.count < 3 or src.dtypes[0] != "uint8":
            raise TileError(
                f"imagery {item.id}: expected >=3 uint8 bands, got {src.count} {src.dtypes[0]}"
            )
        left, bottom, right, top = transform_bounds(tile.crs, src.crs, *tile.bounds, densify_pts=21)
        pad = 2 * abs(src.res[0])
        win = from_bounds(left - pad, bottom - pad, right + pad, top + pad, src.transform)
        win = win.round_offsets().round_lengths()
        win = win.intersection(Window(0, 0, src.width, src.height))
        nb = min(src.count, 4)
        arr = src.read(list(range(1, nb + 1)), window=win)
        src_transform = src.window_transform(win)
        nodata = src.nodata
        resampling = _resampling(abs(src.res[0]), tile.gsd)
        src_crs = src.crs
    covered = np.ones(arr.shape[1:], np.uint8)
    if nodata is not None:
        covered[(arr == nodata).all(axis=0)] = 0
    out = np.zeros((nb, size, size), np.uint8)
    common = dict(
        src_transform=src_transform,
        src_crs=src_crs,
        dst_transform=tile.transform,
        dst_crs=tile.crs,
    )
    reproject(arr, out, resampling=resampling, src_nodata=nodata, dst_nodata=IMAGE_NODATA, **common)
    cov = np.zeros((size, size), np.uint8)
    reproject(covered, cov, resampling=Resampling.nearest, src_nodata=0, dst_nodata=0, **common)
    return out, cov.astype(bool)


def read_tile_image(
    tile: TileSpec,
    items: list[ImageryItem],
    signer: Signer,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> TileImage:
    """Mosaic the chosen scenes onto the tile; later scenes only fill pixels still empty.

    Remote scenes are read through `read_with_retries` (retries, re-signing, GDAL options).
    """
    data = np.zeros((4, tile.size, tile.size), np.uint8)
    valid = np.zeros((tile.size, tile.size), bool)
    used: list[str] = []
    bands_seen = 0
    for item in pick_scenes(items):
        if valid.all():
            break
        try:
            arr, cov = read_with_retries(
                item.href, signer, lambda path, it=item: _read_scene(path, it, tile), policy
            )
        except (RasterioError, OSError, ValueError) as exc:
            raise TileError(f"imagery {item.id}: unreadable ({short_reason(exc)})") from exc
        fill = cov & ~valid
        if not fill.any():
            continue
        data[: arr.shape[0], fill] = arr[:, fill]
        valid |= fill
        used.append(item.id)
        bands_seen = max(bands_seen, arr.shape[0])
    return TileImage(data, valid, used, list(BANDS[bands_seen:]) if used else [])
