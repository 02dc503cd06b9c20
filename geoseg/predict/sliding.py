"""Sliding-window prediction of a whole scene, with or without the scene's LiDAR points.

A scene of any size is cut into windows of the contract's tile size (the size the model was
trained at) with `overlap`. Each window's logits are multiplied by a weight window that is 1
inside and ramps linearly down (never to 0) over the overlap at its edges, summed, and divided
by the summed weights: neighbouring windows cross-fade, so their seams disappear, and a pixel
that only one window covers gets exactly that window's logits.

Memory is flat in scene size: the scene is done in column passes of `COLUMN_BLOCK` px, each
a sequence of row bands; only one band of accumulators (tile-size rows × pass width) and, for
point models, that band's points (`geoseg.predict.points`) live at a time. Rows no later window
touches are written to a tiled GTiff on disk and the band slides down. The GTiff is then
converted to a COG under a temporary name and renamed into place. Image-only and point models
share this one loop; a point model's window also gets its points through the training point
pipeline, and a window with fewer than k non-noise points is skipped (pixels that only skipped
windows cover are written as nodata 0, and the STAC Item counts the skipped windows).

Input rules: the scene's bands are the contract's image bands in the contract's order (only the
count can be checked; `dsm`/`intensity` bands are rasterised from the points as the build does),
except that a 4-band scene in NAIP's order (red, green, blue, NIR) also serves a model of its
first bands (an RGB model reads bands 1-3 of a NAIP scene),
its pixel size must be within 10 % of the contract's GSD (the model has only seen that scale;
outside it the error is refused, not warned about), and it must have a CRS, because the outputs
are map products.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from pyproj import CRS
from rasterio.errors import RasterioIOError
from rasterio.features import shapes
from rasterio.io import DatasetReader, DatasetWriter
from rasterio.shutil import copy as rio_copy
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds
from rasterio.windows import transform as window_transform
from shapely.geometry import shape
from torch import nn
from tqdm import tqdm

from geoseg.builder.points import FIELDS as SCENE_POINT_FIELDS
from geoseg.builder.writers import atomic_path, write_json
from geoseg.datasets.n3c import collate
from geoseg.datasets.points import PointConfig
from geoseg.device import AUTO, resolve_device
from geoseg.errors import first_line
from geoseg.models import uses_points
from geoseg.predict.errors import PredictError
from geoseg.predict.item import parse_when, prediction_item, scene_time
from geoseg.predict.points import (
    LIDAR_BANDS,
    Extent,
    ScenePoints,
    catalog_items,
    enough_points,
    lidar_rasters,
    local_item,
    window_arrays,
    window_rng,
    window_sample,
)
from geoseg.train.metrics import predict_labels
from geoseg.train.task import load_model
from geoseg.train.tta import contract_tta, forward

GSD_TOLERANCE = 0.10
"""Largest relative difference between the scene's pixel size and the contract's GSD."""

BLOCK = 256
"""Block size of the intermediate GTiff (rows are flushed into it band by band)."""

GDAL_CACHE_BYTES = 128 * 2**20
"""GDAL block cache while predicting (unless GDAL_CACHEMAX is set): GDAL's default, 5 % of RAM,
would fill with the scene's decoded blocks and make memory grow with the scene up to that cap;
a band's blocks (input and output) need a few tens of MB."""

COLUMN_BLOCK = 4096
"""Scene columns predicted per pass. Wider scenes are done in several passes of row bands, so
the accumulators hold at most tile × (COLUMN_BLOCK + 2 tiles) px whatever the scene's size;
windows straddling a pass boundary run in both passes (the price of flat memory: about one
window column per 4096 px)."""


def window_offsets(length: int, size: int, stride: int) -> list[int]:
    """Window starts along one axis: every `stride`, the last one flush with the scene's end."""
    if length <= size:
        return [0]
    return [*range(0, length - size, stride), length - size]


