#!/usr/bin/env python
"""Assemble geoseg's embedded offline sample catalog (data_catalog/sample/) from real data.

The sample lets the whole pipeline (STAC search -> COG/COPC reads -> tiles -> training) run offline
and in CI against files shaped exactly like Planetary Computer's `naip` and `3dep-lidar-copc`
collections, including their quirks (string `naip:year`, `datetime: null` lidar items whose CRS is
only a PROJJSON CompoundCRS, 3-D bboxes). Every pixel and point is real; see the generated README.

Usage:
    .venv/bin/python data_catalog/tools/make_sample.py [SHARED_DATA] [--out DIR]

SHARED_DATA defaults to <repo>/../shared/data (the folder described by its README.md).
The script is deterministic (seeded RNG, fixed LAS header dates, sorted JSON) and verifies its own
outputs (COPC read-back and bounded-query checks, COG validation) with assertions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import shutil
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import laspy
import numpy as np
import pyproj
import rasterio
import shapely
from pyproj import CRS, Transformer
from rasterio.enums import ColorInterp
from rasterio.features import geometry_mask
from rasterio.shutil import copy as rio_copy
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate

from geoseg.builder.copc import to_copc_format, write_copc

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SHARED = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "data_catalog" / "sample"

STAC_VERSION = "1.0.0"
NAIP_EXTENSIONS = [
    "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.0.0/schema.json",
]
COPC_EXTENSIONS = [
    "https://stac-extensions.github.io/projection/v1.0.0/schema.json",
    "https://stac-extensions.github.io/pointcloud/v1.0.0/schema.json",
    "https://stac-extensions.github.io/file/v2.1.0/schema.json",
]
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
COPC_TYPE = "application/vnd.laszip+copc"
BANDS = {
    "red": {"name": "Red", "common_name": "red"},
    "green": {"name": "Green", "common_name": "green"},
    "blue": {"name": "Blue", "common_name": "blue"},
    "nir": {"name": "NIR", "common_name": "nir", "description": "near-infrared"},
}
COG_OPTIONS = {
    "COMPRESS": "DEFLATE",
    "PREDICTOR": "2",
    "BLOCKSIZE": "256",
    "OVERVIEWS": "AUTO",
    "RESAMPLING": "AVERAGE",
    "NUM_THREADS": "1",  # single-threaded DEFLATE: identical bytes on every machine
}
GENERATING_SOFTWARE = "geoseg make_sample.py (copclib)"

# --- provenance (from shared/data/README.md) -----------------------------------------------------
DEEPFOREST = "github.com/weecology/DeepForest"
DEEPFOREST_COMMIT = "5c177aec6230"
PDAL = "github.com/PDAL/PDAL"
PDAL_COMMIT = "ccf0ab704607"
PYSTAC_CLIENT = "github.com/stac-utils/pystac-client"
PYSTAC_CLIENT_COMMIT = "7f5c42c40814"

# NEON TEAK: the acquisition date is not recorded in the files. The only date in them is the LAZ
# header's creation year, 2017 (day-of-year 0, i.e. unset), written by the `rlas` R package; if
# genuine, the lidar was flown in 2017 or earlier, which rules out the 2018 flight. We label the
# site 2017 (RGB assumed to be from the same flight) with a nominal mid-year date. See the README.
TEAK_YEAR = 2017
TEAK_NOMINAL_DATE = "2017-06-01T00:00:00Z"
TEAK_PROJECT = f"NEON_TEAK_{TEAK_YEAR}"  # stand-in for a 3DEP project name (3dep:usgs_id)
TEAK_COMPOUND = "EPSG:32611+5703"  # WGS 84 / UTM 11N + NAVD88 height (m): NEON AOP convention

L93_RES = 0.5
L93_EXCLUDED_CLASSES = (7, 18, 65)  # noise, high noise, 65 = "artefacts" in IGN's LiDAR HD
L93_HORIZONTAL = "EPSG:2154"  # the file declares only RGF93 / Lambert-93; see README


PROVIDERS = [
    {
        "name": "National Ecological Observatory Network (NEON), Battelle / NSF",
        "url": "https://www.neonscience.org",
        "roles": ["producer", "licensor"],
    },
    {
        "name": "weecology/DeepForest and PDAL test data (sources of the sample files)",
        "url": "https://github.com/weecology/DeepForest",
        "roles": ["host"],
    },
    {
        "name": "geoseg (COG/COPC conversion, STAC metadata)",
        "roles": ["processor"],
    },
]


@dataclass
class Entry:
    """One generated asset plus what the README reports about it."""

    site: str
    collection: str
    item: dict[str, Any]
    path: Path
    source: str
    facts: dict[str, Any] = field(default_factory=dict)


# --- small helpers -------------------------------------------------------------------------------


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lonlat_polygon(crs: CRS, x0: float, y0: float, x1: float, y1: float, ndigits: int) -> dict:
    """Footprint of a projected rectangle in lon/lat (corners only: tiles are at most ~400 m)."""
    tr = Transformer.from_crs(crs, 4326, always_xy=True)
    corners = [(x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    ring = [[round(c, ndigits) for c in tr.transform(x, y)] for x, y in corners]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


def geom_bbox(geom: dict) -> list[float]:
    xs = [p[0] for p in geom["coordinates"][0]]
    ys = [p[1] for p in geom["coordinates"][0]]
    return [min(xs), min(ys), max(xs), max(ys)]


def gps_to_utc(t: float, adjusted: bool) -> dt.datetime:
    """Adjusted standard GPS time (GPS seconds - 1e9) to UTC (18 leap seconds since 2017)."""
    if not adjusted:
        raise ValueError("GPS week time carries no date")
    return dt.datetime(1980, 1, 6, tzinfo=dt.UTC) + dt.timedelta(seconds=t + 1e9 - 18)


def iso(d: dt.datetime) -> str:
    return d.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- COG writing ---------------------------------------------------------------------------------


def write_cog(
    dst: Path,
    data: np.ndarray,
    crs: CRS,
    transform: rasterio.Affine,
    nodata: float | None,
    tmpdir: Path,
) -> None:
    """Write uint8 R,G,B[,NIR] as a COG with PHOTOMETRIC=RGB and band 4 *not* alpha.

    GDAL tags band 4 of a 4-band uint8 GTiff as alpha unless told otherwise, which turns NIR into
    a transparency mask for every reader (measurements.md section 3); `alpha="UNSPECIFIED"` makes
    it an ordinary extra sample (colorinterp undefined). The COG driver keeps that colorinterp.
    """
    count = data.shape[0]
    tmp = tmpdir / (dst.stem + ".src.tif")
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": count,
        "dtype": "uint8",
        "crs": crs.to_wkt(),
        "transform": transform,
        "nodata": nodata,
        "photometric": "RGB",
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    if count == 4:
        profile["alpha"] = "UNSPECIFIED"
    with rasterio.open(tmp, "w", **profile) as ds:
        ds.write(data)
        ci = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
        ds.colorinterp = ci + [ColorInterp.undefined] * (count - 3)
    rio_copy(tmp, dst, driver="COG", **COG_OPTIONS)
    tmp.unlink()
    valid, errors, _warnings = cog_validate(str(dst), strict=True)
    assert valid, (dst, errors)
    with rasterio.open(dst) as ds:
        assert ds.colorinterp[:3] == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        assert ColorInterp.alpha not in ds.colorinterp, dst
        assert ds.overviews(1), f"{dst} has no overviews"
        assert np.array_equal(ds.read(), data), f"{dst} pixels differ from the source"


def naip_item(
    item_id: str,
    cog: Path,
    out_dir: Path,
    *,
    state: str,
    year: int,
    datetime_: str,
    bands: list[str],
    epsg: int,
    via: str,
) -> dict[str, Any]:
    """A `naip` item shaped like Planetary Computer's (see stac_examples/items/naip/)."""
    with rasterio.open(cog) as ds:
        t = ds.transform
        h, w = ds.height, ds.width
        left, bottom, right, top = ds.bounds
        crs = CRS.from_user_input(ds.crs.to_wkt())
    geometry = lonlat_polygon(crs, left, bottom, right, top, ndigits=6)
    gsd = round(abs(t.a), 6)
    title = "RGBIR COG tile" if "nir" in bands else "RGB COG tile"
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": NAIP_EXTENSIONS,
        "id": item_id,
        "bbox": geom_bbox(geometry),
        "geometry": geometry,
        "links": [{"rel": "via", "href": via, "title": "Source file this COG was made from"}],
        "assets": {
            "image": {
                "href": "../" + cog.relative_to(out_dir).as_posix(),
                "type": COG_TYPE,
                "roles": ["data"],
                "title": title,
                "eo:bands": [BANDS[b] for b in bands],
            }
        },
        "collection": "naip",
        "properties": {
            "gsd": gsd,
            "datetime": datetime_,
            "naip:year": str(year),
            "proj:bbox": [left, bottom, right, top],
            "proj:epsg": epsg,
            "naip:state": state,
            "proj:shape": [h, w],
            "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f, 0.0, 0.0, 1.0],
        },
    }


