"""Atomic, deterministic writers for tile outputs (COG rasters, LAZ points, JSON).

Every file is written to a temporary name in its final folder and renamed into place, so a killed
build never leaves a half file under a final name. Outputs carry no timestamps, so a rebuilt tile
has the same bytes (and checksums) as the first build.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import laspy
import numpy as np
from rasterio.enums import ColorInterp
from rasterio.io import MemoryFile
from rasterio.shutil import copy as rio_copy

from geoseg.builder.grid import TileSpec

TMP_PREFIX = ".tmp-"


def safe_join(root: Path, *parts: str) -> Path:
    """Join under `root`, refusing anything that would land outside it (e.g. '..' in an id)."""
    root = root.resolve()
    path = root.joinpath(*parts).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"refusing to write outside the output folder: {path}")
    return path


@contextmanager
def atomic_path(final: Path):
    """Yield a temporary path next to `final`; rename it into place only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=final.suffix, dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(final: Path, writer: Callable[[Path], None]) -> None:
    with atomic_path(final) as tmp:
        writer(tmp)


def write_json(final: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    write_bytes_atomic(final, lambda p: p.write_text(text))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_cog(
    final: Path,
    data: np.ndarray,
    tile: TileSpec,
    *,
    nodata: float | None,
    descriptions: Sequence[str],
    colorinterp: Sequence[ColorInterp] | None = None,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
    tags: dict[str, str] | None = None,
) -> None:
    """Write a (bands, H, W) array as a DEFLATE Cloud-Optimized GeoTIFF on the tile grid."""
    if data.ndim == 2:
        data = data[None]
    count, height, width = data.shape
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": count,
        "dtype": data.dtype.name,
        "crs": tile.crs_wkt if tile.epsg is None else f"EPSG:{tile.epsg}",
        "transform": tile.transform,
        "nodata": nodata,
    }
    if count >= 3 and data.dtype == np.uint8:
        # Without this GDAL tags a 4th uint8 band as alpha and NIR becomes a transparency mask.
        profile.update(photometric="RGB", alpha="UNSPECIFIED")
    block = min(512, tile.size) if tile.size % 16 == 0 else 512
    predictor = "3" if data.dtype.kind == "f" else "2"
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(data)
            if colorinterp is not None:
                dst.colorinterp = list(colorinterp)
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)
            if colormap is not None:
                dst.write_colormap(1, colormap)
            if tags:
                dst.update_tags(**tags)
        with mem.open() as src:
            write_bytes_atomic(
                final,
                lambda p: rio_copy(
                    src,
                    p,
                    driver="COG",
                    COMPRESS="DEFLATE",
                    PREDICTOR=predictor,
                    BLOCKSIZE=str(block),
                    OVERVIEWS="NONE" if tile.size <= 512 else "AUTO",
                ),
            )


IMAGE_COLORINTERP = (ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.undefined)


def write_laz(
    final: Path,
    arrays: dict[str, np.ndarray],
    tile: TileSpec,
    day: date,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write tile points as LAS 1.4 PF6 LAZ in the tile CRS (1 cm resolution).

    The header date is the acquisition's date, not today's, so rebuilt files are byte-identical.
    `extra`: further per-point arrays stored as LAS extra bytes under their names (e.g. a
    prepared benchmark's `label` in its own class set, `geoseg prepare`).
    """
    header = laspy.LasHeader(point_format=6, version="1.4")
    for name, values in (extra or {}).items():
        header.add_extra_dim(laspy.ExtraBytesParams(name, np.asarray(values).dtype))
    header.scales = np.array([0.01, 0.01, 0.01])
    xmin, ymin, _, _ = tile.bounds
    header.offsets = np.array([xmin, ymin, 0.0])
    header.add_crs(tile.crs)
    header.creation_date = day
    header.generating_software = "geoseg"
    header.system_identifier = "geoseg build-dataset"
    las = laspy.LasData(header)
    for name in (
        "x",
        "y",
        "z",
        "intensity",
        "return_number",
        "number_of_returns",
        "classification",
    ):
        setattr(las, name, arrays[name])
    for name, values in (extra or {}).items():
        las[name] = values
    write_bytes_atomic(
        final, lambda p: las.write(str(p), do_compress=True, laz_backend=laspy.LazBackend.Lazrs)
    )


def remove_stale_temps(folder: Path) -> int:
    """Delete temporaries left by a killed build (they never carry finished work)."""
    n = 0
    if folder.exists():
        for p in folder.rglob(f"{TMP_PREFIX}*"):
            p.unlink(missing_ok=True)
            n += 1
    return n