def blend_weights(size: int, ramp: int) -> np.ndarray:
    """(size, size) float32 weights: 1 inside, a linear ramp over `ramp` px at every edge.

    The ramp stops at 1 / (ramp + 1), not 0, so a scene border covered by one window only
    still has a weight to divide by.
    """
    edge = np.minimum(np.arange(size), size - 1 - np.arange(size)) + 1
    ramp1d = np.minimum(edge / (ramp + 1), 1.0) if ramp > 0 else np.ones(size)
    return np.outer(ramp1d, ramp1d).astype(np.float32)


NAIP_ORDER = ("red", "green", "blue", "nir")
"""Band order of a 4-band NAIP scene: a model of its first bands reads those (`_open_scene`)."""


def image_bands(contract: dict[str, Any]) -> list[str]:
    """The contract's bands the scene image must hold (those not rasterised from points)."""
    return [b for b in contract["bands"] if b not in LIDAR_BANDS]


def needs_points(contract: dict[str, Any]) -> bool:
    """Whether the model reads the scene's LiDAR (a point model, or LiDAR raster bands)."""
    lidar_bands = len(image_bands(contract)) < len(contract["bands"])
    return uses_points(contract["model"], contract["model_kwargs"]) or lidar_bands


def _open_scene(image: Path, contract: dict[str, Any]) -> DatasetReader:
    """Open the scene and check it against the contract (CRS, band count, pixel size)."""
    try:
        src = rasterio.open(image)
    except RasterioIOError as exc:
        raise PredictError(f"cannot read {image}: {first_line(exc)}") from None
    try:
        if src.crs is None:
            raise PredictError(f"{image} has no CRS; predictions must be georeferenced")
        bands = image_bands(contract)
        naip_prefix = src.count == len(NAIP_ORDER) and tuple(bands) == NAIP_ORDER[: len(bands)]
        if src.count != len(bands) and not naip_prefix:
            expected = f"{len(bands)} ({', '.join(bands)})"
            raise PredictError(f"{image} has {src.count} bands; the model expects {expected}")
        gsd = contract["gsd"]
        for res in src.res:
            if abs(res - gsd) > GSD_TOLERANCE * gsd:
                raise PredictError(
                    f"{image} has {src.res[0]:g} x {src.res[1]:g} m pixels; the model was trained "
                    f"at {gsd:g} m (resample the scene first)"
                )
        t = src.transform
        if needs_points(contract) and (t.b != 0 or t.d != 0 or t.e >= 0):
            raise PredictError(f"{image} is not north-up; points need a north-up grid")
    except PredictError:
        src.close()
        raise
    return src


def _normalise(values: np.ndarray, contract: dict[str, Any], size: int) -> np.ndarray:
    """Model input (C, size, size) of one window's band values (C, h, w), NaN where missing.

    As in training (`N3CCalifornia.read_image`), missing values become the band mean (0 after
    normalisation); windows cut by the scene's edge are padded with that same 0.
    """
    mean = np.asarray(contract["mean"], np.float32)[:, None, None]
    std = np.asarray(contract["std"], np.float32)[:, None, None]
    out = np.zeros((len(mean), size, size), np.float32)
    out[:, : values.shape[1], : values.shape[2]] = np.nan_to_num((values - mean) / std, nan=0.0)
    return out


