"""Finished tiles as compact columns: what the end-of-build outputs need, without the manifests.

A state-wide build finishes 1.6 M tiles; holding their manifests (a few kB each) or result
objects would take gigabytes in the process that writes the dataset's index, statistics, splits
and catalogs. Each manifest is reduced here to one row of fixed-width numbers plus a few short
strings, by whoever has it at hand: the resume scan on the dask workers (`scan_finished`), and
the driver for each tile built in this run. Column order never depends on the order tiles
finished in: `TileRows.sorted` orders by tile id, so the outputs are the same bytes however the
build ran.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geoseg.classes import N3C

STAT_BANDS = {
    "image": ("red", "green", "blue", "nir"),
    "dsm": ("dsm",),
    "intensity": ("intensity",),
}
"""Layers of a manifest's `stats` and the band names stats.json gives them, in order."""
BANDS = [(layer, i, name) for layer, names in STAT_BANDS.items() for i, name in enumerate(names)]


@dataclass
class TileRows:
    """One row per finished tile; string columns in Arrow, numbers in numpy."""

    tile_id: pa.Array
    epsg: np.ndarray  # int32, -1 when the CRS has no EPSG code
    crs: np.ndarray  # int16 index into `crs_wkts`
    crs_wkts: list[str]
    col: np.ndarray  # int64
    row: np.ndarray  # int64
    gsd: np.ndarray  # float64
    size: np.ndarray  # int32
    year: np.ndarray  # int16
    datetime: pa.Array
    lidar_project: pa.Array
    points: np.ndarray  # int64: points in the tile
    pixels: np.ndarray  # (n, classes) int64
    class_points: np.ndarray  # (n, classes) int64
    band_count: np.ndarray  # (n, bands) int64
    band_sum: np.ndarray  # (n, bands) float64
    band_sumsq: np.ndarray  # (n, bands) float64
    asprs: np.ndarray  # (n, codes) int64
    asprs_codes: list[int]

    def __len__(self) -> int:
        return len(self.tile_id)

    @classmethod
    def from_manifests(cls, manifests: Sequence[dict[str, Any]]) -> TileRows:
        n = len(manifests)
        wkts: dict[str, int] = {}
        codes = sorted({int(c) for m in manifests for c in m["points"]["asprs"]})
        where = {c: j for j, c in enumerate(codes)}
        rows = cls(
            tile_id=pa.array([m["tile_id"] for m in manifests], pa.string()),
            epsg=np.array([m["tile"]["epsg"] or -1 for m in manifests], np.int32),
            crs=np.array(
                [wkts.setdefault(m["tile"]["crs_wkt"], len(wkts)) for m in manifests], np.int16
            ),
            crs_wkts=[],
            col=np.array([m["tile"]["col"] for m in manifests], np.int64),
            row=np.array([m["tile"]["row"] for m in manifests], np.int64),
            gsd=np.array([m["tile"]["gsd"] for m in manifests], np.float64),
            size=np.array([m["tile"]["size"] for m in manifests], np.int32),
            year=np.array([m["year"] for m in manifests], np.int16),
            datetime=pa.array([m["datetime"] for m in manifests], pa.string()),
            lidar_project=pa.array(
                [m["inputs"]["lidar_project"] or "" for m in manifests], pa.string()
            ),
            points=np.array([m["points"]["count"] for m in manifests], np.int64),
            pixels=_counts([m["pixels"] for m in manifests]),
            class_points=_counts([m["points"]["n3c"] for m in manifests]),
            band_count=np.zeros((n, len(BANDS)), np.int64),
            band_sum=np.zeros((n, len(BANDS)), np.float64),
            band_sumsq=np.zeros((n, len(BANDS)), np.float64),
            asprs=np.zeros((n, len(codes)), np.int64),
            asprs_codes=codes,
        )
        rows.crs_wkts = list(wkts)
        for r, m in enumerate(manifests):
            for b, (layer, i, _) in enumerate(BANDS):
                st = m["stats"][layer]
                rows.band_count[r, b] = st["count"][i]
                rows.band_sum[r, b] = st["sum"][i]
                rows.band_sumsq[r, b] = st["sumsq"][i]
            for code, count in m["points"]["asprs"].items():
                rows.asprs[r, where[int(code)]] = count
        return rows

    @classmethod
    def concat(cls, parts: Iterable[TileRows]) -> TileRows:
        parts = [p for p in parts if len(p)] or [cls.from_manifests([])]
        wkts = list(dict.fromkeys(w for p in parts for w in p.crs_wkts))
        codes = sorted({c for p in parts for c in p.asprs_codes})
        merged: dict[str, Any] = {"crs_wkts": wkts, "asprs_codes": codes}
        for f in fields(cls):
            name = f.name
            if name in merged:
                continue
            if name == "crs":
                remap = [np.array([wkts.index(w) for w in p.crs_wkts], np.int16) for p in parts]
                merged[name] = np.concatenate([r[p.crs] for r, p in zip(remap, parts, strict=True)])
            elif name == "asprs":
                merged[name] = np.zeros((sum(map(len, parts)), len(codes)), np.int64)
                start = 0
                for p in parts:
                    cols = [codes.index(c) for c in p.asprs_codes]
                    merged[name][start : start + len(p), cols] = p.asprs
                    start += len(p)
            elif isinstance(getattr(parts[0], name), pa.Array):
                merged[name] = pa.concat_arrays([getattr(p, name) for p in parts])
            else:
                merged[name] = np.concatenate([getattr(p, name) for p in parts])
        return cls(**merged)

    def take(self, order: np.ndarray) -> TileRows:
        """The rows at positions `order`."""
        picked: dict[str, Any] = {"crs_wkts": self.crs_wkts, "asprs_codes": self.asprs_codes}
        index = pa.array(order)
        for f in fields(self):
            if f.name not in picked:
                value = getattr(self, f.name)
                picked[f.name] = value.take(index) if isinstance(value, pa.Array) else value[order]
        return TileRows(**picked)

    def sorted(self) -> TileRows:
        """Rows in tile-id order: outputs must not depend on the order tiles finished in."""
        return self.take(np.asarray(pc.sort_indices(self.tile_id)))

    @property
    def span(self) -> np.ndarray:
        return self.gsd * self.size

    def grid_names(self) -> np.ndarray:
        """Per row, the grid its id starts with (`<epsg>_<gsd cm>cm<size>`)."""
        ids = self.tile_id.to_numpy(zero_copy_only=False)
        return np.array([t.rsplit("_", 2)[0] for t in ids], dtype=object)


def _counts(dicts: list[dict[str, int]]) -> np.ndarray:
    """Class-count dicts as an (n, classes) array in class order (missing classes count 0)."""
    return np.array([[d.get(k, 0) for k in N3C.names] for d in dicts], np.int64).reshape(
        len(dicts), len(N3C)
    )


def scan_finished(out_dir: str, tile_ids: Sequence[str]) -> tuple[TileRows, list[str]]:
    """The finished tiles among `tile_ids` as rows, and the ids still to build.

    Run as a dask task per chunk of tiles on the resume of a big build (any worker sees the
    output folder), so a resume does not ship a task per finished tile through the scheduler.
    Writes a tile's STAC item when a finished tile lacks it (a build killed between the two).
    """
    from geoseg.builder.catalog import write_item
    from geoseg.builder.tile import item_path, load_finished, tile_dir

    manifests, todo = [], []
    root = Path(out_dir)
    for tile_id in tile_ids:
        folder = tile_dir(root, tile_id)
        manifest = load_finished(folder)
        if manifest is None:
            todo.append(tile_id)
            continue
        if not item_path(folder).exists():
            write_item(folder, manifest)
        manifests.append(manifest)
    return TileRows.from_manifests(manifests), todo
