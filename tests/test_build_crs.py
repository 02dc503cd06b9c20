"""Vertical units and CRSs end to end: a 3DEP-style catalog in US survey feet through the real CLI.

Many 3DEP projects are in a state plane CRS with heights in US survey feet. Two NEON TEAK plots of
the sample are reprojected to EPSG:2228+6360 (NAD83 / California zone 4 (ftUS) + NAVD88 height
(ftUS)) and written as COPC, with the compound CRS in the item's `proj:projjson` as PC serves it.
The build must give the same tiles as the metre-based sample: x/y back in the NAIP UTM grid,
z in metres. Broken CRS metadata (none at all; item and file disagree) must fail only the tiles
that use it, with the reason in report.json.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import laspy
import numpy as np
import pytest
import rasterio
from pyproj import CRS, Transformer

from geoseg.builder.copc import write_copc
from geoseg.builder.rasterize import FLOAT_NODATA
from geoseg.builder.tile import MANIFEST
from geoseg.stac.server import sample_catalog_dir, serve_catalog
from tests.utils import geoseg

pytestmark = pytest.mark.slow

SAMPLE = sample_catalog_dir()
COLLECTIONS = ("naip", "3dep-lidar-copc")
UTM11 = CRS.from_epsg(32611)
FEET = CRS.from_user_input("EPSG:2228+6360")
FT_US = FEET.sub_crs_list[1].axis_info[0].unit_conversion_factor  # metres per US survey foot
GSD, SIZE = 0.5, 64
GRID = ("--gsd", str(GSD), "--tile-size", str(SIZE), "--workers", "1", "--no-progress")
COMPARED = ("043", "044")
NO_CRS, MISMATCH = "046", "047"
EDGE_TOL_M = 0.004
"""A point closer than this to a pixel edge may land on either side after the feet round trip
(0.01 ft quantization = 1.5 mm)."""
SEED = 7


# --- fixture catalogs ----------------------------------------------------------------------------


def _sample_items(collection: str) -> dict[str, dict[str, Any]]:
    features = json.loads((SAMPLE / "items" / f"{collection}.json").read_text())["features"]
    return {f["id"]: f for f in features}


def _lidar_id(plot: str) -> str:
    return f"NEON_LPC_TEAK_2017_TEAK_{plot}"


def _sample_copc(plot: str) -> Path:
    item = _sample_items("3dep-lidar-copc")[_lidar_id(plot)]
    return (SAMPLE / "items" / item["assets"]["data"]["href"]).resolve()


def _copy_points(
    las: laspy.LasData, x: np.ndarray, y: np.ndarray, z: np.ndarray, scale: float
) -> laspy.LasData:
    """A new PF6 cloud with `las`'s attributes at new coordinates (no CRS in the header)."""
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.scales = np.array([scale] * 3)
    header.offsets = np.array([np.floor(x.min()), np.floor(y.min()), 0.0])
    header.creation_date = las.header.creation_date  # not today's: same bytes on every run
    out = laspy.LasData(header)
    for name in las.point_format.dimension_names:
        if name not in ("X", "Y", "Z"):
            out[name] = las[name]
    out.x, out.y, out.z = x, y, z
    out.update_header()
    return out


def _to_feet(item: dict[str, Any], src: Path, dst: Path) -> None:
    """Rewrite one plot's COPC in EPSG:2228+6360 and make its item describe it like PC would."""
    las = laspy.read(src)
    to_ft = Transformer.from_crs(UTM11, FEET.sub_crs_list[0], always_xy=True)
    x, y = to_ft.transform(np.asarray(las.x), np.asarray(las.y))
    back = Transformer.from_crs(FEET.sub_crs_list[0], UTM11, always_xy=True)
    bx, by = back.transform(x, y)
    assert max(np.abs(bx - las.x).max(), np.abs(by - las.y).max()) < 1e-6  # exact round trip
    feet = _copy_points(las, np.asarray(x), np.asarray(y), np.asarray(las.z) / FT_US, 0.01)
    write_copc(feet, dst, FEET, seed=SEED)
    props = item["properties"]
    props["proj:projjson"] = FEET.to_json_dict()
    (x0, y0, z0), (x1, y1, z1) = feet.header.mins, feet.header.maxs
    props["proj:bbox"] = [round(v, 2) for v in (x0, y0, z0, x1, y1, z1)]
    ring = props["proj:geometry"]["coordinates"][0]
    props["proj:geometry"]["coordinates"] = [
        [[round(c, 2) for c in to_ft.transform(px, py)] for px, py in ring]
    ]
    item["bbox"][2], item["bbox"][5] = round(z0, 2), round(z1, 2)


