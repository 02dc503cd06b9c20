"""The build as STAC: one Item per tile, written by the worker that built it, and a Collection
that reaches them through sub-catalogs.

A state-wide build has 1.6 M tiles, so nothing here holds them all: an item is written once,
beside its files, when its tile is finished (`write_item`), and never rewritten; it carries
what the tile is, not which split it is in (splits are the dataset's, in `index.parquet` and
`splits.json`, and change with the split settings). At the end of the build the driver writes
`collection.json` and one sub-catalog per block of `CATALOG_BLOCK` x `CATALOG_BLOCK` tiles of a
grid (`catalogs/<grid>/<bx>_<by>.json`, at most 4096 item links each), streaming over the
tile ids; the collection links the sub-catalogs only (a few hundred at state scale).
"""

from __future__ import annotations

import json
from datetime import datetime
from itertools import groupby
from pathlib import Path
from typing import Any

import pystac
import shapely
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension

from geoseg.builder.grid import TileSpec
from geoseg.builder.rasterize import FLOAT_NODATA
from geoseg.builder.writers import write_bytes_atomic
from geoseg.classes import N3C
from geoseg.regions import Region

COLLECTION_ID = "n3c-california"
CATALOG_BLOCK = 64
"""Tiles per side of a sub-catalog block: at most 4096 item links per catalog file."""
ITEM_JSON = "{id}.json"
COG = pystac.MediaType.COG
LAZ = "application/vnd.laszip"

_RASTER_ASSETS: dict[str, tuple[str, DataType, float | None, str]] = {
    # name: (title, dtype, nodata, unit)
    "image": ("NAIP R, G, B, NIR on the tile grid", DataType.UINT8, 0, ""),
    "label": ("N3C land-cover label (0 = unlabeled)", DataType.UINT8, 0, ""),
    "dsm": (
        "LiDAR DSM: highest non-noise point per pixel",
        DataType.FLOAT32,
        FLOAT_NODATA,
        "metre",
    ),
    "intensity": ("LiDAR mean intensity per pixel", DataType.FLOAT32, FLOAT_NODATA, ""),
    "num_returns": ("LiDAR max number of returns per pixel", DataType.UINT8, 0, ""),
}


def _tile_spec(manifest: dict[str, Any]) -> TileSpec:
    t = manifest["tile"]
    return TileSpec(t["crs_wkt"], t["epsg"], t["col"], t["row"], t["gsd"], t["size"])


def _classes() -> list[Classification]:
    return [
        Classification.create(
            value=v,
            description=N3C.descriptions[v],
            name=name,
            color_hint="{:02X}{:02X}{:02X}".format(*N3C.colors[v][:3]),
        )
        for v, name in enumerate(N3C.names)
    ]


def block_of(tile_id: str) -> tuple[str, str]:
    """(grid, block) of a tile id: its sub-catalog is `catalogs/<grid>/<block>.json`."""
    grid, col, row = tile_id.rsplit("_", 2)
    return grid, f"{int(col) // CATALOG_BLOCK}_{int(row) // CATALOG_BLOCK}"


def _link(rel: str, href: str, media: str, title: str | None = None) -> dict[str, str]:
    link = {"rel": rel, "href": href, "type": media}
    return link | ({"title": title} if title else {})


