"""The LiDAR points of a scene, read band by band, for point-reading models.

Prediction never holds a whole scene's points. Points are read per band (one window high, one
column pass wide; see `geoseg.predict.sliding`) through the builder's own reader,
`geoseg.builder.points.read_tile_points`, so a band gets exactly what a training tile got: the
points inside it, reprojected to the scene's CRS, z scaled to metres, one acquisition project.
That reader (and `rasterize`) take any `geoseg.builder.grid.Area`; `Extent` is a band or a window.

- COPC files (local, `--points`, or found through STAC) are read with a spatial query per band:
  only the octree nodes overlapping the band are decoded.
- Plain LAS/LAZ files have no index; they are streamed once, in chunks, into uncompressed LAS
  stripes (one window stride of rows each) in a temporary folder, and a band reads the few
  stripes it overlaps. Memory is bounded by one chunk plus one band; disk holds the scene's
  points once.

Windows are cut from a band with the builder's convention (x in [xmin, xmax), y in (ymin, ymax]),
sorted by value, and go through the training point pipeline (`prepare_points`) in eval mode,
drawing from a generator seeded by (contract seed, window row, window column): a window's sample
depends neither on how the points were delivered nor on batch size or the other windows, so
prediction is reproducible and equals tile-wise prediction. A window with fewer than `k`
non-noise points has no neighbourhoods to learn from; it is skipped (`geoseg.predict.sliding`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import laspy
import numpy as np
import shapely
from affine import Affine
from pyproj import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.windows import bounds as window_bounds

from geoseg.builder.errors import TileError
from geoseg.builder.grid import horizontal_crs, transformer
from geoseg.builder.points import (
    FIELDS,
    pick_project,
    read_tile_points,
    resolve_crs,
)
from geoseg.builder.rasterize import FLOAT_NODATA, rasterize
from geoseg.classes import NOISE_CODES
from geoseg.datasets.n3c import points_to_tensors
from geoseg.datasets.points import PointConfig, prepare_points
from geoseg.predict.errors import PredictError
from geoseg.stac.client import PLANETARY_COMPUTER_URL, open_client, search_items
from geoseg.stac.items import PointCloudItem, parse_pointcloud
from geoseg.stac.server import sample_catalog_dir, serve_catalog
from geoseg.stac.signing import NoSigner, Signer, local_path, signer_for

LIDAR_BANDS = ("dsm", "intensity")
"""Contract bands rasterised from the points (as the build does), not read from the image."""

LIDAR_COLLECTION = "3dep-lidar-copc"
"""The STAC collection searched for the scene's COPC (Planetary Computer's, and the sample's)."""

CHUNK_POINTS = 1_000_000
"""Points per chunk when streaming a plain LAS/LAZ file into stripes."""

Bounds = tuple[float, float, float, float]


@dataclass(frozen=True)
class Extent:
    """A band or window in the scene CRS, an `Area` for the build readers."""

    crs: CRS
    bounds: Bounds
    gsd: float = 0.0
    size: int = 0


def local_item(path: str | Path, crs_wkt: str | None = None) -> PointCloudItem:
    """A `PointCloudItem` for a point file given on the command line (one project: "local")."""
    path = Path(path)
    return PointCloudItem(
        id=path.name, collection="", href=str(path), crs_wkt=crs_wkt, bbox=(0.0, 0.0, 0.0, 0.0),
        footprint_wkt="", start=None, end=None, project="local", count=None,
    )  # fmt: skip