# --- COPC --------------------------------------------------------------------------------------


def raw_creation_date(path: Path) -> tuple[int, int]:
    """(year, day-of-year) exactly as stored in a LAS header (laspy turns doy 0 into Dec 31)."""
    with open(path, "rb") as f:
        f.seek(90)
        doy, year = struct.unpack("<HH", f.read(4))
    return year, doy


def write_sample_copc(las: laspy.LasData, dst: Path, crs: CRS, source: Path) -> dict[str, Any]:
    """Write COPC keeping the source's raw header date (its only date hint); facts for README."""
    layout = write_copc(
        las, dst, crs, creation=raw_creation_date(source), software=GENERATING_SOFTWARE
    )
    return asdict(layout)


def verify_copc(path: Path, src: laspy.LasData, crs: CRS) -> None:
    """Read the COPC back with laspy: all points, exact records, bounded query, CRS."""
    hdr = src.header
    n = len(src.points)
    size = hdr.point_format.size
    with laspy.CopcReader.open(path) as r:
        assert r.header.point_count == n, (path, r.header.point_count, n)
        assert r.header.point_format.id == hdr.point_format.id
        got_crs = r.header.parse_crs()
        assert got_crs is not None and got_crs.equals(crs), (path, got_crs)
        assert np.allclose(r.header.mins, hdr.mins) and np.allclose(r.header.maxs, hdr.maxs)
        pts = r.query()
        assert len(pts) == n
        a = np.sort(np.frombuffer(pts.array.tobytes(), dtype=f"S{size}"))
        b = np.sort(np.frombuffer(src.points.array.tobytes(), dtype=f"S{size}"))
        assert np.array_equal(a, b), f"{path}: point records differ from the source"
        # Bounded query (30%..70% of the XY extent) vs a brute-force count. The box edges avoid
        # dyadic fractions: laspy prunes nodes with float bounds but filters points on rounded
        # integer coordinates, so a box edge lying exactly on a node boundary can lose the
        # points that sit on that boundary.
        lo = hdr.mins[:2] + 0.3 * (hdr.maxs[:2] - hdr.mins[:2])
        hi = hdr.mins[:2] + 0.7 * (hdr.maxs[:2] - hdr.mins[:2])
        got = len(r.query(bounds=laspy.copc.Bounds(mins=lo, maxs=hi)))
        ilo = np.round((lo - hdr.offsets[:2]) / hdr.scales[:2]).astype(np.int64)
        ihi = np.round((hi - hdr.offsets[:2]) / hdr.scales[:2]).astype(np.int64)
        xi, yi = np.asarray(src.X, np.int64), np.asarray(src.Y, np.int64)
        want = int(((xi >= ilo[0]) & (xi <= ihi[0]) & (yi >= ilo[1]) & (yi <= ihi[1])).sum())
        assert got == want and want > 0, (path, got, want)
        assert len(r.query(level=0)) > 0
    full = laspy.read(path)  # plain LAZ reader: chunk table and EVLRs must still be consistent
    assert len(full.points) == n and full.header.parse_crs().equals(crs)


