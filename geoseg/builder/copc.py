"""Write a point cloud as COPC (Cloud-Optimized Point Cloud) with copclib, without PDAL.

3DEP serves COPC, and the builder reads it with `laspy.CopcReader`; test fixtures, the embedded
sample and reprojected copies of it need COPC files that behave like PDAL-written ones. The recipe
(shared/reference/measurements.md section 2): a cube root node with `center`/`halfsize` set (or
every spatial query returns nothing), levels of detail by grid thinning, raw point records handed
to copclib as signed-char buffers. Two things copclib does not do are added here: converting LAS
point formats 0-3 (COPC allows only 6, 7, 8) and moving the WKT CRS from the EVLR where copclib
puts it into a VLR, where laspy and other VLR-only readers look for it.

Output is deterministic (seeded thinning, no timestamps) and written atomically.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import copclib
import laspy
import numpy as np
from pyproj import CRS

from geoseg.builder.writers import atomic_path

ROOT_CELLS = 128
"""Thinning grid of the root node per axis: level d keeps one point per cube/(128 * 2^d) cell."""
MAX_DEPTH = 10
"""Deepest leaf level tried; only reached by pathological clouds (many duplicate points)."""
DEFAULT_MAX_POINTS_PER_NODE = 100_000
"""Leaf-node bound. Nodes well under ~10k points cost compression and decode speed
(measurements.md section 2); 100k is also untwine's (PDAL's COPC writer) default."""

COPC_FORMAT = {0: 6, 1: 6, 2: 7, 3: 7, 6: 6, 7: 7, 8: 8}
"""LAS point format -> the COPC one (6, 7 or 8) that holds all its standard fields."""
SCAN_ANGLE_UNIT = 0.006
"""Degrees per PF6+ `scan_angle` step (PF0-5 store whole degrees in `scan_angle_rank`)."""
_WKT_BIT = 0b10000
_GPS_STANDARD_BIT = 0b1


@dataclass(frozen=True)
class CopcLayout:
    """Shape of the written octree (for reports, and to check node sizes)."""

    levels: int
    nodes: int
    min_node_points: int
    max_node_points: int


def to_copc_format(las: laspy.LasData) -> laspy.LasData:
    """`las` in the COPC point format (6, 7 or 8) that keeps all its standard fields.

    `laspy.convert` zeroes the scan angle when going from PF0-3 (whole-degree `scan_angle_rank`)
    to PF6+ (`scan_angle` in 0.006 degree steps), so it is carried over here. PF6/7/8 input is
    returned as is. Waveform formats (4, 5, 9, 10) and extra-byte dimensions have no place in
    3DEP-style COPC and raise ValueError instead of being dropped silently.
    """
    pf = las.header.point_format.id
    if pf not in COPC_FORMAT:
        raise ValueError(f"point format {pf} cannot be written as COPC (waveform formats)")
    extra = list(las.header.point_format.extra_dimension_names)
    if extra:
        raise ValueError(f"extra-byte dimensions are not written to COPC: {extra}")
    if pf == COPC_FORMAT[pf]:
        return las
    out = laspy.convert(las, point_format_id=COPC_FORMAT[pf], file_version="1.4")
    degrees = np.asarray(las.scan_angle_rank, np.float64)
    out.scan_angle = np.round(degrees / SCAN_ANGLE_UNIT).astype(np.int16)
    out.update_header()
    return out


def write_copc(
    las: laspy.LasData,
    path: Path,
    crs: CRS | None = None,
    *,
    max_points_per_node: int = DEFAULT_MAX_POINTS_PER_NODE,
    seed: int = 0,
    creation: tuple[int, int] | None = None,
    software: str = "geoseg",
) -> CopcLayout:
    """Write `las` to `path` as a COPC 1.0 file (LAS 1.4) that `laspy.CopcReader` reads fully.

    crs: written as a WKT1 VLR (as PDAL does); default: the CRS in `las`'s header. With neither,
        the file has no CRS (3DEP has such files; the builder must reject them clearly).
    max_points_per_node: no node holds more points (unless MAX_DEPTH is reached); the leaf
        level is the shallowest at which the points not taken by upper levels fit.
    seed: seeds which points represent the upper levels; same input + seed = same bytes.
    creation: header (year, day-of-year); default: `las`'s own creation date, never today's.
        Pass it explicitly to keep a raw day 0 ("unset"), which laspy reads as Dec 31.
    software: the header's generating-software field.
    """
    if max_points_per_node < 1:
        raise ValueError("max_points_per_node must be >= 1")
    src = las.header
    las = to_copc_format(las)
    hdr = las.header
    if crs is None:
        crs = src.parse_crs()
    if len(las.points) == 0:
        raise ValueError("no points to write")
    if creation is None:
        day = src.creation_date
        creation = (day.year, day.timetuple().tm_yday) if day is not None else (0, 0)

    rec = las.points.array
    xyz = np.column_stack([las.x, las.y, las.z]).astype(np.float64)
    mins, maxs = xyz.min(0), xyz.max(0)
    halfsize = float((maxs - mins).max() / 2) + 1e-6  # the root node is a cube
    center = mins + halfsize
    cube_min = center - halfsize
    depth_of, leaf = _levels(xyz, cube_min, halfsize, max_points_per_node, seed)

    cfg = copclib.CopcConfigWriter(
        hdr.point_format.id,
        scale=copclib.Vector3(*map(float, hdr.scales)),
        offset=copclib.Vector3(*map(float, hdr.offsets)),
        wkt=_las_wkt(crs) if crs is not None else "",
    )
    info = cfg.copc_info
    info.center_x, info.center_y, info.center_z = map(float, center)  # queries need these
    info.halfsize = halfsize
    info.spacing = 2 * halfsize / ROOT_CELLS
    lh = cfg.las_header
    lh.min = copclib.Vector3(*map(float, mins))
    lh.max = copclib.Vector3(*map(float, maxs))
    lh.creation_year, lh.creation_day = creation
    lh.guid = ""  # nil GUID: a random one would change the bytes on every run
    lh.file_source_id = int(hdr.file_source_id)
    lh.generating_software = software
    lh.system_identifier = hdr.system_identifier or ""
    # Keep the GPS-time meaning of the source (bit 0: adjusted standard vs week time); bit 4 = WKT
    # CRS, mandatory for point formats 6+.
    lh.global_encoding = (int(hdr.global_encoding.value) & _GPS_STANDARD_BIT) | _WKT_BIT
    returns = np.asarray(las.return_number)
    lh.points_by_return = [int((returns == r).sum()) for r in range(1, 16)]

    sizes: list[int] = []
    with atomic_path(Path(path)) as tmp:
        writer = copclib.FileWriter(str(tmp), cfg)
        for d in range(leaf + 1):
            sel = np.flatnonzero(depth_of == d)
            if len(sel) == 0:
                continue
            ijk = _node_ijk(xyz[sel], cube_min, halfsize, d)
            keys, inv = np.unique(ijk, axis=0, return_inverse=True)
            inv = inv.ravel()
            order = np.argsort(inv, kind="stable")
            bounds = np.searchsorted(inv[order], np.arange(len(keys) + 1))
            for k in range(len(keys)):
                idx = sel[order[bounds[k] : bounds[k + 1]]]
                raw = np.frombuffer(rec[idx].tobytes(), dtype=np.int8)  # copclib wants signed char
                writer.AddNode(copclib.VoxelKey(d, *map(int, keys[k])), copclib.VectorChar(raw))
                sizes.append(len(idx))
        writer.Close()
        if crs is not None:
            _move_wkt_to_vlr(tmp)
    return CopcLayout(leaf + 1, len(sizes), min(sizes), max(sizes))


def _las_wkt(crs: CRS) -> str:
    """WKT1 as LAS 1.4 and PDAL write it; WKT2 for the few CRSs WKT1 cannot express."""
    return crs.to_wkt("WKT1_GDAL") or crs.to_wkt()


def _node_ijk(xyz: np.ndarray, cube_min: np.ndarray, halfsize: float, depth: int) -> np.ndarray:
    """Integer (x, y, z) key of the depth-`depth` octree node holding each point."""
    n = 2**depth
    ijk = np.floor((xyz - cube_min) / (2 * halfsize / n)).astype(np.int64)
    return np.clip(ijk, 0, n - 1)


def _flat_key(ijk: np.ndarray, n: int) -> np.ndarray:
    """One int64 per (i, j, k) cell of an n^3 grid (n <= 2^21)."""
    return (ijk[:, 0] * n + ijk[:, 1]) * n + ijk[:, 2]


def _levels(
    xyz: np.ndarray, cube_min: np.ndarray, halfsize: float, max_points: int, seed: int
) -> tuple[np.ndarray, int]:
    """Octree level of every point, and the leaf level.

    Level of detail by grid thinning: level d keeps one random point per cell of edge
    cube/(ROOT_CELLS * 2^d), at most `max_points` per node (a tall canopy fills many cells of a
    column); the points left over go to the first level at which no node would hold more than
    `max_points`. Every non-empty node thus has a non-empty parent.
    """
    rng = np.random.default_rng(seed)
    remaining = rng.permutation(len(xyz))  # random order: "first in a cell" is a random pick
    depth_of = np.empty(len(xyz), np.int8)
    for d in range(MAX_DEPTH + 1):
        nodes = _flat_key(_node_ijk(xyz[remaining], cube_min, halfsize, d), 2**d)
        if d == MAX_DEPTH or np.unique(nodes, return_counts=True)[1].max() <= max_points:
            depth_of[remaining] = d
            return depth_of, d
        n = ROOT_CELLS * 2**d
        cells = np.floor((xyz[remaining] - cube_min) / (2 * halfsize / n)).astype(np.int64)
        _, first = np.unique(_flat_key(cells, n), return_index=True)
        first = np.sort(first)  # back to random order, so the cap below keeps a random subset
        order = np.argsort(nodes[first], kind="stable")
        grouped = nodes[first][order]
        rank = np.arange(len(order)) - np.searchsorted(grouped, grouped)
        first = first[order[rank < max_points]]
        depth_of[remaining[first]] = d
        keep = np.ones(len(remaining), bool)
        keep[first] = False
        remaining = remaining[keep]
    raise AssertionError("unreachable")


def _move_wkt_to_vlr(path: Path) -> None:
    """Move the WKT CRS record that copclib writes as the last EVLR into the VLR section.

    laspy's CopcReader (and other readers that only look at VLRs) would otherwise see no CRS;
    PDAL-written COPC, such as Planetary Computer's 3DEP files, carry the WKT as a regular VLR.
    Inserting S bytes before the point data shifts every absolute offset after it: the header's
    point-data and EVLR offsets, the LAZ chunk-table pointer, the COPC info VLR's root hierarchy
    offset and each hierarchy entry's offset. All are patched here.
    """
    b = bytearray(path.read_bytes())
    (header_size,) = struct.unpack_from("<H", b, 94)
    point_offset, n_vlrs = struct.unpack_from("<II", b, 96)
    evlr_start, n_evlrs = struct.unpack_from("<QI", b, 235)
    evlrs = []
    pos = evlr_start
    for _ in range(n_evlrs):
        user = bytes(b[pos + 2 : pos + 18]).rstrip(b"\0")
        (record_id,) = struct.unpack_from("<H", b, pos + 18)
        (length,) = struct.unpack_from("<Q", b, pos + 20)
        evlrs.append((pos, user, record_id, length))
        pos += 60 + length
    if pos != len(b) or not evlrs:
        raise ValueError(f"{path}: unexpected EVLR layout from copclib")
    wkt_pos, user, record_id, wkt_len = evlrs[-1]
    if (user, record_id) != (b"LASF_Projection", 2112) or wkt_len >= 2**16:
        raise ValueError(f"{path}: the last EVLR is not a WKT record that fits a VLR: {evlrs}")
    if bytes(b[header_size + 2 : header_size + 18]).rstrip(b"\0") != b"copc":
        raise ValueError(f"{path}: the first VLR is not the COPC info record")
    vlr = struct.pack(
        "<H16sHH32s", 0, b"LASF_Projection", 2112, wkt_len, b"OGC Coordinate System WKT"
    ) + bytes(b[wkt_pos + 60 : wkt_pos + 60 + wkt_len])
    shift = len(vlr)

    info = header_size + 54  # payload of the first VLR: COPC info
    root_offset, root_size = struct.unpack_from("<QQ", b, info + 40)
    pages = [(root_offset, root_size)]
    while pages:
        page_offset, page_size = pages.pop()
        for entry in range(page_offset, page_offset + page_size, 32):
            offset, byte_size, count = struct.unpack_from("<Qii", b, entry + 16)
            if count == -1:
                pages.append((offset, byte_size))
            if count == -1 or byte_size > 0:
                struct.pack_into("<Q", b, entry + 16, offset + shift)
    struct.pack_into("<Q", b, info + 40, root_offset + shift)
    (chunk_table,) = struct.unpack_from("<q", b, point_offset)
    struct.pack_into("<q", b, point_offset, chunk_table + shift)
    struct.pack_into("<II", b, 96, point_offset + shift, n_vlrs + 1)
    struct.pack_into("<QI", b, 235, evlr_start + shift, n_evlrs - 1)
    path.write_bytes(bytes(b[:point_offset]) + vlr + bytes(b[point_offset:wkt_pos]))