def _overlaps(a: Bounds, b: Bounds) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class ScenePoints:
    """Points of one scene, served per row band in the scene CRS (see the module docstring).

    Use as a context manager: the stripes of plain files live in a temporary folder until exit.
    """

    def __init__(
        self,
        items: Sequence[PointCloudItem],
        scene_crs: CRS,
        transform: Affine,
        shape: tuple[int, int],
        stripe_rows: int,
        signer: Signer | None = None,
        check_local: bool = True,
    ) -> None:
        """`check_local`: open local files now, to fail early on a missing CRS or no overlap."""
        self.crs = scene_crs
        self.transform = transform
        self.height, self.width = shape
        self.stripe_rows = stripe_rows
        self.signer = signer or NoSigner()
        self.bounds: Bounds = (
            transform.c, transform.f + transform.e * self.height,
            transform.c + transform.a * self.width, transform.f,
        )  # fmt: skip
        self._tmp = tempfile.TemporaryDirectory(prefix="geoseg-points-")
        self._copc: list[PointCloudItem] = []
        self._stripes: dict[int, list[PointCloudItem]] = {}
        try:
            for index, item in enumerate(items):
                if check_local:
                    self._add_local(index, item)
                else:
                    self._copc.append(item)
        except BaseException:
            self._tmp.cleanup()
            raise
        if not self._copc and not self._stripes:
            self._tmp.cleanup()
            names = ", ".join(i.id for i in items)
            raise PredictError(f"points {names} do not overlap the image")

    def __enter__(self) -> ScenePoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()

    def _add_local(self, index: int, item: PointCloudItem) -> None:
        """Check one local file (CRS, overlap); keep COPC as is, stripe a plain file."""
        path = local_path(item.href)
        try:
            with laspy.open(path) as reader:
                header = reader.header
                crs = resolve_crs(item, header)
                x0, y0, x1, y1 = transform_bounds(
                    horizontal_crs(crs), self.crs, *header.mins[:2], *header.maxs[:2]
                )
                if not _overlaps((x0, y0, x1, y1), self.bounds):
                    return
                is_copc = any(v.user_id == "copc" for v in header.vlrs)
                if not is_copc:
                    self._spill(index, item, reader, crs)
                    return
        except TileError:  # from resolve_crs: a local file has no item to declare a CRS
            raise PredictError(f"points {path} have no CRS; assign the file one") from None
        except (OSError, laspy.LaspyException) as exc:
            raise PredictError(f"cannot read points {path}: {exc}") from None
        self._copc.append(item)

    def _stripe(self, y: np.ndarray) -> np.ndarray:
        return np.floor((self.transform.f - y) / -self.transform.e / self.stripe_rows).astype(int)

    def _spill(self, index: int, item: PointCloudItem, reader: laspy.LasReader, crs: CRS) -> None:
        """Stream a plain LAS/LAZ once into per-stripe uncompressed LAS files (same header)."""
        to_scene = transformer(horizontal_crs(crs), self.crs)
        xmin, ymin, xmax, ymax = self.bounds
        header = laspy.LasHeader(point_format=reader.header.point_format,
                                 version=reader.header.version)  # fmt: skip
        header.scales, header.offsets = reader.header.scales, reader.header.offsets
        header.vlrs = [v for v in reader.header.vlrs if v.user_id not in ("copc", "laszip encoded")]
        written: set[int] = set()
        for chunk in reader.chunk_iterator(CHUNK_POINTS):
            x, y = (np.asarray(v) for v in to_scene.transform(chunk.x, chunk.y))
            inside = (x >= xmin) & (x < xmax) & (y > ymin) & (y <= ymax)
            stripe = self._stripe(y)
            for s in np.unique(stripe[inside]):
                path = Path(self._tmp.name) / f"{index}-{s}.las"
                points = chunk[inside & (stripe == s)]
                if s in written:
                    with laspy.open(path, mode="a") as out:
                        out.append_points(points)
                else:
                    with laspy.open(path, mode="w", header=header) as out:
                        out.write_points(points)
                    written.add(int(s))
                    self._stripes.setdefault(int(s), []).append(
                        local_item(path, item.crs_wkt or crs.to_wkt())
                    )

    def read(self, window: Window) -> dict[str, np.ndarray]:
        """Points under a pixel window of the scene (build's FIELDS), e.g. one row band, in
        canonical order (see `window_arrays`)."""
        extent = Extent(self.crs, window_bounds(window, self.transform))
        top, rows = int(window.row_off), int(window.height)
        first, last = top // self.stripe_rows, (top + rows - 1) // self.stripe_rows
        items = self._copc + [i for s in range(first, last + 1) for i in self._stripes.get(s, [])]
        try:
            arrays = read_tile_points(extent, items, self.signer).arrays
        except TileError as exc:
            raise PredictError(str(exc)) from None
        return canonical_order(arrays)


