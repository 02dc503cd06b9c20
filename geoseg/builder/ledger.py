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

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geoseg.classes import N3C

STAT_BANDS = {
    "image": ("red", "green", "blue", "nir"),
    "dsm": ("dsm",),
    "intensity": ("intensity",),
}
"""Layers of a manifest's `stats` and the band names stats.json gives them, in order."""
BANDS = [(layer, i, name) for layer, names in STAT_BANDS.items() for i, name in enumerate(names)]
_PLAIN_ID = re.compile(r"[A-Za-z0-9_]+")
_KEY_LISTS = ("crs_wkts", "asprs_codes", "file_names")
"""TileRows attributes that name columns or codes rather than hold one value per row."""
LEDGER = "ledger"
"""Folder of the ledger's parts, `part-NNNN.parquet`."""
LEDGER_PART_TILES = 400_000
"""Rows per ledger part: ~130 B a tile, so a part stays near 50 MB (1.6 M tiles: 203 MB)."""


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
    file_sizes: np.ndarray  # (n, files) int64: the tile's data files, -1 where it has none
    file_names: list[str]
    stamp: np.ndarray  # int64: tile.json's mtime (ns) when the row was made, -1 if unknown

    def __len__(self) -> int:
        return len(self.tile_id)

    @classmethod
    def from_manifests(
        cls, manifests: Sequence[dict[str, Any]], stamps: Sequence[int] | None = None
    ) -> TileRows:
        """Rows of finished tiles' manifests; `stamps` are their tile.json mtimes (ns)."""
        n = len(manifests)
        wkts: dict[str, int] = {}
        codes = sorted({int(c) for m in manifests for c in m["points"]["asprs"]})
        where = {c: j for j, c in enumerate(codes)}
        names = sorted({name for m in manifests for name in m["files"]})
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
            file_sizes=np.array(
                [[m["files"].get(k, {"size": -1})["size"] for k in names] for m in manifests],
                np.int64,
            ).reshape(n, len(names)),
            file_names=names,
            stamp=np.full(n, -1, np.int64) if stamps is None else np.array(stamps, np.int64),
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
        merged: dict[str, Any] = {"crs_wkts": wkts}
        for name, keys, fill in (("asprs", "asprs_codes", 0), ("file_sizes", "file_names", -1)):
            union = sorted({k for p in parts for k in getattr(p, keys)})
            merged[keys] = union
            merged[name] = np.full((sum(map(len, parts)), len(union)), fill, np.int64)
            start = 0
            for p in parts:
                cols = [union.index(k) for k in getattr(p, keys)]
                merged[name][start : start + len(p), cols] = getattr(p, name)
                start += len(p)
        for f in fields(cls):
            name = f.name
            if name in merged:
                continue
            if name == "crs":
                remap = [np.array([wkts.index(w) for w in p.crs_wkts], np.int16) for p in parts]
                merged[name] = np.concatenate([r[p.crs] for r, p in zip(remap, parts, strict=True)])
            elif isinstance(getattr(parts[0], name), pa.Array):
                merged[name] = pa.concat_arrays([getattr(p, name) for p in parts])
            else:
                merged[name] = np.concatenate([getattr(p, name) for p in parts])
        return cls(**merged)

    def take(self, order: np.ndarray) -> TileRows:
        """The rows at positions `order`."""
        picked: dict[str, Any] = {k: getattr(self, k) for k in _KEY_LISTS}
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

    def to_table(self) -> pa.Table:
        """The rows as an Arrow table (matrices as fixed-size lists; empty ones left out)."""
        columns: dict[str, pa.Array] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _KEY_LISTS:
                continue
            if isinstance(value, np.ndarray) and value.ndim == 2:
                if value.shape[1] == 0:
                    continue
                value = pa.FixedSizeListArray.from_arrays(pa.array(value.ravel()), value.shape[1])
            columns[f.name] = value
        meta = {k: json.dumps(getattr(self, k)) for k in _KEY_LISTS}
        return pa.table(columns).replace_schema_metadata(meta)

    @classmethod
    def from_table(cls, table: pa.Table) -> TileRows:
        values: dict[str, Any] = {
            k: json.loads(table.schema.metadata[k.encode()]) for k in _KEY_LISTS
        }
        for f in fields(cls):
            if f.name in values:
                continue
            if f.name not in table.column_names:  # a matrix without columns
                values[f.name] = np.zeros((table.num_rows, 0), np.int64)
                continue
            column = table.column(f.name).combine_chunks()
            if pa.types.is_fixed_size_list(column.type):
                flat = column.flatten().to_numpy(zero_copy_only=False)
                values[f.name] = flat.reshape(len(column), column.type.list_size)
            elif pa.types.is_string(column.type):
                values[f.name] = column
            else:
                values[f.name] = column.to_numpy(zero_copy_only=False)
        return cls(**values)


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
    from geoseg.builder.catalog import ITEM_JSON, write_item
    from geoseg.builder.tile import read_finished

    manifests, stamps, todo = [], [], []
    for tile_id, folder in _tile_folders(out_dir, tile_ids):
        found = read_finished(folder)
        if found is None:
            todo.append(tile_id)
            continue
        manifest, stamp = found
        if not os.path.exists(os.path.join(folder, ITEM_JSON.format(id=tile_id))):
            write_item(Path(folder), manifest)
        manifests.append(manifest)
        stamps.append(stamp)
    return TileRows.from_manifests(manifests, stamps), todo


