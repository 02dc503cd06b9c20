"""Describe the built tiles: a STAC Collection with one Item per tile, and a GeoParquet index.

The STAC side lets any STAC tool (and our own `rustac serve` tests) browse the dataset; the
GeoParquet index is what the datasets and notebooks query (split, bbox, class fractions) without
opening thousands of JSON files.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import geopandas as gpd
import pystac
import shapely
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension

from geoseg.builder.grid import TileSpec
from geoseg.builder.rasterize import FLOAT_NODATA
from geoseg.builder.tile import TileResult
from geoseg.builder.writers import atomic_path
from geoseg.classes import N3C
from geoseg.regions import Region

COLLECTION_ID = "n3c-california"
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


def tile_item(manifest: dict[str, Any], split: str) -> pystac.Item:
    properties = {
        "geoseg:split": split,
        "geoseg:year": manifest["year"],
        "geoseg:lidar_project": manifest["inputs"]["lidar_project"],
        "geoseg:missing_bands": manifest["missing_bands"],
        # Class order, whatever the manifest's key order (tile.json is written sorted).
        "geoseg:pixel_counts": {k: manifest["pixels"].get(k, 0) for k in N3C.names},
        "geoseg:point_counts": {k: manifest["points"]["n3c"].get(k, 0) for k in N3C.names},
    }
    item = new_item(_tile_spec(manifest), manifest["datetime"], properties, COLLECTION_ID)
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
    return item


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


def write_catalog(
    out: Path, done: list[TileResult], splits: dict[str, str], region: Region
) -> None:
    """Write `collection.json`, `tiles/<id>/<id>.json` items, `index.parquet` and
    `tiles.geojson`."""
    items = [tile_item(r.manifest, splits[r.tile_id]) for r in done]
    if items:
        extent = pystac.Extent(
            pystac.SpatialExtent(
                [list(shapely.union_all([shapely.box(*i.bbox) for i in items]).bounds)]
            ),
            pystac.TemporalExtent(
                [[min(i.datetime for i in items), max(i.datetime for i in items)]]
            ),
        )
    else:
        extent = pystac.Extent(
            pystac.SpatialExtent([list(region.geometry.bounds)]),
            pystac.TemporalExtent([[None, None]]),
        )
    collection = pystac.Collection(
        id=COLLECTION_ID,
        description=(
            "N3C-California style tiles: NAIP imagery and USGS 3DEP LiDAR on one grid, labelled "
            f"from the LiDAR's ASPRS classes ({' / '.join(N3C.real)}). Built by geoseg."
        ),
        extent=extent,
        title=f"geoseg tiles for {region.name}",
        license="various",
        summaries=pystac.Summaries({"geoseg:split": sorted(set(splits.values()))}),
    )
    save_collection(
        out,
        collection,
        items,
        _classes(),
        [
            ("report", "./report.json", pystac.MediaType.JSON, "build report"),
            ("preview", "./preview.png", pystac.MediaType.PNG, "image / label / DSM preview"),
        ],
    )
    write_index(out, done, splits)


def save_collection(
    out: Path,
    collection: pystac.Collection,
    items: list[pystac.Item],
    classes: list[Classification],
    assets: list[tuple[str, str, str, str]],
) -> None:
    """Add the items, the class summary and the build-level assets (the index, footprints and
    stats every build has, plus `assets`: (key, href, media type, title)); save the collection
    self-contained with each item beside its tile's files. Shared with `geoseg prepare`."""
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


def write_index(out: Path, done: list[TileResult], splits: dict[str, str]) -> None:
    """One row per tile in `index.parquet` (for code) and `tiles.geojson` (the same rows for any
    GIS: Debian's GDAL, hence QGIS there, has no Parquet driver)."""
    rows = []
    for r in done:
        m = r.manifest
        tile = _tile_spec(m)
        labelled = sum(v for k, v in m["pixels"].items() if k != N3C.names[0]) or 1
        rows.append(
            {
                "tile_id": tile.id,
                "split": splits[r.tile_id],
                "epsg": tile.epsg,
                "crs_wkt": tile.crs_wkt,
                "gsd": tile.gsd,
                "size": tile.size,
                "xmin": tile.bounds[0],
                "ymin": tile.bounds[1],
                "xmax": tile.bounds[2],
                "ymax": tile.bounds[3],
                "year": m["year"],
                "datetime": m["datetime"],
                "lidar_project": m["inputs"]["lidar_project"],
                "points": m["points"]["count"],
                **{f"frac_{k}": m["pixels"].get(k, 0) / labelled for k in N3C.real},
                "frac_unlabeled": m["pixels"].get(N3C.names[0], 0) / (tile.size * tile.size),
                "path": f"tiles/{tile.id}",
                "geometry": tile.footprint_lonlat(),
            }
        )
    gdf = (
        gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")
        if rows
        else gpd.GeoDataFrame({"tile_id": [], "split": []}, geometry=[], crs="EPSG:4326")
    )
    with atomic_path(out / "index.parquet") as tmp:
        gdf.to_parquet(tmp, index=False)
    with atomic_path(out / "tiles.geojson") as tmp:
        gdf.to_file(tmp, driver="GeoJSON", layer="tiles")