def canonical_order(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Points sorted by value: x, then y, z and the other `FIELDS` (see `window_arrays`)."""
    order = np.lexsort([arrays[k] for k in reversed(FIELDS)])  # lexsort: last key is primary
    return {k: v[order] for k, v in arrays.items()}


def window_arrays(arrays: dict[str, np.ndarray], bounds: Bounds) -> dict[str, np.ndarray]:
    """The points of a band in `canonical_order` (as `ScenePoints.read` gives it) inside one
    window (the builder's edge rule).

    The band comes sorted by value (x, y, z, then the other fields), because grid sub-sampling
    keeps the first point of a voxel and the random sample draws indices: without a canonical
    order the sample would depend on how files, COPC nodes or stripes deliver the points. x is
    the primary key, so a window is a binary-searched slice, and a subset keeps the order.
    """
    xmin, ymin, xmax, ymax = bounds
    lo, hi = np.searchsorted(arrays["x"], [xmin, xmax])
    y = arrays["y"][lo:hi]
    keep = lo + np.flatnonzero((y > ymin) & (y <= ymax))
    return {k: v[keep] for k, v in arrays.items()}


def window_rng(seed: int, top: int, left: int) -> np.random.Generator:
    """The generator of one window's point sample: fixed by its position, nothing else."""
    return np.random.default_rng([seed, top, left])


def enough_points(arrays: dict[str, np.ndarray], cfg: PointConfig) -> bool:
    """Whether a window has the k non-noise points its neighbourhoods need."""
    return int((~np.isin(arrays["classification"], list(NOISE_CODES))).sum()) >= cfg.k


def window_sample(
    arrays: dict[str, np.ndarray],
    transform: Affine,
    size: int,
    cfg: PointConfig,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One window's `PointsBatch` entries as tensors (no batch axis), as `N3CCalifornia` makes.

    `transform` is the window's geotransform (its top-left corner); pixels of the window cut by
    the scene edge are padding, as the image is.
    """
    pts = prepare_points(arrays, transform, size, cfg, rng)
    pts.pop("labels")
    return points_to_tensors(pts)


def lidar_rasters(
    arrays: dict[str, np.ndarray], extent: Extent, names: Sequence[str]
) -> np.ndarray:
    """(len(names), size, size) float32 LiDAR bands of a window, NaN where no point.

    The builder's `rasterize` on the window's points, so `dsm`/`intensity` are what a training
    tile's `dsm.tif`/`intensity.tif` hold for the same ground.
    """
    rasters = rasterize(arrays, extent)
    out = np.stack([getattr(rasters, name) for name in names]).astype(np.float32)
    out[out == FLOAT_NODATA] = np.nan
    return out


def scene_footprint(crs: CRS, bounds: Bounds) -> dict[str, Any]:
    """The scene's outline in lon/lat as GeoJSON, for the STAC search of its COPC items."""
    lonlat = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
    return shapely.geometry.mapping(shapely.box(*lonlat))


def catalog_items(
    crs: CRS, bounds: Bounds, stac_url: str | None, catalog: str | None
) -> tuple[list[PointCloudItem], Signer]:
    """The COPC items of one acquisition project covering the scene, and their signer.

    `catalog` "sample" serves the embedded sample through a local STAC API for the search (the
    hrefs are local files, readable after it stops); "planetary-computer" or `stac_url` search
    that API. Like the build, one project is used (the most recent one covering the scene), so
    two flights of different years never mix inside a window.
    """
    with ExitStack() as stack:
        if catalog == "sample":
            url = stack.enter_context(serve_catalog(sample_catalog_dir()))
        else:
            url = stac_url or PLANETARY_COMPUTER_URL
        found = search_items(open_client(url), LIDAR_COLLECTION, scene_footprint(crs, bounds), None)
        items = pick_project([parse_pointcloud(item) for item in found])
    if not items:
        raise PredictError(f"no {LIDAR_COLLECTION} item at {url} covers the image")
    return items, signer_for(url)