def tile_item(manifest: dict[str, Any]) -> dict[str, Any]:
    """The STAC Item of a finished tile, with its links into the build's catalog tree."""
    properties = {
        "geoseg:year": manifest["year"],
        "geoseg:lidar_project": manifest["inputs"]["lidar_project"],
        "geoseg:missing_bands": manifest["missing_bands"],
        # Class order, whatever the manifest's key order (tile.json is written sorted).
        "geoseg:pixel_counts": {k: manifest["pixels"].get(k, 0) for k in N3C.names},
        "geoseg:point_counts": {k: manifest["points"]["n3c"].get(k, 0) for k in N3C.names},
    }
    tile = _tile_spec(manifest)
    item = new_item(tile, manifest["datetime"], properties, COLLECTION_ID)
    RasterExtension.add_to(item)
    FileExtension.add_to(item)
    ClassificationExtension.add_to(item)
    for name, (title, dtype, nodata, unit) in _RASTER_ASSETS.items():
        asset = pystac.Asset(f"./{name}.tif", title=title, media_type=COG, roles=["data"])
        item.add_asset(name, asset)
        bands = 4 if name == "image" else 1
        RasterExtension.ext(asset).bands = [
            RasterBand.create(nodata=nodata, data_type=dtype, unit=unit or None)
            for _ in range(bands)
        ]
        if name == "label":
            ClassificationExtension.ext(asset).classes = _classes()
    item.add_asset(
        "points",
        pystac.Asset(
            "./points.laz",
            title="LiDAR points in the tile CRS, z in metres",
            media_type=LAZ,
            roles=["data"],
        ),
    )
    for asset in item.assets.values():
        add_file_info(asset, manifest["files"][Path(asset.href).name])
    grid, block = block_of(tile.id)
    doc = item.to_dict(include_self_link=False, transform_hrefs=False)
    doc["links"] = [
        _link("root", "../../collection.json", pystac.MediaType.JSON),
        _link("collection", "../../collection.json", pystac.MediaType.JSON),
        _link("parent", f"../../catalogs/{grid}/{block}.json", pystac.MediaType.JSON),
    ]
    return doc


def new_item(tile: TileSpec, when: str, properties: dict[str, Any], collection: str) -> pystac.Item:
    """A tile's item: lon/lat footprint and bbox, gsd, projection extension. `tile`: anything
    with id, gsd, size, epsg, crs_wkt, transform, bounds and footprint_lonlat() (the builder's
    `TileSpec`, `geoseg prepare`'s `GridTile`)."""
    foot = tile.footprint_lonlat()
    item = pystac.Item(
        id=tile.id,
        geometry=shapely.geometry.mapping(foot),
        bbox=list(foot.bounds),
        datetime=datetime.fromisoformat(when),
        properties={"gsd": tile.gsd, **properties},
        collection=collection,
    )
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.epsg = tile.epsg
    if tile.epsg is None:
        proj.wkt2 = tile.crs_wkt
    proj.shape = [tile.size, tile.size]
    proj.transform = list(tile.transform)[:6]
    proj.bbox = list(tile.bounds)
    return item


def add_file_info(asset: pystac.Asset, meta: dict[str, Any]) -> None:
    """Size and sha256 multihash of an asset, from its entry in the tile manifest's `files`."""
    fe = FileExtension.ext(asset)
    fe.size = meta["size"]
    fe.checksum = "1220" + meta["sha256"]  # multihash: sha2-256, 32 bytes