def _without_crs(item: dict[str, Any], src: Path, dst: Path) -> None:
    """Same points, but neither the file nor the item says which CRS they are in."""
    las = laspy.read(src)
    bare = _copy_points(las, np.asarray(las.x), np.asarray(las.y), np.asarray(las.z), 0.01)
    write_copc(bare, dst, None, seed=SEED)
    del item["properties"]["proj:projjson"]


LIDAR_VARIANTS = {
    "metre": lambda item, src, dst: shutil.copyfile(src, dst),
    "feet": _to_feet,
    "no-crs": _without_crs,
    # The file is in feet, the item still declares the sample's UTM 11N + NAVD88 (m).
    "crs-mismatch": lambda item, src, dst: _to_feet(copy.deepcopy(item), src, dst),
}


def make_catalog(root: Path, plots: dict[str, str]) -> Path:
    """A `serve_catalog` folder with the sample's imagery of `plots` and their LiDAR as asked.

    plots: TEAK plot number -> LiDAR variant (a key of LIDAR_VARIANTS). Layout and hrefs as in
    data_catalog/sample: asset hrefs relative to the items files.
    """
    (root / "collections").mkdir(parents=True)
    (root / "items").mkdir()
    for collection in COLLECTIONS:
        shutil.copyfile(SAMPLE / "collections" / f"{collection}.json",
                        root / "collections" / f"{collection}.json")  # fmt: skip
    naip, lidar = _sample_items("naip"), _sample_items("3dep-lidar-copc")
    features: dict[str, list[dict[str, Any]]] = {c: [] for c in COLLECTIONS}
    for plot, variant in sorted(plots.items()):
        image = copy.deepcopy(naip[f"ca_teak_{plot}_010_2017"])
        src = (SAMPLE / "items" / image["assets"]["image"]["href"]).resolve()
        dst = root / "assets" / "naip" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        features["naip"].append(image)
        points = copy.deepcopy(lidar[_lidar_id(plot)])
        src = _sample_copc(plot)
        dst = root / "assets" / "3dep-lidar-copc" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        LIDAR_VARIANTS[variant](points, src, dst)
        features["3dep-lidar-copc"].append(points)
    for collection, items in features.items():
        doc = {"type": "FeatureCollection", "features": items}
        (root / "items" / f"{collection}.json").write_text(json.dumps(doc, indent=1))
    return root


def build(tmp: Path, name: str, plots: dict[str, str]) -> tuple[Path, int, str]:
    """Serve a fixture catalog and build it with the real CLI: (out, exit code, stderr)."""
    catalog = make_catalog(tmp / f"catalog-{name}", plots)
    out = tmp / f"out-{name}"
    with serve_catalog(catalog) as url:
        res = geoseg("build-dataset", "--stac-url", url, *GRID, "--out", str(out), timeout=300)
    return out, res.returncode, res.stderr


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, str]]:
    tmp = tmp_path_factory.mktemp("crs")
    return {
        "metre": build(tmp, "metre", dict.fromkeys(COMPARED, "metre")),
        "feet": build(tmp, "feet", dict.fromkeys(COMPARED, "feet")),
        "broken": build(
            tmp, "broken", {COMPARED[0]: "feet", NO_CRS: "no-crs", MISMATCH: "crs-mismatch"}
        ),
    }


# --- helpers -------------------------------------------------------------------------------------


def _manifests(out: Path) -> dict[str, dict[str, Any]]:
    return {
        p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob(f"tiles/*/{MANIFEST}"))
    }


def _read(out: Path, tile_id: str, name: str) -> np.ndarray:
    with rasterio.open(out / "tiles" / tile_id / f"{name}.tif") as src:
        return src.read(1)


def _edge_pixels(plots: tuple[str, ...]) -> set[tuple[int, int]]:
    """Global (row, col) pixels that a point lying on a pixel edge may fall in, either side.

    The sample's coordinates sit on a 1 cm lattice, so about 1 point in 50 per axis lies exactly
    on a 0.5 m pixel edge; after the round trip through feet (0.01 ft quantization) it lands on
    either side of that edge. Global indices: col = floor(x / gsd), row = floor(-y / gsd), so
    a tile's local pixel (r, c) is (r - (tile.row + 1) * size, c + tile.col * size).
    """
    ambiguous: set[tuple[int, int]] = set()
    for plot in plots:
        las = laspy.read(_sample_copc(plot))
        gx, gy = np.asarray(las.x) / GSD, -np.asarray(las.y) / GSD
        near_x = np.abs(gx - np.round(gx)) < EDGE_TOL_M / GSD
        near_y = np.abs(gy - np.round(gy)) < EDGE_TOL_M / GSD
        col = np.where(near_x, np.round(gx), np.floor(gx)).astype(np.int64)
        row = np.where(near_y, np.round(gy), np.floor(gy)).astype(np.int64)
        for dr, dc, sel in ((0, 0, near_x | near_y), (0, 1, near_x), (1, 0, near_y),
                            (1, 1, near_x & near_y)):  # fmt: skip
            ambiguous.update(zip((row[sel] - dr).tolist(), (col[sel] - dc).tolist(), strict=True))
    return ambiguous


