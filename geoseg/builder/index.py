"""The tile index (`index.parquet`) and the footprint layer for GIS (`tiles.vrt`).

`index.parquet` (GeoParquet, one row per finished tile: split, bounds, year, class fractions,
path) is what the datasets, notebooks and retrieval query. GIS gets the same outlines as
FlatGeobuf: Debian's GDAL, hence QGIS there, has no Parquet driver, and GeoJSON would be a
single file of gigabytes at state scale. The FlatGeobuf files hold at most `PART_TILES` tiles
each (a few tens of MB, spatially indexed), under `footprints/`, and `tiles.vrt` unites them
into one layer `tiles`, which is what the QGIS plugin loads after a build.

Everything is computed on columns (`TileRows`): footprints in one PROJ call per CRS.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

import geopandas as gpd
import numpy as np
import pandas as pd
from pyproj import CRS

from geoseg.builder.grid import footprints_lonlat
from geoseg.builder.ledger import TileRows
from geoseg.builder.split import NAMES
from geoseg.builder.writers import atomic_path, write_bytes_atomic
from geoseg.classes import N3C

PART_TILES = 200_000
"""Tiles per FlatGeobuf part: about 63 MB each (~316 bytes a tile, measured)."""
FOOTPRINT_COLUMNS = ["tile_id", "split", "epsg", "xmin", "ymin", "xmax", "ymax", "year", "path",
                     "geometry"]  # fmt: skip
"""epsg and the native bounds let GIS draw a tile as the square it is in its own CRS."""


def index_frame(rows: TileRows, splits: np.ndarray) -> gpd.GeoDataFrame:
    """The index rows of `rows` (sorted by tile id) with split codes `splits`."""
    geometry = np.empty(len(rows), dtype=object)
    span = rows.span
    xmin, ymin = rows.col * span, rows.row * span
    for k, wkt in enumerate(rows.crs_wkts):
        sel = rows.crs == k
        geometry[sel] = footprints_lonlat(
            CRS.from_wkt(wkt), xmin[sel], ymin[sel], xmin[sel] + span[sel], ymin[sel] + span[sel]
        )
    pixels = rows.pixels.astype(np.float64)
    labelled = pixels[:, 1:].sum(axis=1)
    labelled[labelled == 0] = 1
    ids = pd.array(rows.tile_id, dtype="string[pyarrow]")
    epsg = pd.array(np.where(rows.epsg < 0, 0, rows.epsg), dtype="Int64")
    epsg[rows.epsg < 0] = pd.NA
    columns = {
        "tile_id": ids,
        "split": pd.Categorical.from_codes(splits, categories=list(NAMES)).astype(str),
        "epsg": epsg if (rows.epsg < 0).any() else rows.epsg.astype(np.int64),
        # one WKT (~1.1 kB) per CRS, not per row: 1.6 M rows of strings were 1.8 GB in Arrow
        "crs_wkt": pd.Categorical.from_codes(rows.crs, categories=rows.crs_wkts)
        if len(rows)
        else [],
        "gsd": rows.gsd,
        "size": rows.size.astype(np.int64),
        "xmin": xmin,
        "ymin": ymin,
        "xmax": xmin + span,
        "ymax": ymin + span,
        "year": rows.year.astype(np.int64),
        "datetime": pd.array(rows.datetime, dtype="string[pyarrow]"),
        "lidar_project": pd.array(rows.lidar_project, dtype="string[pyarrow]"),
        "points": rows.points,
        **{f"frac_{k}": pixels[:, i] / labelled for i, k in enumerate(N3C.names) if i > 0},
        "frac_unlabeled": pixels[:, 0] / (rows.size.astype(np.float64) ** 2),
        "path": "tiles/" + pd.Series(ids, dtype="string[pyarrow]"),
    }
    return gpd.GeoDataFrame(columns, geometry=geometry, crs="EPSG:4326")


def write_index(out: Path, frame: gpd.GeoDataFrame) -> None:
    with atomic_path(out / "index.parquet") as tmp:
        frame.to_parquet(tmp, index=False, compression="zstd")


def write_footprints(out: Path, frame: gpd.GeoDataFrame) -> None:
    """`footprints/part-NNNN.fgb` (lon/lat outlines with `FOOTPRINT_COLUMNS`) + `tiles.vrt`."""
    folder = out / "footprints"
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, start in enumerate(range(0, max(len(frame), 1), PART_TILES)):
        name = f"part-{k:04d}.fgb"
        with atomic_path(folder / name) as tmp:
            frame.iloc[start : start + PART_TILES][FOOTPRINT_COLUMNS].to_file(
                tmp, driver="FlatGeobuf", layer="tiles"
            )
        parts.append(name)
    for stale in folder.glob("part-*.fgb"):  # parts an earlier, bigger build wrote
        if stale.name not in parts:
            stale.unlink()
    sources = "\n".join(
        f'    <OGRVRTLayer name="{escape(Path(p).stem)}">\n'
        f'      <SrcDataSource relativeToVRT="1">footprints/{escape(p)}</SrcDataSource>\n'
        "      <SrcLayer>tiles</SrcLayer>\n"
        "    </OGRVRTLayer>"
        for p in parts
    )
    # Schema, geometry type, CRS and count given up front: a GIS opening the layer need not
    # open every part first.
    vrt = (
        "<OGRVRTDataSource>\n"
        '  <OGRVRTUnionLayer name="tiles">\n'
        "    <FieldStrategy>FirstLayer</FieldStrategy>\n"
        "    <GeometryType>wkbPolygon</GeometryType>\n"
        "    <LayerSRS>EPSG:4326</LayerSRS>\n"
        f"    <FeatureCount>{len(frame)}</FeatureCount>\n"
        f"{sources}\n"
        "  </OGRVRTUnionLayer>\n"
        "</OGRVRTDataSource>\n"
    )
    write_bytes_atomic(out / "tiles.vrt", lambda p: p.write_text(vrt))
