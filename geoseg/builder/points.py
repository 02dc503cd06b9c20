"""Stream the LiDAR points of one tile out of 3DEP COPC files, into the tile CRS and metres.

Only the octree nodes overlapping the tile are decoded (COPC spatial query), so memory per task is
bounded by the tile, never by the project. 3DEP projects use compound CRSs (a state plane or UTM
horizontal CRS + NAVD88 height), some in US survey feet: x/y are reprojected with PROJ, z is scaled
by the vertical axis' unit to metres (the vertical datum itself is kept, e.g. NAVD88 metres).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import laspy
import numpy as np
from pyproj import CRS
from rasterio.warp import transform_bounds

from geoseg.builder.errors import TileError, short_reason
from geoseg.builder.grid import Area, horizontal_crs, same_horizontal_crs, transformer
from geoseg.stac.items import PointCloudItem
from geoseg.stac.remote import RangeFile, is_remote
from geoseg.stac.retry import DEFAULT_POLICY, RetryPolicy
from geoseg.stac.signing import Signer, local_path

FIELDS = ("x", "y", "z", "intensity", "return_number", "number_of_returns", "classification")
_DTYPES = {
    "x": np.float64,
    "y": np.float64,
    "z": np.float64,
    "intensity": np.uint16,
    "return_number": np.uint8,
    "number_of_returns": np.uint8,
    "classification": np.uint8,
}


@dataclass
class TilePoints:
    """Column arrays of the points inside a tile (tile CRS, metres)."""

    arrays: dict[str, np.ndarray]
    items: list[str] = field(default_factory=list)
    project: str | None = None
    source_crs: str | None = None

    def __len__(self) -> int:
        return len(self.arrays["x"])

    @classmethod
    def empty(cls) -> TilePoints:
        return cls({k: np.zeros(0, t) for k, t in _DTYPES.items()})


def pick_project(items: list[PointCloudItem]) -> list[PointCloudItem]:
    """The items of the most recent acquisition project covering the tile.

    3DEP projects overlap; merging two flights of different years ghosts buildings and trees, so a
    tile always takes all its points from one project.
    """
    if not items:
        return []

    def recency(i: PointCloudItem) -> tuple:
        end = i.end or i.start
        return (end.timestamp() if end else float("-inf"), i.project)

    best = max(items, key=recency).project
    return sorted((i for i in items if i.project == best), key=lambda i: i.id)


def vertical_to_metres(crs: CRS) -> float:
    """Factor that turns the file's z values into metres.

    Compound CRS: the vertical component's unit. Otherwise LAS practice is z in the horizontal
    unit (state plane feet projects store feet heights), so that unit is used.
    """
    if crs.is_compound:
        for sub in crs.sub_crs_list[1:]:
            if sub.is_vertical:
                return float(sub.axis_info[0].unit_conversion_factor)
    for axis in crs.axis_info:
        if axis.direction in ("up", "down"):
            return float(axis.unit_conversion_factor)
    return float(crs.axis_info[0].unit_conversion_factor) if crs.axis_info else 1.0


def _file_crs(header: laspy.LasHeader) -> CRS | None:
    try:
        crs = header.parse_crs()
    except Exception:  # laspy raises assorted errors on malformed GeoTIFF/WKT VLRs
        return None
    return CRS.from_user_input(crs) if crs is not None else None


def resolve_crs(item: PointCloudItem, header: laspy.LasHeader) -> CRS:
    """The points' CRS: the STAC item's, else the file's; a horizontal disagreement is an error.

    3DEP items and files both declare one, and either may be missing; when they disagree the
    data cannot be trusted to line up with the imagery, so the tile fails instead of guessing.
    """
    declared = CRS.from_wkt(item.crs_wkt) if item.crs_wkt else None
    in_file = _file_crs(header)
    if declared is None and in_file is None:
        raise TileError(f"points {item.id}: no CRS in the STAC item nor in the file")
    if declared is not None and in_file is not None and not same_horizontal_crs(declared, in_file):
        hd, hf = horizontal_crs(declared), horizontal_crs(in_file)
        raise TileError(
            f"points {item.id}: CRS mismatch (item says {hd.name!r}, file says {hf.name!r})"
        )
    return declared if declared is not None else in_file  # type: ignore[return-value]


def _query(
    item: PointCloudItem, tile: Area, signer: Signer, policy: RetryPolicy
) -> tuple[dict[str, np.ndarray], CRS]:
    """Points of one file overlapping the tile, still in the file's CRS and units.

    A remote COPC is read through `RangeFile` (byte ranges, retried per policy): only its
    header, hierarchy and the octree nodes the tile touches are fetched.
    """
    remote = is_remote(item.href)
    source: RangeFile | str = (
        RangeFile(item.href, signer, policy) if remote else local_path(item.href)
    )
    try:
        reader = laspy.CopcReader(source) if remote else laspy.CopcReader.open(source)
    except OSError:
        raise  # network trouble (AssetReadError) or an unreadable local file
    except Exception as exc:  # not COPC (plain LAZ/LAS) or corrupt: laspy raises many kinds
        if remote:
            raise TileError(
                f"points {item.id}: not a COPC file ({short_reason(exc)}); a remote LAS/LAZ "
                "would have to be downloaded whole"
            ) from exc
        return _scan_plain(source, item, tile, exc)  # type: ignore[arg-type]
    with reader:
        size = source.size if isinstance(source, RangeFile) else os.path.getsize(source)
        _check_hierarchy(reader, size, item)
        crs = resolve_crs(item, reader.header)
        x0, y0, x1, y1 = _source_bounds(tile, crs)
        pts = reader.query(bounds=laspy.copc.Bounds(np.array([x0, y0]), np.array([x1, y1])))
    return {k: np.asarray(pts[k], dtype=_DTYPES[k]) for k in FIELDS}, crs


def _check_hierarchy(reader: laspy.CopcReader, size: int | None, item: PointCloudItem) -> None:
    """Refuse truncated COPC files: laspy silently returns no points when nodes are missing."""
    entries = [e for e in reader.root_page.entries.values() if e.point_count > 0]
    if reader.header.point_count > 0 and not entries:
        raise TileError(f"points {item.id}: corrupt or truncated COPC (no octree nodes)")
    if size is not None and any(e.offset + e.byte_size > size for e in entries):
        raise TileError(f"points {item.id}: truncated COPC ({size} bytes)")


def _scan_plain(
    path: str, item: PointCloudItem, tile: Area, copc_error: Exception
) -> tuple[dict[str, np.ndarray], CRS]:
    """Chunked scan of a non-COPC LAS/LAZ: still bounded memory, just slower."""
    try:
        with laspy.open(path) as reader:
            crs = resolve_crs(item, reader.header)
            x0, y0, x1, y1 = _source_bounds(tile, crs)
            parts: list[dict[str, np.ndarray]] = []
            for chunk in reader.chunk_iterator(1_000_000):
                x, y = np.asarray(chunk.x), np.asarray(chunk.y)
                sel = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
                if sel.any():
                    parts.append({k: np.asarray(chunk[k], dtype=_DTYPES[k])[sel] for k in FIELDS})
    except TileError:
        raise
    except Exception as exc:
        raise TileError(
            f"points {item.id}: unreadable ({short_reason(exc) or short_reason(copc_error)})"
        ) from exc
    if not parts:
        return TilePoints.empty().arrays, crs
    return {k: np.concatenate([p[k] for p in parts]) for k in FIELDS}, crs


def _source_bounds(tile: Area, crs: CRS) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = transform_bounds(tile.crs, horizontal_crs(crs), *tile.bounds, densify_pts=21)
    pad = 1.0  # one source unit: guards the reprojected edge against rounding
    return x0 - pad, y0 - pad, x1 + pad, y1 + pad


def read_tile_points(
    tile: Area,
    items: list[PointCloudItem],
    signer: Signer,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> TilePoints:
    """All points of the chosen project inside the tile, in tile CRS with z in metres."""
    chosen = pick_project(items)
    parts: list[dict[str, np.ndarray]] = []
    used: list[str] = []
    source_crs: CRS | None = None
    for item in chosen:
        try:
            arrays, crs = _query(item, tile, signer, policy)
        except TileError:
            raise
        except Exception as exc:  # decoding errors from lazrs surface as many exception types
            raise TileError(f"points {item.id}: unreadable ({short_reason(exc)})") from exc
        source_crs = crs
        if not len(arrays["x"]):
            continue
        tr = transformer(horizontal_crs(crs), tile.crs)
        x, y = tr.transform(arrays["x"], arrays["y"])
        arrays["x"], arrays["y"] = np.asarray(x), np.asarray(y)
        arrays["z"] = arrays["z"] * vertical_to_metres(crs)
        xmin, ymin, xmax, ymax = tile.bounds
        inside = (arrays["x"] >= xmin) & (arrays["x"] < xmax)
        inside &= (arrays["y"] > ymin) & (arrays["y"] <= ymax)
        if inside.any():
            parts.append({k: v[inside] for k, v in arrays.items()})
            used.append(item.id)
    if not parts:
        out = TilePoints.empty()
    else:
        out = TilePoints({k: np.concatenate([p[k] for p in parts]) for k in FIELDS}, used)
    out.project = chosen[0].project if chosen else None
    out.source_crs = source_crs.to_wkt() if source_crs is not None else None
    return out
