"""Tiles of a prepared build: their grid, and writing one tile in the `build-dataset` layout.

A benchmark's rasters come on their own pixel grid (an ISPRS area's origin, the DFC2018 ground
truth's), and labels must never be resampled, so a tile here is anchored at that grid's origin
instead of at the CRS origin like the builder's `TileSpec`. It offers the same attributes
(`crs`, `crs_wkt`, `epsg`, `bounds`, `transform`, `gsd`, `size`), so the builder's writers and
point readers take it unchanged, and the files it writes are those `geoseg train / evaluate /
predict` read from any build (docs/dataset.md, docs/datasets.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import laspy
import lazrs
import numpy as np
import rasterio
import shapely
from affine import Affine
from pyproj import CRS

import geoseg
from geoseg.builder.grid import reproject_geometry
from geoseg.builder.rasterize import FLOAT_NODATA, rasterize
from geoseg.builder.tile import MANIFEST, load_finished
from geoseg.builder.writers import IMAGE_COLORINTERP, safe_join, sha256, write_cog, write_json
from geoseg.builder.writers import write_laz as write_points_laz
from geoseg.classes import ClassSet

IMAGE_BANDS = ("red", "green", "blue", "nir")
"""`image.tif` band order of every build; a source without a band leaves it 0 and lists it as
missing (the NEON sample's convention for NIR)."""

STATS_LAYERS = ("image", "dsm", "intensity", "hsi")
"""Layers whose bands get mean/std in stats.json (the inputs a model may normalise)."""


@dataclass(frozen=True)
class GridTile:
    """`size` x `size` px at `gsd` m whose top-left corner is (x0, y0) in `crs_wkt`."""

    id: str
    crs_wkt: str
    x0: float
    y0: float
    gsd: float
    size: int
    col: int
    row: int
    """Position in its grid, rows counted downwards from the grid origin."""

    @property
    def span(self) -> float:
        return self.gsd * self.size

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0 - self.span, self.x0 + self.span, self.y0)

    @property
    def transform(self) -> Affine:
        return Affine(self.gsd, 0.0, self.x0, 0.0, -self.gsd, self.y0)

    @cached_property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    @property
    def epsg(self) -> int | None:
        return self.crs.to_epsg()

    def footprint_lonlat(self) -> shapely.Polygon:
        return reproject_geometry(shapely.box(*self.bounds), self.crs, CRS.from_epsg(4326), 4)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `tile` entry (fields, plus epsg and bounds for readers of the JSON)."""
        return asdict(self) | {"epsg": self.epsg, "bounds": list(self.bounds)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GridTile:
        return cls(**{k: values[k] for k in cls.__dataclass_fields__})


def grid_tiles(
    prefix: str, crs: CRS, origin: tuple[float, float], gsd: float, size: int, cols: int, rows: int
) -> list[GridTile]:
    """The tiles of a `cols` x `rows` grid whose top-left corner is `origin`, row-major."""
    wkt, span = crs.to_wkt(), gsd * size
    return [
        GridTile(
            f"{prefix}_c{c:03d}_r{r:03d}",
            wkt,
            origin[0] + c * span,
            origin[1] - r * span,
            gsd,
            size,
            c,
            r,
        )
        for r in range(rows)
        for c in range(cols)
    ]


@dataclass
class Layer:
    """A (bands, H, W) raster of a tile, its nodata and band names."""

    data: np.ndarray
    nodata: float | None
    bands: tuple[str, ...]


@dataclass
class TileData:
    """Everything one tile folder holds, read from a benchmark's files."""

    tile: GridTile
    split: str
    image: np.ndarray
    """(4, H, W) uint8 R, G, B, NIR; 0 = no data."""
    missing_bands: list[str]
    labels: dict[str, np.ndarray]
    """`label` (what training and evaluation read) and any variant (`label_full`), uint8."""
    dsm: np.ndarray
    """(H, W) float32 metres, FLOAT_NODATA where unknown."""
    points: dict[str, np.ndarray]
    """The builder's point fields (x, y, z, intensity, return_number, number_of_returns,
    classification) plus extra dims: `label` (class of the build), dataset-specific features."""
    datetime: datetime
    inputs: dict[str, Any]
    intensity: Layer | None = None
    """None = mean intensity of the points per pixel (the builder's rule)."""
    extra: dict[str, Layer] = field(default_factory=dict)
    """Further layers (`hsi`), written as `<name>.tif`."""


def tile_folder(out: Path, tile: GridTile) -> Path:
    return safe_join(out, "tiles", tile.id)