# --- tests ---------------------------------------------------------------------------------------


def test_feet_catalog_gives_the_same_tiles_as_the_metre_catalog(builds):
    (metre, code_m, err_m), (feet, code_f, err_f) = builds["metre"], builds["feet"]
    assert code_m == 0, err_m
    assert code_f == 0, err_f
    tiles_m, tiles_f = _manifests(metre), _manifests(feet)
    assert sorted(tiles_f) == sorted(tiles_m) and len(tiles_m) >= 4
    for manifest in tiles_f.values():
        source = CRS.from_wkt(manifest["inputs"]["lidar_source_crs"])
        assert [c.to_epsg() for c in source.sub_crs_list] == [2228, 6360]  # really went via feet

    ambiguous = _edge_pixels(COMPARED)
    differ = compared = 0
    for tile_id, manifest in tiles_m.items():
        t = manifest["tile"]
        label_m, label_f = _read(metre, tile_id, "label"), _read(feet, tile_id, "label")
        dsm_m, dsm_f = _read(metre, tile_id, "dsm"), _read(feet, tile_id, "dsm")
        valid_m, valid_f = dsm_m != FLOAT_NODATA, dsm_f != FLOAT_NODATA
        both = valid_m & valid_f
        bad = (label_m != label_f) | (valid_m != valid_f)
        bad |= both & (np.abs(dsm_m.astype(np.float64) - dsm_f) > 0.02)
        rows, cols = np.nonzero(bad)
        unexplained = [
            (r, c)
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True)
            if (r - (t["row"] + 1) * SIZE, c + t["col"] * SIZE) not in ambiguous
        ]
        assert not unexplained, f"{tile_id}: pixels differ away from pixel edges: {unexplained}"
        differ += int((label_m != label_f).sum())
        compared += int((label_m > 0).sum())
    # Edge points move ~2% of labels; a CRS or unit error would move most of them.
    assert compared > 5000 and differ < 0.05 * compared, (differ, compared)


def test_feet_points_come_out_in_tile_crs_and_metres(builds):
    (metre, *_), (feet, *_) = builds["metre"], builds["feet"]
    for tile_id, manifest in _manifests(feet).items():
        xmin, ymin, xmax, ymax = manifest["tile"]["bounds"]
        las = laspy.read(feet / "tiles" / tile_id / "points.laz")
        ref = laspy.read(metre / "tiles" / tile_id / "points.laz")
        assert las.header.parse_crs().to_epsg() == 32611
        assert xmin <= las.x.min() and las.x.max() <= xmax
        assert ymin <= las.y.min() and las.y.max() <= ymax
        z0, z1 = float(las.z.min()), float(las.z.max())
        assert 2100 < z0 < z1 < 2250  # TEAK ground + canopy, in metres
        assert abs(len(las) - len(ref)) <= 0.01 * len(ref)  # edge points may change tile
        for q in (0, 50, 90, 100):
            assert abs(np.percentile(las.z, q) - np.percentile(ref.z, q)) < 0.02


def test_missing_or_mismatched_crs_fails_only_those_tiles(builds):
    (broken, code, stderr), (metre, *_) = builds["broken"], builds["metre"]
    assert code == 1, stderr
    report = json.loads((broken / "report.json").read_text())
    reasons: dict[str, list[str]] = {NO_CRS: [], MISMATCH: []}
    for failure in report["failed"]:
        plot = next(p for p in reasons if _lidar_id(p) in failure["reason"])
        reasons[plot].append(failure["reason"])
    assert len(report["failed"]) == sum(map(len, reasons.values()))
    assert reasons[NO_CRS] and all("no CRS" in r for r in reasons[NO_CRS])
    assert reasons[MISMATCH] and all("CRS mismatch" in r for r in reasons[MISMATCH])
    assert "California zone 4" in reasons[MISMATCH][0]  # names what the file says
    # The healthy plot is built completely: the tiles the metre build made from its imagery.
    built = _manifests(broken)
    plot_image = f"ca_teak_{COMPARED[0]}_010_2017"
    expected = {
        tile_id
        for tile_id, m in _manifests(metre).items()
        if any(i["id"] == plot_image for i in m["inputs"]["imagery"])
    }
    assert set(built) == expected and expected
    assert report["tiles"]["built"] == len(expected)
