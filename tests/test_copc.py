"""`geoseg.builder.copc.write_copc`: COPC files that laspy.CopcReader reads and queries exactly."""

from __future__ import annotations

from pathlib import Path

import laspy
import numpy as np
import pytest
from pyproj import CRS

from geoseg.builder.copc import to_copc_format, write_copc

UTM11_NAVD88 = CRS.from_user_input("EPSG:32611+5703")
CA4_FTUS = CRS.from_user_input("EPSG:2228+6360")  # NAD83 / California zone 4 (ftUS) + NAVD88 ftUS


def synthetic_cloud(point_format: int, n: int, seed: int = 0) -> laspy.LasData:
    """An airborne-like cloud (400 m x 400 m, terrain + canopy) with every field random."""
    rng = np.random.default_rng(seed)
    header = laspy.LasHeader(
        point_format=point_format, version="1.4" if point_format >= 4 else "1.2"
    )
    header.scales = np.array([0.01, 0.01, 0.01])
    header.offsets = np.array([321000.0, 4098000.0, 0.0])
    las = laspy.LasData(header)
    x = rng.uniform(321000, 321400, n)
    y = rng.uniform(4098000, 4098400, n)
    las.x, las.y = x, y
    las.z = 2100 + 0.1 * (x - 321000) + rng.exponential(5, n)
    for dim in las.point_format.dimensions:
        if dim.name in ("X", "Y", "Z"):
            continue
        if dim.name == "scan_angle_rank":
            values = rng.integers(-90, 91, n)
        elif dim.name == "scan_angle":
            values = rng.integers(-15000, 15001, n)
        elif dim.kind == laspy.DimensionKind.FloatingPoint:
            values = rng.uniform(2e8, 3e8, n)
        else:
            values = rng.integers(0, 2 ** min(dim.num_bits, 32), n)
        las[dim.name] = values
    las.update_header()
    return las


def records(points: laspy.PackedPointRecord) -> np.ndarray:
    """Point records as sorted byte strings: a multiset to compare read-back with source."""
    size = points.point_format.size
    return np.sort(np.frombuffer(points.array.tobytes(), dtype=f"S{size}"))


@pytest.mark.parametrize("point_format", [0, 1, 2, 3, 6, 7, 8])
def test_round_trip_keeps_every_point_field_and_the_crs(tmp_path: Path, point_format: int):
    las = synthetic_cloud(point_format, 20_000)
    path = tmp_path / "c.copc.laz"
    write_copc(las, path, UTM11_NAVD88, max_points_per_node=3_000)
    expected = to_copc_format(las)
    assert expected.point_format.id == {0: 6, 1: 6, 2: 7, 3: 7}.get(point_format, point_format)
    with laspy.CopcReader.open(path) as reader:
        assert reader.header.point_count == len(las)
        assert reader.header.parse_crs().equals(UTM11_NAVD88)
        np.testing.assert_allclose(reader.header.mins, las.header.mins)
        np.testing.assert_allclose(reader.header.maxs, las.header.maxs)
        back = reader.query()
    assert np.array_equal(records(back), records(expected.points))
    # ... and the conversion to PF6/7/8 itself lost nothing:
    for name in las.point_format.dimension_names:
        if name == "scan_angle_rank":
            degrees = np.asarray(expected.scan_angle) * 0.006
            np.testing.assert_allclose(degrees, np.asarray(las.scan_angle_rank), atol=0.003)
        else:
            assert np.array_equal(np.asarray(expected[name]), np.asarray(las[name])), name
    plain = laspy.read(path)  # the patched offsets (chunk table, EVLRs) hold for LAZ readers too
    assert len(plain) == len(las) and plain.header.parse_crs().equals(UTM11_NAVD88)