def _tile_folders(out_dir: str, tile_ids: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(id, folder) per tile, as strings: `<out>/tiles` is resolved and checked once."""
    from geoseg.builder.tile import tile_dir
    from geoseg.builder.writers import safe_join

    root = Path(out_dir)
    tiles = os.fspath(safe_join(root, "tiles"))
    for tile_id in tile_ids:
        # Planned ids are grid numbers; anything else goes through tile_dir's checks.
        plain = _PLAIN_ID.fullmatch(tile_id)
        yield tile_id, os.path.join(tiles, tile_id) if plain else os.fspath(tile_dir(root, tile_id))


def write_ledger(out: Path, rows: TileRows) -> None:
    """`ledger/part-NNNN.parquet`: the rows of every finished tile, which the next resume reads
    instead of re-reading 1.6 M manifests. A cache: without it a resume reads the manifests.

    The old parts go first: a build killed while writing leaves the first parts only, and a
    resume reads the manifests of the tiles they lack."""
    import shutil

    from geoseg.builder.writers import atomic_path

    folder = out / LEDGER
    shutil.rmtree(folder, ignore_errors=True)
    table = rows.to_table()
    for k, start in enumerate(range(0, max(len(table), 1), LEDGER_PART_TILES)):
        with atomic_path(folder / f"part-{k:04d}.parquet") as tmp:
            pq.write_table(table.slice(start, LEDGER_PART_TILES), tmp, compression="zstd")


def read_ledger(out: Path) -> TileRows | None:
    """The ledger of an earlier build in `out`, or None (none, or unreadable: then rescan)."""
    parts = sorted((out / LEDGER).glob("part-*.parquet"))
    if not parts:
        return None
    try:
        return TileRows.from_table(pa.concat_tables([pq.read_table(p) for p in parts]))
    except (OSError, ValueError, KeyError, pa.ArrowException):
        return None


def check_ledgered(out_dir: str, tile_ids: Sequence[str], stamps: np.ndarray,
                   file_names: list[str], file_sizes: np.ndarray) -> np.ndarray:  # fmt: skip
    """Which ledger rows still describe their tile: tile.json unchanged since the row was made
    (same mtime), every data file of the size its manifest gave, the item present.

    A few `stat` calls per tile instead of parsing its manifest; a dask task per chunk.
    """
    from geoseg.builder.catalog import ITEM_JSON
    from geoseg.builder.tile import MANIFEST

    ok = np.zeros(len(tile_ids), bool)
    for i, (tile_id, folder) in enumerate(_tile_folders(out_dir, tile_ids)):
        try:
            if os.stat(os.path.join(folder, MANIFEST)).st_mtime_ns != stamps[i]:
                continue
            sizes = zip(file_names, file_sizes[i].tolist(), strict=True)
            if any(n >= 0 and os.stat(os.path.join(folder, f)).st_size != n for f, n in sizes):
                continue
            ok[i] = os.path.exists(os.path.join(folder, ITEM_JSON.format(id=tile_id)))
        except OSError:
            continue
    return ok