def finished(out: Path, tile: GridTile) -> dict[str, Any] | None:
    """The manifest of a tile an earlier run finished, else None."""
    return load_finished(tile_folder(out, tile))


def _band_sums(layer: Layer, missing: tuple[str, ...] = ()) -> dict[str, list[float]]:
    """count/sum/sumsq per band over its valid pixels: exact to aggregate over tiles and splits."""
    counts, sums, squares = [], [], []
    for name, band in zip(layer.bands, layer.data, strict=True):
        values = band.astype(np.float64)
        valid = np.isfinite(values)
        if layer.nodata is not None:
            valid &= values != layer.nodata
        if name in missing:
            valid[:] = False
        v = values[valid]
        counts.append(int(v.size))
        sums.append(float(v.sum()))
        squares.append(float((v * v).sum()))
    return {"count": counts, "sum": sums, "sumsq": squares}


def write_tile(out: Path, data: TileData, classes: ClassSet) -> dict[str, Any]:
    """Write one tile folder (rasters, points.laz, then tile.json last); return the manifest."""
    tile, folder = data.tile, tile_folder(out, data.tile)
    pts = data.points
    rasters = rasterize(pts, tile)  # LiDAR intensity / returns on the tile grid (label unused)
    intensity = data.intensity or Layer(rasters.intensity[None], FLOAT_NODATA, ("intensity",))
    layers = {
        "image": Layer(data.image, 0, IMAGE_BANDS),
        "dsm": Layer(data.dsm[None], FLOAT_NODATA, ("dsm",)),
        "intensity": intensity,
        "num_returns": Layer(rasters.num_returns[None], 0, ("number_of_returns",)),
        **data.extra,
    }
    for name, layer in layers.items():
        image = name == "image"
        write_cog(
            folder / f"{name}.tif",
            layer.data,
            tile,
            nodata=layer.nodata,
            descriptions=layer.bands,
            colorinterp=IMAGE_COLORINTERP if image else None,
            tags={"MISSING_BANDS": ",".join(data.missing_bands)} if image else None,
        )
    for name, label in data.labels.items():
        write_cog(
            folder / f"{name}.tif",
            label,
            tile,
            nodata=0,
            descriptions=["label"],
            colormap=classes.colormap(),
            tags={"CLASS_NAMES": ",".join(classes.names)},
        )
    base = {k: v for k, v in pts.items() if k in _LAS_FIELDS}
    extra = {k: v for k, v in pts.items() if k not in _LAS_FIELDS}
    write_points_laz(folder / "points.laz", base, tile, data.datetime.date(), extra=extra)

    label = data.labels["label"]
    point_labels = pts.get("label", np.zeros(len(pts["x"]), np.uint8))
    codes, code_counts = np.unique(pts["classification"], return_counts=True)
    manifest = {
        "tile_id": tile.id,
        "split": data.split,
        "tile": tile.to_dict(),
        "geoseg_version": geoseg.__version__,
        "versions": {
            "rasterio": rasterio.__version__,
            "gdal": rasterio.__gdal_version__,
            "laspy": laspy.__version__,
            "lazrs": getattr(lazrs, "__version__", "?"),
        },
        "inputs": data.inputs,
        "datetime": data.datetime.isoformat(),
        "year": data.datetime.year,
        "missing_bands": data.missing_bands,
        "coverage": {
            "imagery": float((data.image != 0).any(axis=0).mean()),
            "lidar": float((rasters.num_returns > 0).mean()),
        },
        "pixels": _counts(label, classes),
        "points": {
            "count": len(pts["x"]),
            "classes": _counts(point_labels, classes),
            "asprs": {str(int(c)): int(n) for c, n in zip(codes, code_counts, strict=True)},
        },
        "layers": {name: list(layer.bands) for name, layer in layers.items()},
        "stats": {
            name: _band_sums(layer, tuple(data.missing_bands))
            for name, layer in layers.items()
            if name in STATS_LAYERS
        },
        "files": {},
    }
    names = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and p.is_file())
    manifest["files"] = {
        n: {"size": (folder / n).stat().st_size, "sha256": sha256(folder / n)} for n in names
    }
    write_json(folder / MANIFEST, manifest)
    return manifest


_LAS_FIELDS = ("x", "y", "z", "intensity", "return_number", "number_of_returns", "classification")


def _counts(labels: np.ndarray, classes: ClassSet) -> dict[str, int]:
    counts = np.bincount(np.asarray(labels, np.int64).ravel(), minlength=len(classes))
    if len(counts) > len(classes):
        raise ValueError(f"label values above {len(classes) - 1} in a {classes.name} tile")
    return {name: int(n) for name, n in zip(classes.names, counts, strict=True)}