def write_item(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write the tile's item beside its files (`tiles/<id>/<id>.json`)."""
    path = folder / ITEM_JSON.format(id=manifest["tile_id"])
    text = json.dumps(tile_item(manifest), indent=2) + "\n"
    write_bytes_atomic(path, lambda p: p.write_text(text))
    return path


def write_stac(
    out: Path,
    tile_ids: list[str],
    bbox: tuple[float, float, float, float] | None,
    interval: tuple[str, str] | None,
    region: Region,
) -> None:
    """`collection.json` and the sub-catalogs linking every finished tile's item.

    `tile_ids` are sorted (a block lists its items in that order); `bbox` (lon/lat) and `interval`
    (ISO datetimes) are the collection's extent, None for a build without tiles.
    """
    spatial = bbox if bbox is not None else region.geometry.bounds
    temporal = [datetime.fromisoformat(t) for t in interval] if interval else [None, None]
    collection = pystac.Collection(
        id=COLLECTION_ID,
        description=(
            "N3C-California style tiles: NAIP imagery and USGS 3DEP LiDAR on one grid, labelled "
            f"from the LiDAR's ASPRS classes ({' / '.join(N3C.real)}). Built by geoseg."
        ),
        extent=pystac.Extent(
            pystac.SpatialExtent([list(spatial)]), pystac.TemporalExtent([temporal])
        ),
        title=f"geoseg tiles for {region.name}",
        license="various",
    )
    ClassificationExtension.add_to(collection)
    collection.summaries.add("classification:classes", [c.to_dict() for c in _classes()])
    for key, href, media, title in (
        ("index", "./index.parquet", "application/vnd.apache.parquet", "GeoParquet tile index"),
        ("footprints", "./tiles.vrt", "application/xml", "tile footprints (GIS layer, OGR VRT)"),
        ("splits", "./splits.json", pystac.MediaType.JSON, "tile ids per split"),
        ("stats", "./stats.json", pystac.MediaType.JSON, "band statistics and class counts"),
        ("report", "./report.json", pystac.MediaType.JSON, "build report"),
        ("preview", "./preview.png", pystac.MediaType.PNG, "image / label / DSM preview"),
    ):
        collection.add_asset(
            key, pystac.Asset(href, title=title, media_type=media, roles=["metadata"])
        )
    doc = collection.to_dict(include_self_link=False, transform_hrefs=False)
    doc["links"] = [_link("root", "./collection.json", pystac.MediaType.JSON, collection.title)]
    written = set()
    # Sorted ids do not keep a block together: `..._500_8000` .. `..._500_8127` spans two
    # blocks, then `..._501_8000` returns to the first. So tiles are ordered by block first.
    keys = [block_of(t) for t in tile_ids]
    order = sorted(range(len(tile_ids)), key=keys.__getitem__)
    for (grid, block), run in groupby(order, key=keys.__getitem__):
        path = out / "catalogs" / grid / f"{block}.json"
        doc["links"].append(_link("child", f"./catalogs/{grid}/{block}.json", "application/json"))
        _write_json(path, _block_catalog(grid, block, [tile_ids[i] for i in run]))
        written.add(path)
    del keys, order
    for stale in (out / "catalogs").glob("*/*.json"):  # blocks an earlier build had
        if stale not in written:
            stale.unlink()
    _write_json(out / "collection.json", doc)


def _block_catalog(grid: str, block: str, tile_ids: list[str]) -> dict[str, Any]:
    links = [
        _link("root", "../../collection.json", pystac.MediaType.JSON),
        _link("parent", "../../collection.json", pystac.MediaType.JSON),
    ]
    links += [
        _link("item", f"../../tiles/{t}/{ITEM_JSON.format(id=t)}", pystac.MediaType.GEOJSON)
        for t in tile_ids
    ]
    return {
        "type": "Catalog",
        "id": f"{grid}_{block}",
        "stac_version": pystac.get_stac_version(),
        "description": f"Tiles of grid {grid}, block {block} ({CATALOG_BLOCK} x {CATALOG_BLOCK} "
        "tiles)",
        "links": links,
    }


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    text = json.dumps(doc, indent=1) + "\n"
    write_bytes_atomic(path, lambda p: p.write_text(text))


def save_collection(
    out: Path,
    collection: pystac.Collection,
    items: list[pystac.Item],
    classes: list[Classification],
    assets: list[tuple[str, str, str, str]],
) -> None:
    """Add the items, the class summary and the build-level assets (the index, footprints and
    stats every build has, plus `assets`: (key, href, media type, title)); save the collection
    self-contained with each item beside its tile's files. For small collections whose items
    are all in memory: `geoseg prepare`'s benchmarks (a build-dataset uses `write_stac`)."""
    ClassificationExtension.add_to(collection)
    collection.summaries.add("classification:classes", [c.to_dict() for c in classes])
    for item in items:
        collection.add_item(item)
    for key, href, media, title in (
        ("index", "./index.parquet", "application/vnd.apache.parquet", "GeoParquet tile index"),
        ("footprints", "./tiles.geojson", pystac.MediaType.GEOJSON, "tile footprints (GIS layer)"),
        ("stats", "./stats.json", pystac.MediaType.JSON, "band statistics and class counts"),
        *assets,
    ):
        collection.add_asset(
            key, pystac.Asset(href, title=title, media_type=media, roles=["metadata"])
        )
    collection.normalize_hrefs(str(out), strategy=_TileLayout())
    collection.save(pystac.CatalogType.SELF_CONTAINED, dest_href=str(out))


class _TileLayout(pystac.layout.HrefLayoutStrategy):
    """Items live beside their files: tiles/<id>/<id>.json."""

    def get_catalog_href(self, cat, parent_dir, is_root):
        return str(Path(parent_dir) / "catalog.json")

    def get_collection_href(self, col, parent_dir, is_root):
        return str(Path(parent_dir) / "collection.json")

    def get_item_href(self, item, parent_dir):
        return str(Path(parent_dir) / "tiles" / item.id / f"{item.id}.json")
