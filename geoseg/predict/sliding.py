"""Sliding-window prediction of a whole scene with an image-only checkpoint.

A scene of any size is cut into windows of the contract's tile size (the size the model was
trained at) with `overlap`. Each window's logits are multiplied by a weight window that is 1
inside and ramps linearly down (never to 0) over the overlap at its edges, summed, and divided
by the summed weights: neighbouring windows cross-fade, so their seams disappear, and a pixel
that only one window covers gets exactly that window's logits.

Memory is flat in scene height: only one row-band of accumulators (tile-size rows × scene
width) lives at a time; rows no later window touches are written to a tiled GTiff on disk and
the band slides down. The GTiff is then converted to a COG under a temporary name and renamed
into place. Input rules: the scene's bands are the contract's bands in the contract's order
(only the count can be checked), its pixel size must be within 10 % of the contract's GSD (the
model has only seen that scale; outside it the error is refused, not warned about), and it must
have a CRS, because the outputs are map products.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.errors import RasterioIOError
from rasterio.features import shapes
from rasterio.io import DatasetReader, DatasetWriter
from rasterio.shutil import copy as rio_copy
from rasterio.warp import transform_geom
from rasterio.windows import Window
from shapely.geometry import box, mapping, shape
from torch import nn

from geoseg.build.writers import atomic_path
from geoseg.errors import first_line
from geoseg.train.metrics import predict_labels
from geoseg.train.task import load_model

IMAGE_ONLY_MODELS = frozenset({"unet", "smp-unet"})
"""Models that read only the image; every other model needs the scene's point cloud."""

GSD_TOLERANCE = 0.10
"""Largest relative difference between the scene's pixel size and the contract's GSD."""

BLOCK = 256
"""Block size of the intermediate GTiff (rows are flushed into it band by band)."""


class PredictError(ValueError):
    """Bad prediction input (scene or model); the message is one line for the CLI."""


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


def _open_scene(image: Path, contract: dict[str, Any]) -> DatasetReader:
    """Open the scene and check it against the contract (CRS, band count, pixel size)."""
    try:
        src = rasterio.open(image)
    except RasterioIOError as exc:
        raise PredictError(f"cannot read {image}: {first_line(exc)}") from None
    try:
        if src.crs is None:
            raise PredictError(f"{image} has no CRS; predictions must be georeferenced")
        bands = contract["bands"]
        if src.count != len(bands):
            expected = f"{len(bands)} ({', '.join(bands)})"
            raise PredictError(f"{image} has {src.count} bands; the model expects {expected}")
        gsd = contract["gsd"]
        for res in src.res:
            if abs(res - gsd) > GSD_TOLERANCE * gsd:
                raise PredictError(
                    f"{image} has {src.res[0]:g} x {src.res[1]:g} m pixels; the model was trained "
                    f"at {gsd:g} m (resample the scene first)"
                )
    except PredictError:
        src.close()
        raise
    return src