def _batches(items: list[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _scene_points(
    src: DatasetReader,
    points: Sequence[str | Path] | None,
    stac_url: str | None,
    catalog: str | None,
    stride: int,
) -> ScenePoints:
    """The scene's point source: local files, or the COPC items a STAC API has for it."""
    crs = CRS.from_user_input(src.crs.to_wkt())
    if points:
        items = [local_item(p) for p in points]
        return ScenePoints(items, crs, src.transform, src.shape, stride)
    items, signer = catalog_items(crs, tuple(src.bounds), stac_url, catalog)
    return ScenePoints(items, crs, src.transform, src.shape, stride, signer, check_local=False)


def predict(
    checkpoint: str | Path,
    image: str | Path,
    out: str | Path,
    *,
    points: Sequence[str | Path] | None = None,
    stac_url: str | None = None,
    catalog: str | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    vector: str | Path | None = None,
    device: str = AUTO,
    datetime: str | None = None,
    progress: bool = True,
    tta: bool | None = None,
) -> dict[str, Any]:
    """Write the class-map COG `out` (+ `<out stem>.json` STAC Item, optional GeoPackage).

    Point-reading models take the scene's LiDAR from local files (`points`: COPC, LAS or LAZ,
    any CRS) or from the COPC items a STAC API holds for the scene (`stac_url`, or `catalog`:
    "planetary-computer" / "sample"). `device` as in `resolve_device`. `datetime` (ISO) is the
    scene's acquisition time when the scene itself does not tell (see `geoseg.predict.item`).
    `tta`: average every window over its 8 flips and quarter turns (`geoseg.train.tta`);
    None = the checkpoint's default. Returns the STAC Item.
    Raises `CheckpointError` for a file that is not a geoseg checkpoint, `PredictError` for input
    the contract rules out, `DeviceError` for a device not here, and `StacError` when the STAC
    API fails.
    """
    checkpoint, image, out = Path(checkpoint), Path(image), Path(out)
    if not 0.0 <= overlap < 1.0 or batch_size < 1:
        raise PredictError("overlap must be in [0, 1) and batch size >= 1")
    if datetime is not None:
        parse_when(datetime)  # a typo fails now, not after the whole scene
    run_on = resolve_device(device)
    sources = [s for s in (points, stac_url, catalog) if s]
    if len(sources) > 1:
        raise PredictError("give the points once: --points, --stac-url or --catalog")
    model, contract = load_model(checkpoint)
    if needs_points(contract) and not sources:
        raise PredictError(
            f"model {contract['model']!r} with bands {contract['bands']} reads LiDAR: "
            "give --points, --stac-url or --catalog"
        )
    if sources and not needs_points(contract):
        raise PredictError(f"model {contract['model']!r} reads no LiDAR; drop the points")
    derived = [f for f in contract["points"].get("features", ()) if f not in SCENE_POINT_FIELDS]
    if sources and uses_points(contract["model"], contract["model_kwargs"]) and derived:
        raise PredictError(
            f"the model's point features {derived} were derived when its build was prepared "
            f"(docs/datasets.md); a scene's LiDAR files give only {list(SCENE_POINT_FIELDS)}"
        )
    model.to(run_on)
    size = int(contract["tile_size"])
    stride = max(1, round(size * (1.0 - overlap)))
    colormap = {i: tuple(c) for i, c in enumerate(contract["class_colors"])}
    with ExitStack() as stack:
        if "GDAL_CACHEMAX" not in os.environ:
            stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES))
        src = stack.enter_context(_open_scene(image, contract))
        when = scene_time(image, src, datetime)
        scene_points = (
            stack.enter_context(_scene_points(src, points, stac_url, catalog, stride))
            if sources
            else None
        )
        engine = _Engine(
            model, src, contract, size, stride, batch_size, run_on, scene_points,
            contract_tta(contract, tta),
        )  # fmt: skip
        # Uncompressed, so rows flushed into partly written blocks cost no block rewrites.
        profile = {
            "driver": "GTiff", "width": src.width, "height": src.height, "count": 1,
            "dtype": "uint8", "crs": src.crs, "transform": src.transform, "nodata": 0,
            "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK,
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            staging = Path(tmp) / "classes.tif"
            with (
                rasterio.open(staging, "w", **profile) as dst,
                tqdm(total=engine.bands(), desc="predicting", disable=not progress) as bar,
            ):
                dst.write_colormap(1, colormap)
                engine.run(dst, bar)
            with rasterio.open(staging) as staged, atomic_path(out) as final:
                rio_copy(
                    staged, final, driver="COG", COMPRESS="DEFLATE",
                    BLOCKSIZE="512", OVERVIEW_RESAMPLING="NEAREST",
                )  # fmt: skip
        item = prediction_item(out, src, contract, when, {
            "geoseg:model": contract["model"],
            "geoseg:checkpoint": str(checkpoint),
            "geoseg:device": str(run_on),
            "geoseg:tta": engine.tta,
            "geoseg:windows": engine.windows,
            "geoseg:skipped_windows": engine.skipped,
        })  # fmt: skip
    write_json(out.with_suffix(".json"), item)
    if vector is not None:
        _write_vector(out, Path(vector), contract["class_names"])
    return item


@dataclass
class _Engine:
    """The window loop: row band by row band, flushing rows that no later band touches."""

    model: nn.Module
    src: DatasetReader
    contract: dict[str, Any]
    size: int
    stride: int
    batch_size: int
    device: torch.device
    points: ScenePoints | None
    tta: bool = False
    windows: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        settings = self.contract["points"]
        point_model = uses_points(self.contract["model"], self.contract["model_kwargs"])
        self.point_config = PointConfig(**settings, augment=False) if point_model else None
        self.lidar = [b for b in self.contract["bands"] if b in LIDAR_BANDS]
        image = image_bands(self.contract)  # read first, then the LiDAR rasters: reorder
        self.read = list(range(1, len(image) + 1))  # the scene's first bands (NAIP: RGB of RGBN)
        self.order = [
            image.index(b) if b in image else len(image) + self.lidar.index(b)
            for b in self.contract["bands"]
        ]

    def _inputs(
        self, top: int, left: int, band: dict[str, np.ndarray] | None
    ) -> tuple[dict[str, Any], np.ndarray] | None:
        """(sample, image nodata mask (h, w)) of one window, None when it has too few points."""
        src, size = self.src, self.size
        window = Window(left, top, min(size, src.width - left), min(size, src.height - top))
        values = src.read(self.read, window=window).astype(np.float32)
        if src.nodata is not None:
            values[values == src.nodata] = np.nan
        missing = np.isnan(values).all(axis=0)
        sample: dict[str, Any] = {"points": None}
        if band is not None:
            full = Window(left, top, size, size)
            bounds = window_bounds(full, src.transform)
            arrays = window_arrays(band, bounds)
            if self.point_config is not None:
                if not enough_points(arrays, self.point_config):
                    return None
                sample["points"] = window_sample(
                    arrays, window_transform(full, src.transform), size, self.point_config,
                    window_rng(self.contract["seed"], top, left),
                )  # fmt: skip
            if self.lidar:
                extent = Extent(self.points.crs, bounds, src.res[0], size)
                rasters = lidar_rasters(arrays, extent, self.lidar)
                values = np.concatenate([values, rasters[:, : window.height, : window.width]])
        values = values[self.order] if self.lidar else values
        sample["image"] = torch.from_numpy(_normalise(values, self.contract, size))
        return sample, missing

    def _forward(self, samples: list[dict[str, Any]]) -> np.ndarray:
        if samples[0]["points"] is None:
            batch = {"image": torch.stack([s["image"] for s in samples]), "points": None}
        else:  # collate wants targets; prediction has none
            empty = torch.zeros(0)
            batch = collate([{**s, "mask": empty, "point_labels": empty, "tile_id": ""}
                             for s in samples])  # fmt: skip
        batch = {
            "image": batch["image"].to(self.device),
            "points": _to(batch["points"], self.device),
        }
        on_gpu = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=on_gpu):
            return forward(self.model, batch, self.tta)["logits"].float().cpu().numpy()

    def bands(self) -> int:
        """Row bands `run` predicts (the progress total): rows of windows per column block."""
        blocks = -(-self.src.width // COLUMN_BLOCK)
        return blocks * len(window_offsets(self.src.height, self.size, self.stride))

    def run(self, dst: DatasetWriter, bar: tqdm) -> None:
        """Predict the scene column block by column block (see `COLUMN_BLOCK`)."""
        width, size = self.src.width, self.size
        cols = window_offsets(width, size, self.stride)
        for c0 in range(0, width, COLUMN_BLOCK):
            c1 = min(width, c0 + COLUMN_BLOCK)
            self._run_block(dst, [c for c in cols if c < c1 and c + size > c0], c0, c1, bar)

    def _run_block(self, dst: DatasetWriter, cols: list[int], c0: int, c1: int, bar: tqdm) -> None:
        """Columns [c0, c1) of the scene, from every window that touches them (`cols`)."""
        src, size = self.src, self.size
        x0, height = cols[0], src.height
        span = min(src.width, cols[-1] + size) - x0
        rows = window_offsets(height, size, self.stride)
        weights = blend_weights(size, size - self.stride)
        classes = len(self.contract["class_names"])
        logit_sum = np.zeros((classes, size, span), np.float32)
        weight_sum = np.zeros((size, span), np.float32)
        nodata = np.zeros((size, span), bool)
        for k, top in enumerate(rows):
            h = min(size, height - top)
            band = None if self.points is None else self.points.read(Window(x0, top, span, h))
            for chunk in _batches(cols, self.batch_size):
                kept, samples = [], []
                for left in chunk:
                    self.windows += 1
                    inputs = self._inputs(top, left, band)
                    if inputs is None:
                        self.skipped += 1
                        continue
                    sample, missing = inputs
                    at = left - x0
                    nodata[: missing.shape[0], at : at + missing.shape[1]] = missing
                    kept.append(at)
                    samples.append(sample)
                if not samples:
                    continue
                for at, window_logits in zip(kept, self._forward(samples), strict=True):
                    w = min(size, span - at)
                    logit_sum[:, :h, at : at + w] += (window_logits * weights)[:, :h, :w]
                    weight_sum[:h, at : at + w] += weights[:h, :w]
            done = (rows[k + 1] if k + 1 < len(rows) else height) - top
            owned = np.s_[:done, c0 - x0 : c1 - x0]
            covered = weight_sum[owned] > 0
            blended = logit_sum[(slice(None), *owned)] / np.where(covered, weight_sum[owned], 1)
            labels = predict_labels(torch.from_numpy(blended), dim=0).numpy().astype(np.uint8)
            labels[nodata[owned] | ~covered] = 0
            dst.write(labels, 1, window=Window(c0, top, c1 - c0, done))
            bar.update(1)
            for buffer in (logit_sum, weight_sum, nodata):  # slide the band down by `done` rows
                buffer[..., : size - done, :] = buffer[..., done:, :]
                buffer[..., size - done :, :] = 0


def _to(value: Any, device: torch.device) -> Any:
    """Tensors of a (nested) points batch moved to `device`; None stays None."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


def _write_vector(classmap: Path, vector: Path, class_names: list[str]) -> None:
    """Polygons of each connected class region (class value + name) as a GeoPackage.

    Reads the finished uint8 class map whole (1 byte per pixel): region polygons cannot be
    streamed without being cut at band seams.
    """
    import geopandas as gpd

    with rasterio.open(classmap) as src:
        labels = src.read(1)
        polygons = list(shapes(labels, mask=labels > 0, transform=src.transform))
        crs = src.crs
    values = [int(v) for _, v in polygons]
    frame = gpd.GeoDataFrame(
        {"value": values, "class_name": [class_names[v] for v in values]},
        geometry=[shape(g) for g, _ in polygons],
        crs=crs,
    )
    with atomic_path(vector) as tmp:
        tmp.unlink()  # the GPKG driver refuses to overwrite the empty placeholder
        frame.to_file(tmp, driver="GPKG", layer=vector.stem)