def pc_schemas(pf: int) -> list[dict[str, Any]]:
    """`pc:schemas` as PC/PDAL list them for LAS point formats 6/7/8."""
    u, f = "unsigned", "floating"
    s = [
        ("X", 8, f), ("Y", 8, f), ("Z", 8, f), ("Intensity", 2, u), ("ReturnNumber", 1, u),
        ("NumberOfReturns", 1, u), ("ScanDirectionFlag", 1, u), ("EdgeOfFlightLine", 1, u),
        ("Classification", 1, u), ("ScanAngleRank", 4, f), ("UserData", 1, u),
        ("PointSourceId", 2, u), ("GpsTime", 8, f), ("ScanChannel", 1, u), ("ClassFlags", 1, u),
    ]  # fmt: skip
    if pf in (7, 8):
        s += [("Red", 2, u), ("Green", 2, u), ("Blue", 2, u)]
    if pf == 8:
        s += [("Infrared", 2, u)]
    return [{"name": name, "size": size, "type": typ} for name, size, typ in s]


def copc_item(
    item_id: str,
    copc_path: Path,
    out_dir: Path,
    las: laspy.LasData,
    crs: CRS,
    *,
    project: str,
    start: str,
    end: str,
    via: str,
    footprint: shapely.Polygon | None = None,
) -> dict[str, Any]:
    """A `3dep-lidar-copc` item shaped like PC's (see stac_examples/items/3dep-lidar-copc/).

    `footprint` (native CRS) is the data outline; default: the header's XY rectangle.
    """
    h = las.header
    (x0, y0, z0), (x1, y1, z1) = h.mins, h.maxs
    if footprint is None:
        footprint = shapely.box(x0, y0, x1, y1)
    footprint = shapely.geometry.polygon.orient(footprint, 1.0)  # counter-clockwise exterior
    ring = [[round(x, 2), round(y, 2)] for x, y in footprint.exterior.coords]
    tr = Transformer.from_crs(crs, 4326, always_xy=True)
    lonlat = [[round(c, 7) for c in tr.transform(x, y)] for x, y in footprint.exterior.coords]
    geometry = {"type": "Polygon", "coordinates": [lonlat]}
    w, s, e, n = geom_bbox(geometry)
    return {
        "id": item_id,
        "bbox": [w, s, round(z0, 2), e, n, round(z1, 2)],
        "type": "Feature",
        "links": [{"rel": "via", "href": via, "title": "Source file this COPC was made from"}],
        "assets": {
            "data": {
                "href": "../" + copc_path.relative_to(out_dir).as_posix(),
                "type": COPC_TYPE,
                "roles": ["data"],
                "title": "COPC data",
            }
        },
        "geometry": geometry,
        "collection": "3dep-lidar-copc",
        "properties": {
            "pc:type": "lidar",
            "datetime": None,
            "pc:count": int(h.point_count),
            "proj:bbox": [round(v, 2) for v in (x0, y0, z0, x1, y1, z1)],
            "proj:epsg": None,
            "pc:schemas": pc_schemas(h.point_format.id),
            "pc:encoding": COPC_TYPE,
            "3dep:usgs_id": project,
            "end_datetime": end,
            "proj:geometry": {"type": "Polygon", "coordinates": [ring]},
            "proj:projjson": crs.to_json_dict(),
            "start_datetime": start,
        },
        "stac_extensions": COPC_EXTENSIONS,
        "stac_version": STAC_VERSION,
    }


def class_counts(las: laspy.LasData) -> dict[int, int]:
    codes, counts = np.unique(np.asarray(las.classification), return_counts=True)
    return {int(c): int(k) for c, k in zip(codes, counts, strict=True)}


# --- site: NEON TEAK -----------------------------------------------------------------------------