def _normalise(
    data: np.ndarray, nodata: float | None, contract: dict[str, Any], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(model input (C, size, size), nodata mask (h, w)) of one window read from the scene.

    As in training (`N3CCalifornia.read_image`), nodata values become the band mean (0 after
    normalisation); windows cut by the scene's edge are padded with that same 0.
    """
    values = data.astype(np.float32)
    missing = values == nodata if nodata is not None else np.zeros_like(values, dtype=bool)
    mean = np.asarray(contract["mean"], np.float32)[:, None, None]
    std = np.asarray(contract["std"], np.float32)[:, None, None]
    normalised = np.where(missing, 0.0, (values - mean) / std)
    out = np.zeros((len(mean), size, size), np.float32)
    out[:, : data.shape[1], : data.shape[2]] = normalised
    return out, missing.all(axis=0)


def _batches(items: list[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _stac_item(
    out: Path, src: DatasetReader, contract: dict[str, Any], checkpoint: Path, device: str
) -> dict[str, Any]:
    """STAC Item of the class map: projection, classification classes, model and device."""
    footprint = transform_geom(src.crs, "EPSG:4326", mapping(box(*src.bounds)))
    lonlat = shape(footprint)
    classes = [
        {"value": value, "name": name, "color_hint": "{:02X}{:02X}{:02X}".format(*color[:3])}
        for value, (name, color) in enumerate(
            zip(contract["class_names"], contract["class_colors"], strict=True)
        )
    ]
    classes[0]["nodata"] = True
    epsg = src.crs.to_epsg()
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/classification/v1.1.0/schema.json",
        ],
        "id": out.stem,
        "geometry": footprint,
        "bbox": list(lonlat.bounds),
        "properties": {
            "datetime": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "proj:epsg": epsg,
            **({} if epsg is not None else {"proj:wkt2": src.crs.to_wkt()}),
            "proj:shape": [src.height, src.width],
            "proj:transform": list(src.transform)[:6],
            "geoseg:model": contract["model"],
            "geoseg:checkpoint": str(checkpoint),
            "geoseg:device": device,
        },
        "links": [],
        "assets": {
            "classification": {
                "href": f"./{out.name}",
                "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                "roles": ["data"],
                "classification:classes": classes,
            }
        },
    }


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


def predict(
    checkpoint: str | Path,
    image: str | Path,
    out: str | Path,
    *,
    overlap: float = 0.25,
    batch_size: int = 4,
    vector: str | Path | None = None,
) -> dict[str, Any]:
    """Write the class-map COG `out` (+ `<out stem>.json` STAC Item, optional GeoPackage).

    Returns the STAC Item. Raises `CheckpointError` for a file that is not a geoseg checkpoint
    and `PredictError` for a model that needs points or a scene the contract rules out.
    """
    checkpoint, image, out = Path(checkpoint), Path(image), Path(out)
    if not 0.0 <= overlap < 1.0 or batch_size < 1:
        raise PredictError("overlap must be in [0, 1) and batch size >= 1")
    model, contract = load_model(checkpoint)
    if contract["model"] not in IMAGE_ONLY_MODELS:
        raise PredictError(
            f"this model needs --points (not supported yet): {contract['model']!r} reads LiDAR"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    size = int(contract["tile_size"])
    stride = max(1, round(size * (1.0 - overlap)))
    weights = blend_weights(size, size - stride)
    colormap = {i: tuple(c) for i, c in enumerate(contract["class_colors"])}
    with _open_scene(image, contract) as src:
        height, width = src.height, src.width
        rows, cols = window_offsets(height, size, stride), window_offsets(width, size, stride)
        # Uncompressed, so rows flushed into partly written blocks cost no block rewrites.
        profile = {
            "driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint8",
            "crs": src.crs, "transform": src.transform, "nodata": 0, "tiled": True,
            "blockxsize": BLOCK, "blockysize": BLOCK,
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            staging = Path(tmp) / "classes.tif"
            with rasterio.open(staging, "w", **profile) as dst:
                dst.write_colormap(1, colormap)
                _predict_bands(model, src, dst, contract, rows, cols, weights, batch_size, device)
            with rasterio.open(staging) as staged, atomic_path(out) as final:
                rio_copy(
                    staged, final, driver="COG", COMPRESS="DEFLATE",
                    BLOCKSIZE="512", OVERVIEW_RESAMPLING="NEAREST",
                )  # fmt: skip
        item = _stac_item(out, src, contract, checkpoint, str(device))
    with atomic_path(out.with_suffix(".json")) as tmp_json:
        tmp_json.write_text(json.dumps(item, indent=2) + "\n")
    if vector is not None:
        _write_vector(out, Path(vector), contract["class_names"])
    return item


def _predict_bands(
    model: nn.Module,
    src: DatasetReader,
    dst: DatasetWriter,
    contract: dict[str, Any],
    rows: list[int],
    cols: list[int],
    weights: np.ndarray,
    batch_size: int,
    device: torch.device,
) -> None:
    """Run the windows row band by row band, flushing rows that no later band touches."""
    size, width, height = len(weights), src.width, src.height
    classes = len(contract["class_names"])
    logit_sum = np.zeros((classes, size, width), np.float32)
    weight_sum = np.zeros((size, width), np.float32)
    nodata = np.zeros((size, width), bool)
    on_gpu = device.type == "cuda"
    for k, top in enumerate(rows):
        h = min(size, height - top)
        for chunk in _batches(cols, batch_size):
            inputs = []
            for left in chunk:
                data = src.read(window=Window(left, top, min(size, width - left), h))
                x, missing = _normalise(data, src.nodata, contract, size)
                inputs.append(x)
                nodata[: missing.shape[0], left : left + missing.shape[1]] = missing
            with (
                torch.inference_mode(),
                torch.autocast(device.type, torch.bfloat16, enabled=on_gpu),
            ):
                batch = torch.from_numpy(np.stack(inputs)).to(device)
                logits = model({"image": batch, "points": None})["logits"].float().cpu().numpy()
            for left, window_logits in zip(chunk, logits, strict=True):
                w = min(size, width - left)
                logit_sum[:, :h, left : left + w] += (window_logits * weights)[:, :h, :w]
                weight_sum[:h, left : left + w] += weights[:h, :w]
        done = (rows[k + 1] if k + 1 < len(rows) else height) - top
        blended = torch.from_numpy(logit_sum[:, :done] / weight_sum[:done])
        labels = predict_labels(blended, dim=0).numpy().astype(np.uint8)
        labels[nodata[:done]] = 0
        dst.write(labels, 1, window=Window(0, top, width, done))
        for buffer in (logit_sum, weight_sum, nodata):  # slide the band down by `done` rows
            buffer[..., : size - done, :] = buffer[..., done:, :]
            buffer[..., size - done :, :] = 0