def test_bounded_queries_equal_brute_force(tmp_path: Path):
    las = synthetic_cloud(6, 200_000, seed=1)
    path = tmp_path / "c.copc.laz"
    layout = write_copc(las, path, UTM11_NAVD88, max_points_per_node=10_000)
    assert layout.levels >= 3 and layout.nodes > 20
    rng = np.random.default_rng(2)
    xi, yi = np.asarray(las.X, np.int64), np.asarray(las.Y, np.int64)
    scales, offsets = las.header.scales[:2], las.header.offsets[:2]
    with laspy.CopcReader.open(path) as reader:
        for _ in range(8):
            # Random (non-dyadic) edges: laspy prunes nodes with float bounds but filters points
            # on rounded integer coordinates, so a box edge exactly on a node boundary can lose
            # the points on that boundary. That is laspy's behaviour, not the file's.
            lo = rng.uniform(las.header.mins[:2], las.header.maxs[:2] - 20)
            hi = lo + rng.uniform(5, 150, 2)
            got = reader.query(bounds=laspy.copc.Bounds(mins=lo, maxs=hi))
            ilo = np.round((lo - offsets) / scales).astype(np.int64)
            ihi = np.round((hi - offsets) / scales).astype(np.int64)
            sel = (xi >= ilo[0]) & (xi <= ihi[0]) & (yi >= ilo[1]) & (yi <= ihi[1])
            assert sel.any()
            assert np.array_equal(records(got), records(las.points[sel]))
        levels = [len(reader.query(level=d)) for d in range(layout.levels)]
    assert sum(levels) == len(las) and all(levels)


def test_leaf_nodes_respect_max_points_per_node(tmp_path: Path):
    las = synthetic_cloud(6, 50_000)
    single = write_copc(las, tmp_path / "one.copc.laz", max_points_per_node=50_000)
    assert (single.levels, single.nodes, single.max_node_points) == (1, 1, 50_000)
    split = write_copc(las, tmp_path / "many.copc.laz", max_points_per_node=4_000)
    assert split.levels > 1 and split.nodes > 8
    with laspy.CopcReader.open(tmp_path / "many.copc.laz") as reader:
        leaf = reader.query(level=split.levels - 1)
    assert len(leaf) < len(las)


def test_compound_crs_in_us_survey_feet_survives(tmp_path: Path):
    las = synthetic_cloud(6, 5_000)
    path = tmp_path / "ft.copc.laz"
    write_copc(las, path, CA4_FTUS)
    with laspy.CopcReader.open(path) as reader:
        crs = reader.header.parse_crs()
    assert crs.is_compound and crs.equals(CA4_FTUS)
    horizontal, vertical = crs.sub_crs_list
    assert horizontal.to_epsg() == 2228 and vertical.to_epsg() == 6360
    assert vertical.axis_info[0].unit_name == "US survey foot"


def test_crs_defaults_to_the_header_and_can_be_absent(tmp_path: Path):
    las = synthetic_cloud(6, 5_000)
    write_copc(las, tmp_path / "none.copc.laz")
    with laspy.CopcReader.open(tmp_path / "none.copc.laz") as reader:
        assert reader.header.parse_crs() is None
        assert len(reader.query()) == len(las)
    las.header.add_crs(UTM11_NAVD88)
    write_copc(las, tmp_path / "header.copc.laz")
    with laspy.CopcReader.open(tmp_path / "header.copc.laz") as reader:
        assert reader.header.parse_crs().equals(UTM11_NAVD88)


def test_output_is_deterministic_and_atomic(tmp_path: Path):
    las = synthetic_cloud(1, 30_000)
    a, b = tmp_path / "a" / "x.copc.laz", tmp_path / "b" / "x.copc.laz"
    write_copc(las, a, UTM11_NAVD88, max_points_per_node=5_000, creation=(2017, 0))
    write_copc(las, b, UTM11_NAVD88, max_points_per_node=5_000, creation=(2017, 0))
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in a.parent.iterdir()) == ["x.copc.laz"]  # no temporaries left
    with pytest.raises(ValueError, match="no points"):
        write_copc(laspy.LasData(laspy.LasHeader(point_format=6, version="1.4")), a)
    assert a.read_bytes() == b.read_bytes()  # a failed write leaves the old file alone


@pytest.mark.parametrize("point_format", [4, 5])
def test_waveform_formats_are_refused(tmp_path: Path, point_format: int):
    with pytest.raises(ValueError, match="waveform"):
        write_copc(synthetic_cloud(point_format, 100), tmp_path / "w.copc.laz")


def test_extra_dimensions_are_refused(tmp_path: Path):
    las = synthetic_cloud(6, 100)
    las.add_extra_dim(laspy.ExtraBytesParams("deviation", "f4"))
    with pytest.raises(ValueError, match="extra-byte"):
        write_copc(las, tmp_path / "e.copc.laz")