def build_teak(shared: Path, out: Path, tmp: Path) -> list[Entry]:
    src = shared / "neon_teak"
    entries: list[Entry] = []
    for tif in sorted((src / "rgb").glob("TEAK_*.tif")):
        plot = tif.stem  # TEAK_043
        item_id = f"ca_teak_{plot[5:]}_010_{TEAK_YEAR}"
        dst = out / "assets" / "naip" / f"{item_id}.tif"
        with rasterio.open(tif) as ds:
            data = ds.read()
            crs = CRS.from_user_input(ds.crs.to_wkt())
            transform, nodata = ds.transform, ds.nodata
        assert data.shape[0] == 3 and data.dtype == np.uint8 and crs.to_epsg() == 32611
        write_cog(dst, data, crs, transform, nodata, tmp)
        item = naip_item(
            item_id, dst, out, state="ca", year=TEAK_YEAR, datetime_=TEAK_NOMINAL_DATE,
            bands=["red", "green", "blue"], epsg=32611,
            via=f"https://{DEEPFOREST}/blob/{DEEPFOREST_COMMIT}/data/TEAK/Camera/L3/{tif.name}",
        )  # fmt: skip
        nodata_px = int((data == 255).all(0).sum())
        entries.append(
            Entry(
                "teak",
                "naip",
                item,
                dst,
                f"neon_teak/rgb/{tif.name} = {DEEPFOREST} `data/TEAK/Camera/L3/{tif.name}` "
                f"@ {DEEPFOREST_COMMIT}",
                {"size_px": f"{data.shape[2]}x{data.shape[1]}", "nodata_px": nodata_px},
            )
        )

    crs = CRS.from_user_input(TEAK_COMPOUND)
    for laz in sorted((src / "lidar").glob("TEAK_*.laz")):
        plot = laz.stem
        item_id = f"NEON_LPC_TEAK_{TEAK_YEAR}_{plot}"
        dst = out / "assets" / "3dep-lidar-copc" / f"{item_id}.copc.laz"
        las = laspy.read(laz)
        assert las.header.parse_crs() is None, f"{laz} unexpectedly declares a CRS"
        las6 = to_copc_format(las)  # PF1 -> PF6, scan angle carried over
        for dim in (
            "X", "Y", "Z", "intensity", "return_number", "number_of_returns",
            "scan_direction_flag", "edge_of_flight_line", "classification", "synthetic",
            "key_point", "withheld", "user_data", "point_source_id", "gps_time",
        ):  # fmt: skip
            assert np.array_equal(np.asarray(las6[dim]), np.asarray(las[dim])), dim
        assert np.array_equal(np.round(las6.scan_angle * 0.006), las.scan_angle_rank)
        stats = write_sample_copc(las6, dst, crs, laz)
        verify_copc(dst, las6, crs)
        item = copc_item(
            item_id, dst, out, las6, crs, project=TEAK_PROJECT,
            start=f"{TEAK_YEAR}-01-01T00:00:00Z", end=f"{TEAK_YEAR}-12-31T00:00:00Z",
            via=f"https://{DEEPFOREST}/blob/{DEEPFOREST_COMMIT}/data/TEAK/Lidar/{laz.name}",
        )  # fmt: skip
        has_rgb = (src / "rgb" / f"{plot}.tif").exists()
        entries.append(
            Entry(
                "teak", "3dep-lidar-copc", item, dst,
                f"neon_teak/lidar/{laz.name} = {DEEPFOREST} `data/TEAK/Lidar/{laz.name}` "
                f"@ {DEEPFOREST_COMMIT}",
                {
                    "points": len(las6.points), "classes": class_counts(las6),
                    "z": (round(float(las6.z.min()), 2), round(float(las6.z.max()), 2)),
                    "rgb_plot": has_rgb, **stats,
                },
            )
        )  # fmt: skip
    return entries


# --- site: Lambert-93 (France) -------------------------------------------------------------------


def fill_holes(
    img: np.ndarray, valid: np.ndarray, footprint: np.ndarray, max_iter: int = 50
) -> tuple[np.ndarray, int]:
    """Fill empty pixels inside `footprint` with the rounded mean of their valid 3x3 neighbours.

    Each pass fills every hole that touches at least one valid pixel, so a hole k pixels from
    data is filled in k passes; no interpolation library needed, fully deterministic.
    """
    img = img.astype(np.float64)
    valid = valid.copy()
    passes = 0
    while not valid[footprint].all():
        assert passes < max_iter, "holes remain after max_iter passes"
        passes += 1
        pv = np.pad(valid, 1).astype(np.float64)
        pi = np.pad(img * valid, ((0, 0), (1, 1), (1, 1)))
        h, w = valid.shape
        cnt = sum(pv[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
        acc = sum(pi[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
        fill = footprint & ~valid & (cnt > 0)
        img[:, fill] = np.round(acc[:, fill] / cnt[fill])
        valid = valid | fill
    return np.clip(img, 0, 255).astype(np.uint8), passes


def build_lambert93(shared: Path, out: Path, tmp: Path) -> list[Entry]:
    rel = "pdal/laz/las_with_several_extra_byte_bloc.laz"
    src = shared / rel
    las = laspy.read(src)
    h = las.header
    assert h.point_format.id == 8 and len(las.points) == 697_721
    crs = h.parse_crs()
    assert crs is not None and crs.to_epsg() == 2154
    crs = CRS.from_user_input(L93_HORIZONTAL)

    # 1. Are the per-point colours real? (16-bit values that are 8-bit values << 8.)
    colours = {b: np.asarray(las[b]) for b in ("red", "green", "blue", "nir")}
    for b, v in colours.items():
        assert (v > 0).mean() > 0.99 and v.std() > 1000 and len(np.unique(v)) > 100, b
        assert ((v & 0xFF) == 0).mean() > 0.999, f"{b}: not 8-bit values scaled by 256"

    adjusted = bool(h.global_encoding.value & 1)
    t0, t1 = (gps_to_utc(float(f(las.gps_time)), adjusted) for f in (np.min, np.max))
    year = t0.year
    via = f"https://{PDAL}/blob/{PDAL_COMMIT}/test/data/laz/{src.name}"

    # 2. Rasterise the top-most (highest Z) point's colour per 0.5 m pixel.
    keep = ~np.isin(np.asarray(las.classification), L93_EXCLUDED_CLASSES)
    x, y, z = np.asarray(las.x)[keep], np.asarray(las.y)[keep], np.asarray(las.z)[keep]
    gx0 = math.floor(h.mins[0] / L93_RES) * L93_RES
    gy1 = math.ceil(h.maxs[1] / L93_RES) * L93_RES
    width = math.ceil((h.maxs[0] - gx0) / L93_RES)
    height = math.ceil((gy1 - h.mins[1]) / L93_RES)
    col = np.clip(np.floor((x - gx0) / L93_RES).astype(np.int64), 0, width - 1)
    row = np.clip(np.floor((gy1 - y) / L93_RES).astype(np.int64), 0, height - 1)
    pix = row * width + col
    order = np.lexsort((z, pix))  # by pixel, then by Z; stable -> deterministic ties
    last = np.r_[np.flatnonzero(np.diff(pix[order])), len(order) - 1]
    top = order[last]
    img = np.zeros((4, height * width), np.uint8)
    for i, b in enumerate(("red", "green", "blue", "nir")):
        img[i, pix[top]] = (colours[b][keep][top] >> 8).astype(np.uint8)
    valid = np.zeros(height * width, bool)
    valid[pix[top]] = True
    img = img.reshape(4, height, width)
    valid = valid.reshape(height, width)
    # The points cover a diagonal strip (about 2/3 of their bbox): only holes inside the points'
    # convex hull are filled; the rest of the grid is nodata (0).
    hull = shapely.multipoints(np.column_stack([las.x, las.y])).convex_hull
    transform = from_origin(gx0, gy1, L93_RES, L93_RES)
    inside = geometry_mask([hull], (height, width), transform, invert=True)
    footprint = inside | valid
    holes = int((footprint & ~valid).sum())
    img, passes = fill_holes(img, valid, footprint)
    img[:, footprint] = np.maximum(img[:, footprint], 1)  # 0 is reserved for nodata
    img[:, ~footprint] = 0

    item_id = f"fr_lambert93_0484_6633_050_{year}"
    cog = out / "assets" / "naip" / f"{item_id}.tif"
    write_cog(cog, img, crs, transform, 0, tmp)
    naip = naip_item(
        item_id, cog, out, state="fr", year=year, datetime_=f"{t0.date().isoformat()}T00:00:00Z",
        bands=["red", "green", "blue", "nir"], epsg=2154, via=via,
    )  # fmt: skip

    # STAC footprint: the hull has ~170 vertices along the curved swath edge; simplify it and grow
    # it by the same 0.5 m so it still covers every point, then clip to the header bbox.
    outline = shapely.box(*h.mins[:2], *h.maxs[:2]).intersection(
        hull.simplify(0.5).buffer(0.5, join_style="mitre")
    )
    assert shapely.contains_xy(outline.buffer(1e-6), las.x, las.y).all()

    # 3. The points themselves as COPC (extra-byte dimensions dropped: not part of 3DEP COPC).
    extra = list(h.point_format.extra_dimension_names)
    las.remove_extra_dims(extra)
    las.update_header()
    copc_id = f"FR_L93_LPC_{year}_0484_6633"
    dst = out / "assets" / "3dep-lidar-copc" / f"{copc_id}.copc.laz"
    stats = write_sample_copc(las, dst, crs, src)
    verify_copc(dst, las, crs)
    pc = copc_item(
        copc_id, dst, out, las, crs, project=f"FR_L93_LIDAR_{year}",
        start=iso(t0.replace(microsecond=0)),
        end=iso(t1.replace(microsecond=0) + dt.timedelta(seconds=1)),
        via=via, footprint=outline,
    )  # fmt: skip
    source = f"{rel} = {PDAL} `test/data/laz/{src.name}` @ {PDAL_COMMIT}"
    return [
        Entry(
            "lambert93", "naip", naip, cog, source,
            {
                "size_px": f"{width}x{height}", "holes_filled": holes,
                "hole_fraction": round(holes / int(footprint.sum()), 4), "fill_passes": passes,
                "nodata_px": int((~footprint).sum()),
                "points_used": int(keep.sum()),
            },
        ),
        Entry(
            "lambert93", "3dep-lidar-copc", pc, dst, source,
            {
                "points": len(las.points), "classes": class_counts(las),
                "z": (round(float(las.z.min()), 2), round(float(las.z.max()), 2)),
                "dropped_extra_dims": extra, "flight_utc": f"{iso(t0)} .. {iso(t1)}", **stats,
            },
        ),
    ]  # fmt: skip


# --- collections, licenses, README ---------------------------------------------------------------


def union_bbox(boxes: list[list[float]]) -> list[float]:
    b2 = [geom_bbox_2d(b) for b in boxes]
    return [
        min(b[0] for b in b2),
        min(b[1] for b in b2),
        max(b[2] for b in b2),
        max(b[3] for b in b2),
    ]


def collection(pc_doc: dict[str, Any], entries: list[Entry], note: str) -> dict[str, Any]:
    """PC's collection JSON with the sample's own extent and no Azure-specific members.

    Like PC's, the spatial extent lists the overall bbox first, then one bbox per disjoint region
    (here: per site).
    """
    items = [e.item for e in entries]
    sites = sorted({e.site for e in entries})
    doc = {k: v for k, v in pc_doc.items() if not k.startswith("msft:")}
    # PC's links point at PC's API and at USDA/USGS license pages that do not cover this data;
    # the serving API adds its own self/root/items links.
    doc["links"] = []
    doc["license"] = "various"  # CC0 (NEON) and BSD-3-Clause (PDAL test data): see README
    doc["providers"] = PROVIDERS
    doc.pop("assets", None)  # PC thumbnail / geoparquet snapshot: not part of the sample
    doc["title"] = f"{doc['title']} (geoseg offline sample)"
    doc["description"] = f"{note}\n\n{doc['description']}"
    per_site = [union_bbox([e.item["bbox"] for e in entries if e.site == s]) for s in sites]
    times = [
        t
        for it in items
        for t in (
            it["properties"].get("datetime"),
            it["properties"].get("start_datetime"),
            it["properties"].get("end_datetime"),
        )
        if t
    ]
    doc["extent"] = {
        "spatial": {"bbox": [union_bbox(per_site), *per_site]},
        "temporal": {"interval": [[min(times), max(times)]]},
    }
    if doc["id"] == "naip":
        doc["summaries"]["gsd"] = sorted({it["properties"]["gsd"] for it in items})
    return doc


def geom_bbox_2d(b: list[float]) -> list[float]:
    return [b[0], b[1], b[3], b[4]] if len(b) == 6 else list(b)


def write_licenses(shared: Path, out: Path) -> list[tuple[str, str]]:
    lic = out / "LICENSES"
    lic.mkdir(parents=True)
    pairs = [
        ("neon_teak/LICENSE.source.txt", "DeepForest-MIT.txt"),
        ("pdal/LICENSE.source.txt", "PDAL-BSD.txt"),
        ("stac_examples/LICENSE.pystac-client.txt", "pystac-client-Apache-2.0.txt"),
    ]
    for s, d in pairs:
        shutil.copyfile(shared / s, lic / d)
    return pairs


README_TEMPLATE = """\
# geoseg offline sample catalog

<!-- Generated by data_catalog/tools/make_sample.py; edit the script, not this file. -->

A small, **real** STAC catalog that geoseg serves through a local STAC API (`rustac serve`), so
the whole pipeline runs offline and in CI. Collections and items are shaped like Planetary
Computer's `naip` and `3dep-lidar-copc` (compare `shared/data/stac_examples/`), including PC's
quirks: `naip:year` is a string; lidar items have `datetime: null` with `start_datetime` /
`end_datetime`, `proj:epsg: null`, the CRS only in `proj:projjson`, a 3-D `bbox` and a 6-number
`proj:bbox`. Pixels and points are real data; only the packaging (COG/COPC, STAC JSON) is ours.
Nothing here is actual NAIP or USGS 3DEP data: the `naip`-shaped items are NEON AOP imagery and
an image rasterised from lidar point colours, and the `3dep-lidar-copc`-shaped items are NEON and
French airborne lidar.

Total size without this README: {total:,} bytes ({total_mib:.2f} MiB). Items: {n_naip} `naip`,
{n_copc} `3dep-lidar-copc`.

## Layout

```
collections/naip.json, collections/3dep-lidar-copc.json  # PC collection JSON, sample extent
items/naip.json, items/3dep-lidar-copc.json              # FeatureCollections of items
assets/naip/<item id>.tif                                 # COGs
assets/3dep-lidar-copc/<item id>.copc.laz                 # COPC 1.0 (LAS 1.4)
LICENSES/                                                 # source licenses
```

Asset hrefs are **relative to the items file** (`../assets/...`); the server rewrites them to
absolute `file://` URLs when it serves them. Items carry only a `via` link to their source file
on GitHub: the STAC API adds `self`/`root`/`parent`/`collection` links itself. PC's `thumbnail`,
`tilejson`, `rendered_preview` and `metadata` assets and the collections' `msft:*` fields are
omitted (they refer to Azure / PC services).

## Site `teak`: NEON Lower Teakettle, Sierra National Forest, Fresno County, California

{n_teak_img} NAIP-shaped image items (one per RGB plot) and {n_teak_pc} COPC items (one per lidar
plot) for NEON TEAK 40 m x 40 m field plots. {no_rgb} have lidar but no imagery: they give
realistic "no NAIP coverage" tiles.

- **Imagery**: NEON AOP 0.1 m RGB orthophoto clips, 3-band uint8, EPSG:32611, nodata 255 (kept
  as in the source). Native 0.1 m pixels are kept (`gsd` 0.1); `eo:bands` lists only Red, Green,
  Blue, which honestly models early 3-band NAIP (no NIR). Written as COG with PHOTOMETRIC=RGB;
  pixels are bit-identical to the source. `naip:state` is `ca`. Item ids
  `ca_teak_<plot>_010_<year>` (`010` = 10 cm, as NAIP ids carry `060` for 60 cm).
- **Lidar**: NEON discrete-return classified LAZ clips, LAS 1.3 point format 1, with **no CRS in
  the header**. The horizontal CRS is EPSG:32611 (that of the matching RGB); heights are NAVD88
  metres (NEON AOP convention), so the COPC WKT and `proj:projjson` use the compound CRS
  `{teak_crs}` ({teak_crs_name}). Converted PF1 -> PF6 (LAS 1.4; COPC allows only PF6/7/8) with
  every field preserved; the PF1 whole-degree `scan_angle_rank` is carried into PF6 `scan_angle`
  (0.006 degree units), which `laspy.convert` would zero. GPS time stays GPS *week* time
  (global-encoding bit 0 clear), as in the source. ASPRS classes 1, 2, 5, 7 only (unclassified,
  ground, high vegetation, noise). `TEAK_056` keeps its real, unflagged Z ~3191 m outlier
  (class 1). `3dep:usgs_id` is the stand-in project name `{teak_project}` (not a USGS project).
  Item ids `NEON_LPC_TEAK_<year>_<plot>`.
- **Year: not recorded in the data.** The RGB TIFFs have no date tags, and the LAZ GPS times are
  GPS week seconds (about 235,800-238,100 s: Tuesdays 17:30-18:10 UTC, week unknown). The only
  date in the files is the LAZ header creation date: year 2017, day-of-year 0 (unset), written
  by the `rlas` R package. If that year is genuine, the points were flown in 2017 or earlier,
  which rules out the 2018 flight, so the site is labelled **{teak_year}** (the imagery is
  assumed to come from the same flight). `datetime` is the nominal {teak_date}, and lidar
  `start_datetime`/`end_datetime` span the whole year, like PC's 3DEP items. Change `TEAK_YEAR`
  in the script if better metadata turns up.

{table_head}
{teak_rows}

## Site `lambert93`: airborne lidar with RGB + NIR per point, France (EPSG:2154)

One LAS 1.4 point-format-8 file: {l93_points:,} points, RGF93 / Lambert-93, written by
TerraScan, flown {l93_flight} according to its adjusted-standard GPS times. It is likely IGN
LiDAR HD (class 65 is "artefacts" in IGN's LiDAR HD scheme), but the file does not say. It lies
outside California on purpose: it supplies the `others` (ASPRS 3, low vegetation) and `building`
(6) classes that TEAK lacks, real NIR, a non-UTM CRS and a multi-node octree. `naip:state` is
`fr` (there is no US state).

- **Colours checked first**: red, green, blue and NIR are populated (non-zero on > 99% of the
  points, hundreds of distinct values). They are 8-bit values stored x256 (low byte 0; 24 points
  have the value 255, which maps to 0), so 8-bit = value >> 8.
- **Image** (`naip`-shaped; 4 bands R,G,B,NIR uint8; 0.5 m; EPSG:2154; grid snapped to 0.5 m;
  {l93_size} px): each pixel takes the colour of its top-most (highest Z) point, ignoring classes
  {l93_excluded} (noise, high noise, artefacts); {l93_used:,} points are used. The points cover a
  curved diagonal swath, about two thirds of their bbox. Inside the points' convex hull,
  {l93_holes:,} pixels ({l93_hole_pct:.1f}%) had no point; they are filled with the rounded mean of
  their valid 3x3 neighbours, repeated until none is left ({l93_passes} passes, numpy only).
  Outside the hull, {l93_nodata:,} pixels are nodata = 0, and real zeros inside are raised to 1.
  PHOTOMETRIC=RGB with band 4 **not** alpha (colorinterp R,G,B,undefined; see
  `shared/reference/measurements.md` section 3). The colours were draped onto the points from an
  orthophoto of unknown date; `datetime` is the lidar flight day.
- **COPC**: the same points, LAS 1.4 PF8 (RGB + NIR kept). The two extra-byte dimensions
  ({l93_extra}) are dropped (3DEP COPC has none). CRS: **horizontal only, EPSG:2154**, exactly
  what the file declares. LiDAR HD heights are NGF-IGN69 (EPSG:5720), which fits Z
  {l93_z0}..{l93_z1} m, but the file does not say so and its IGN origin is not certain, so no
  vertical CRS is asserted: this item's `proj:projjson` is a ProjectedCRS, not a CompoundCRS
  (clients must accept both). Octree: {l93_levels} levels, {l93_nodes} nodes of
  {l93_min_node:,}..{l93_max_node:,} points. The geometry is the points' convex hull, simplified
  and grown by 0.5 m so that it still covers every point. `3dep:usgs_id` is the stand-in
  `{l93_project}`.

{table_head}
{l93_rows}

## How it was made

```
.venv/bin/python data_catalog/tools/make_sample.py [path/to/shared/data]
```

The script is deterministic: a rerun gives byte-identical files (checksums below).

- COGs: GDAL `COG` driver via rasterio ({cog_options}), written from a tiled GTiff with
  PHOTOMETRIC=RGB (and ALPHA=UNSPECIFIED for 4 bands); each one is checked with
  `rio_cogeo.cogeo.cog_validate(strict=True)`, for colour interpretation, and for a pixel
  round-trip.
- COPC: `geoseg.builder.copc.write_copc` (copclib, no PDAL), following the recipe in
  `shared/reference/measurements.md` section 2: cube root node with `center`/`halfsize` set,
  level of detail by grid thinning (128 root cells, seeded RNG), raw records passed as
  signed-char buffers. The leaf level is the shallowest at which no node holds more than 100,000
  points, so plot-sized clouds are a single root node. The header creation date (copied from the
  source), GUID and software fields are fixed. copclib writes the WKT CRS as an EVLR, which
  `laspy.CopcReader` does not read, so it is moved into a regular VLR, as PDAL-written COPC
  files have it, and the shifted offsets are patched (header, LAZ chunk-table pointer, COPC
  info, hierarchy entries).
- The script checks every COPC with `laspy.CopcReader` (header count; every point record
  byte-identical to the converted source; CRS present and equal to the intended one; a bounded
  query over the 30%..70% XY box equal to a brute-force count) and with a plain `laspy.read`.
- Collections: PC's `naip` and `3dep-lidar-copc` collection JSON (recorded in {pystac_client}
  test cassettes @ {pystac_client_commit}; copied from `shared/data/stac_examples/`), with the
  sample's extent (overall bbox, then one per site), the sample's `summaries.gsd`, a note
  prepended to the description, PC-service links, assets and `msft:*` fields removed, and
  `license`/`providers` replaced by the sample's own (`various`; NEON, source repos, geoseg).

## Licenses

- NEON TEAK imagery and lidar: NEON data are CC0 1.0 (NEON data policy). The files come from
  {deepforest} (MIT, (c) 2019 Ben Weinstein) -> `LICENSES/DeepForest-MIT.txt`. Attribution: NEON
  data courtesy of the National Ecological Observatory Network (Battelle, NSF).
- Lambert-93 lidar: {pdal} test data (BSD-3-Clause, (c) Hobu, Inc.) -> `LICENSES/PDAL-BSD.txt`.
  If it is IGN LiDAR HD, IGN publishes that under the Etalab Open Licence 2.0 (not verified for
  this file).
- Collection metadata text: Planetary Computer collection JSON as recorded in {pystac_client}
  (Apache-2.0) -> `LICENSES/pystac-client-Apache-2.0.txt`.
- Copied license files: {license_list}.

## Checksums (sha256)

```
{checksums}
```
"""


TABLE_HEAD = """\
| item id | file | bytes | content | source (shared/data path = repo path @ commit) |
|---|---|---|---|---|"""


def write_readme(out: Path, entries: list[Entry], licenses: list[tuple[str, str]]) -> None:
    """README with provenance and facts taken from the generated files themselves."""

    def row_img(e: Entry) -> str:
        p = e.item["properties"]
        return (
            f"| `{e.item['id']}` | `{e.path.relative_to(out).as_posix()}` | "
            f"{e.path.stat().st_size:,} | {e.facts['size_px']} px, gsd {p['gsd']} m, "
            f"EPSG:{p['proj:epsg']}, {len(e.item['assets']['image']['eo:bands'])} bands, "
            f"nodata {e.facts['nodata_px']:,} px, year {p['naip:year']} | {e.source} |"
        )

    def row_pc(e: Entry) -> str:
        f = e.facts
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(f["classes"].items()))
        return (
            f"| `{e.item['id']}` | `{e.path.relative_to(out).as_posix()}` | "
            f"{e.path.stat().st_size:,} | {f['points']:,} pts; classes {{{classes}}}; "
            f"Z {f['z'][0]}..{f['z'][1]}; {f['nodes']} node(s) | {e.source} |"
        )

    teak_img = [e for e in entries if e.site == "teak" and e.collection == "naip"]
    teak_pc = [e for e in entries if e.site == "teak" and e.collection != "naip"]
    l93 = {e.collection: e for e in entries if e.site == "lambert93"}
    img, pc = l93["naip"], l93["3dep-lidar-copc"]
    no_rgb = [f"`{e.item['id']}`" for e in teak_pc if not e.facts["rgb_plot"]]
    checksums = [
        f"{sha256(p)}  {p.relative_to(out).as_posix()}"
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "README.md"
    ]
    # README size is not in the total: it would depend on itself.
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "README.md")
    teak_crs = CRS.from_user_input(TEAK_COMPOUND)
    text = README_TEMPLATE.format(
        total=total,
        total_mib=total / 2**20,
        n_naip=sum(e.collection == "naip" for e in entries),
        n_copc=sum(e.collection != "naip" for e in entries),
        n_teak_img=len(teak_img),
        n_teak_pc=len(teak_pc),
        no_rgb=" and ".join(no_rgb),
        teak_crs=TEAK_COMPOUND,
        teak_crs_name=teak_crs.name,
        teak_project=TEAK_PROJECT,
        teak_year=TEAK_YEAR,
        teak_date=TEAK_NOMINAL_DATE,
        table_head=TABLE_HEAD,
        teak_rows="\n".join([*map(row_img, teak_img), *map(row_pc, teak_pc)]),
        l93_points=pc.facts["points"],
        l93_flight=pc.facts["flight_utc"],
        l93_size=img.facts["size_px"],
        l93_excluded=", ".join(map(str, L93_EXCLUDED_CLASSES)),
        l93_used=img.facts["points_used"],
        l93_holes=img.facts["holes_filled"],
        l93_hole_pct=100 * img.facts["hole_fraction"],
        l93_passes=img.facts["fill_passes"],
        l93_nodata=img.facts["nodata_px"],
        l93_extra=", ".join(pc.facts["dropped_extra_dims"]),
        l93_z0=pc.facts["z"][0],
        l93_z1=pc.facts["z"][1],
        l93_levels=pc.facts["levels"],
        l93_nodes=pc.facts["nodes"],
        l93_min_node=pc.facts["min_node_points"],
        l93_max_node=pc.facts["max_node_points"],
        l93_project=pc.item["properties"]["3dep:usgs_id"],
        l93_rows="\n".join([row_img(img), row_pc(pc)]),
        cog_options=", ".join(f"{k}={v}" for k, v in COG_OPTIONS.items()),
        pystac_client=PYSTAC_CLIENT,
        pystac_client_commit=PYSTAC_CLIENT_COMMIT,
        deepforest=DEEPFOREST,
        pdal=PDAL,
        license_list=", ".join(f"`shared/data/{s}` -> `LICENSES/{d}`" for s, d in licenses),
        checksums="\n".join(checksums),
    )
    (out / "README.md").write_text(text, encoding="utf-8")


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shared", nargs="?", type=Path, default=DEFAULT_SHARED, help="shared/data dir")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output dir (is replaced)")
    args = ap.parse_args(argv)
    shared: Path = args.shared.resolve()
    out: Path = args.out.resolve()
    if not (shared / "neon_teak").is_dir() or not (shared / "stac_examples").is_dir():
        ap.error(f"{shared} does not look like shared/data (no neon_teak/ or stac_examples/)")

    if out.exists():
        shutil.rmtree(out)
    for sub in ("assets/naip", "assets/3dep-lidar-copc", "items", "collections"):
        (out / sub).mkdir(parents=True)

    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        entries = build_teak(shared, out, tmp) + build_lambert93(shared, out, tmp)

    notes = {
        "naip": "**geoseg offline sample** shaped like Planetary Computer's `naip` collection: "
        "real NEON AOP RGB (California) and lidar-colour RGB+NIR (France) imagery, not NAIP.",
        "3dep-lidar-copc": "**geoseg offline sample** shaped like Planetary Computer's "
        "`3dep-lidar-copc` collection: real NEON (California) and French airborne lidar as COPC, "
        "not USGS 3DEP.",
    }
    for coll in ("naip", "3dep-lidar-copc"):
        mine = sorted((e for e in entries if e.collection == coll), key=lambda e: e.item["id"])
        fc = {"type": "FeatureCollection", "features": [e.item for e in mine]}
        (out / "items" / f"{coll}.json").write_text(dumps(fc), encoding="utf-8")
        pc_doc = json.loads((shared / "stac_examples" / "collections" / f"{coll}.json").read_text())
        doc = collection(pc_doc, mine, notes[coll])
        (out / "collections" / f"{coll}.json").write_text(dumps(doc), encoding="utf-8")

    licenses = write_licenses(shared, out)
    write_readme(out, entries, licenses)

    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {len(entries)} items to {out} ({total / 2**20:.2f} MiB)")
    for e in entries:
        print(f"  {e.collection:16s} {e.item['id']:40s} {e.path.stat().st_size:>10,} B  {e.facts}")
    assert total < 15 * 2**20, "sample catalog exceeds 15 MiB"
    print(
        f"pyproj {pyproj.__version__}, rasterio {rasterio.__version__}, laspy {laspy.__version__}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
