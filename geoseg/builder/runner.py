"""`build_dataset`: region -> STAC search -> tile plan -> dask tasks -> catalog, stats and report.

Nothing is written before the search has found inputs and the plan has tiles, so bad input never
leaves a half-made output folder. Tiles are independent dask tasks (one per tile, submitted in a
bounded window so a state-wide plan doesn't flood the scheduler); each finished tile is on disk
the moment its task ends, so an interrupted build loses at most the tiles in flight.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely
import yaml
from tqdm import tqdm

from geoseg.builder.catalog import write_stac
from geoseg.builder.errors import BuildError, BuildInputError, EmptySearchError
from geoseg.builder.index import index_frame, write_footprints, write_index
from geoseg.builder.ledger import TileRows, check_ledgered, read_ledger, scan_finished, write_ledger
from geoseg.builder.plan import PlannedTile, plan_tiles
from geoseg.builder.report import BuildSummary, write_report
from geoseg.builder.split import split_codes
from geoseg.builder.tile import TileJob, TileResult, build_tile
from geoseg.builder.writers import remove_stale_temps, write_bytes_atomic
from geoseg.regions import Region, RegionError, check_within, resolve_region
from geoseg.stac.client import PLANETARY_COMPUTER_URL, check_datetime, find_inputs
from geoseg.stac.retry import DEFAULT_POLICY, RetryPolicy
from geoseg.stac.server import sample_catalog_dir, serve_catalog
from geoseg.stac.signing import load_signer

CATALOGS = ("planetary-computer", "sample")
GRID_DEFAULTS = {"planetary-computer": (1.0, 512), "sample": (0.5, 64)}
"""(gsd m, tile px): N3C's 512 px at 1 m; the sample's 40 m NEON plots need smaller tiles."""


@dataclass
class BuildConfig:
    """Everything that defines a build; saved as `build.yaml` next to its outputs."""

    out: str
    region: str | None = None
    bbox: list[float] | None = None
    aoi: str | None = None
    datetime: str | None = None
    gsd: float | None = None
    """Metres per pixel; None = the catalog's default (see `GRID_DEFAULTS`)."""
    tile_size: int | None = None
    max_tiles: int | None = None
    catalog: str = "planetary-computer"
    stac_url: str | None = None
    scheduler: str | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    memory_limit: str = "4GiB"
    min_coverage: float = 0.25
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_block: int = 8
    seed: int = 0
    signer: str = "auto"
    """How asset hrefs are signed: see `geoseg.stac.signing.load_signer`."""
    read_tries: int = DEFAULT_POLICY.tries
    read_budget_s: float = DEFAULT_POLICY.budget_s
    read_timeout_s: float = DEFAULT_POLICY.timeout_s

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy of every asset read (geoseg.stac.remote)."""
        return replace(
            DEFAULT_POLICY,
            tries=self.read_tries,
            budget_s=self.read_budget_s,
            timeout_s=self.read_timeout_s,
        )


def _sample_coverage(catalog_dir: Path) -> shapely.Geometry:
    geoms = []
    for path in sorted((catalog_dir / "items").glob("*.json")):
        for feat in json.loads(path.read_text())["features"]:
            geoms.append(shapely.geometry.shape(feat["geometry"]))
    return shapely.union_all(geoms)


def check_config(cfg: BuildConfig) -> None:
    """Reject bad arguments before any search, cluster or file: a one-line `BuildInputError`.

    Region problems are left to `resolve_region` (RegionError), which needs the catalog's
    coverage; everything else that a typo can break is checked here, in well under a second.
    """
    if cfg.catalog not in CATALOGS:
        raise BuildInputError(f"unknown catalog {cfg.catalog!r}; valid: {', '.join(CATALOGS)}")
    if cfg.catalog == "sample" and cfg.stac_url:
        raise BuildInputError(
            "give --catalog sample or --stac-url, not both (the sample is served locally)"
        )
    if cfg.datetime is not None:
        try:
            check_datetime(cfg.datetime)
        except ValueError as err:
            raise BuildInputError(f"--datetime: {err}") from None
    if cfg.read_tries < 1 or cfg.read_budget_s < 0 or cfg.read_timeout_s <= 0:
        raise BuildInputError("--read-tries must be >= 1, --read-budget >= 0, --read-timeout > 0")
    try:
        load_signer(cfg.signer, cfg.stac_url or PLANETARY_COMPUTER_URL)
    except ValueError as err:
        raise BuildInputError(f"--signer: {err}") from None
    check_output_folder(Path(cfg.out))


def check_output_folder(out: Path) -> None:
    """`out` must be a folder, or a path a folder can be made at."""
    if out.exists() and not out.is_dir():
        raise BuildInputError(f"--out {out} is a file; give a folder (new or an earlier build)")
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BuildInputError(f"--out {out}: {parent} is a file, so no folder can be made there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BuildInputError(f"--out {out}: no permission to write in {parent}")


def catalog_label(cfg: BuildConfig) -> str:
    """What the report calls the catalog: a `--stac-url` is neither PC nor the sample."""
    if cfg.stac_url and cfg.stac_url.rstrip("/") != PLANETARY_COMPUTER_URL:
        return "STAC API given by --stac-url"
    return cfg.catalog


@contextmanager
def open_catalog(cfg: BuildConfig) -> Iterator[tuple[str, shapely.Geometry, str]]:
    """Yield (STAC API URL, coverage polygon, coverage name) for the chosen catalog.

    The sample catalog is served by a local STAC API (`rustac serve`) so it goes through exactly
    the code path a remote API does.
    """
    if cfg.catalog == "sample":
        folder = sample_catalog_dir()
        with serve_catalog(folder) as url:
            yield url, _sample_coverage(folder), "sample catalog"
        return
    yield cfg.stac_url or PLANETARY_COMPUTER_URL, resolve_region("CA").geometry, "California"


def _region(cfg: BuildConfig, coverage: shapely.Geometry) -> Region:
    given = sum(x is not None for x in (cfg.region, cfg.bbox, cfg.aoi))
    if given > 1:
        raise RegionError("give only one of --region, --bbox, --aoi")
    if given == 0 and cfg.catalog == "sample":
        return Region("sample", coverage.wkt)
    return resolve_region(
        name=cfg.region or ("CA" if given == 0 else None), bbox=cfg.bbox, aoi=cfg.aoi
    )


def search_geometry(region: Region, max_vertices: int = 500) -> dict:
    """A covering, simplified region for the STAC query: APIs cap request sizes.

    Tiles are still planned against the exact region; the ~1 km buffer keeps the simplified
    outline a superset of it.
    """
    geom = region.geometry
    if shapely.get_num_coordinates(geom) > max_vertices:
        geom = shapely.simplify(geom.buffer(0.01), 0.005)
    return shapely.geometry.mapping(geom)


def with_grid_defaults(cfg: BuildConfig) -> BuildConfig:
    """A copy of `cfg` with gsd and tile size filled in from the catalog's defaults."""
    gsd, size = GRID_DEFAULTS.get(cfg.catalog, GRID_DEFAULTS["planetary-computer"])
    return replace(cfg, gsd=cfg.gsd or gsd, tile_size=cfg.tile_size or size)


def plan_build(cfg: BuildConfig) -> tuple[str, Region, list[PlannedTile], dict]:
    """Search and plan without writing anything: (stac url, region, tiles, search summary).

    Public on its own: preview the grid of a build (e.g. `geoseg.plot.plot_grid`) before it runs.
    """
    check_config(cfg)
    cfg = with_grid_defaults(cfg)
    with open_catalog(cfg) as (url, coverage, coverage_name):
        region = _region(cfg, coverage)
        check_within(region, coverage, coverage_name)
        imagery, lidar = find_inputs(url, search_geometry(region), cfg.datetime)
    where = f"{region.name}" + (f" {cfg.datetime}" if cfg.datetime else "")
    if not imagery:
        raise EmptySearchError(f"no NAIP imagery found for {where} at {url}")
    if not lidar:
        raise EmptySearchError(f"no 3DEP LiDAR found for {where} at {url}")
    planned = plan_tiles(region.geometry, imagery, lidar, cfg.gsd, cfg.tile_size)
    if not any(p.skip_reason is None for p in planned):
        raise EmptySearchError(f"no tile of {where} has both NAIP and LiDAR coverage")
    summary = {
        "stac_url": url,
        "catalog": catalog_label(cfg),
        "region": region.name,
        "datetime": cfg.datetime,
        "imagery_items": len(imagery),
        "lidar_items": len(lidar),
        "planned_tiles": len(planned),
    }
    return url, region, planned, summary


@contextmanager
def dask_client(cfg: BuildConfig, echo: Callable[[str], None]):
    """A client on the given scheduler, or on a local process cluster we own."""
    from dask.distributed import Client, LocalCluster

    if cfg.scheduler:
        try:
            client = Client(cfg.scheduler, timeout="15s")
        except OSError as exc:
            raise BuildError(f"cannot reach dask scheduler {cfg.scheduler}: {exc}") from exc
        with client:
            n = len(client.scheduler_info()["workers"])
            echo(f"dask: attached to {cfg.scheduler} ({n} workers)")
            yield client
        return
    with (
        LocalCluster(
            n_workers=max(1, cfg.workers),
            threads_per_worker=1,
            processes=True,
            memory_limit=cfg.memory_limit,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        echo(f"dask: local cluster, {cfg.workers} workers, dashboard {client.dashboard_link}")
        yield client


def _warm_up() -> None:
    """Import the tile code on a worker (seconds), so `tile_seconds` times tiles, not imports."""
    import geoseg.builder.tile  # noqa: F401


def run_jobs(
    client,
    jobs: Iterable[TileJob],
    progress: bool,
    want: int | None = None,
    total: int | None = None,
    window: int = 256,
) -> Iterator[TileResult]:
    """Run tile jobs with at most `window` in flight; yield results as they finish.

    With `want`, stop once that many tiles are ready (built or cached): candidates that end up
    skipped or failed do not count, so `--max-tiles N` gives N tiles whenever the plan has them.
    Never more than the missing number is in flight, so the build never overshoots `want`.
    """
    from dask.distributed import as_completed

    pending = iter(jobs)
    ready = 0

    def room() -> int:
        return window if want is None else min(window, want - ready)

    ac = as_completed([client.submit(build_tile, j, pure=False) for j in islice(pending, room())])
    in_flight = ac.count()
    bar = tqdm(total=want or total, unit="tile", disable=not progress, file=sys.stderr,
               mininterval=1.0)  # fmt: skip
    for fut in ac:
        result = fut.result()
        fut.release()
        in_flight -= 1
        ok = result.status in ("built", "cached")
        ready += ok
        bar.update(1 if want is None else int(ok))
        bar.set_postfix_str(result.status, refresh=False)
        yield result
        for j in islice(pending, max(0, room() - in_flight)):
            ac.add(client.submit(build_tile, j, pure=False))
            in_flight += 1
    bar.close()


SCAN_CHUNK = 4096
"""Tiles per resume-scan task."""


def resume_scan(client, out: Path, tile_ids: list[str]) -> tuple[list[TileRows], list[str]]:
    """(rows of the finished tiles, ids still to build), checked by the dask workers in chunks.

    A resume of a state-wide build finds ~1.6 M finished tiles: checking them in the driver, or
    as one task each, would take far longer than the build's last few tiles. Tiles in the
    ledger of the last finished run are confirmed with a few `stat` calls each; the others have
    their manifests read.
    """

    def chunked(values: Any) -> list:
        return [values[i : i + SCAN_CHUNK] for i in range(0, len(values), SCAN_CHUNK)]

    parts, rest = [], tile_ids
    ledger = read_ledger(out)
    if ledger is not None and len(ledger) and tile_ids:
        planned = pa.array(tile_ids, pa.string())
        known = ledger.take(np.flatnonzero(pc.is_in(ledger.tile_id, value_set=planned)))
        ids = chunked(known.tile_id.to_pylist())
        futures = client.map(
            check_ledgered,
            [str(out)] * len(ids),
            ids,
            chunked(known.stamp),
            [known.file_names] * len(ids),
            chunked(known.file_sizes),
            pure=False,
        )
        ok = np.concatenate([np.zeros(0, bool), *client.gather(futures)])
        parts.append(known.take(np.flatnonzero(ok)))
        confirmed = pc.is_in(planned, value_set=known.tile_id.filter(pa.array(ok)))
        rest = [t for t, done in zip(tile_ids, confirmed.to_pylist(), strict=True) if not done]
    chunks = chunked(rest)
    futures = client.map(scan_finished, [str(out)] * len(chunks), chunks, pure=False)
    todo = []
    for rows, missing in client.gather(futures):
        parts.append(rows)
        todo.extend(missing)
    return parts, todo


class _RowBuffer:
    """Manifests of tiles built in this run, folded into `TileRows` a batch at a time."""

    def __init__(self, parts: list[TileRows], batch: int = 2048) -> None:
        self.parts, self.batch, self.manifests, self.stamps = parts, batch, [], []

    def add(self, manifest: dict, stamp: int) -> None:
        self.manifests.append(manifest)
        self.stamps.append(stamp)
        if len(self.manifests) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.manifests:
            self.parts.append(TileRows.from_manifests(self.manifests, self.stamps))
            self.manifests, self.stamps = [], []


def build_dataset(
    cfg: BuildConfig, echo: Callable[[str], None] = print, progress: bool = True
) -> BuildSummary:
    """Build (or finish) a dataset in `cfg.out`. Raises BuildError for whole-build problems."""
    t0 = time.perf_counter()
    cfg = with_grid_defaults(cfg)
    url, region, planned, search = plan_build(cfg)
    out = Path(cfg.out).resolve()
    signer, policy = load_signer(cfg.signer, url), cfg.policy
    summary = BuildSummary(out)
    runnable: dict[str, PlannedTile] = {}
    for p in planned:
        if p.skip_reason is None:
            runnable[p.tile.id] = p
        else:
            summary.add(p.tile.id, "skipped", p.skip_reason)
    del planned
    with dask_client(cfg, echo) as client:  # connect before writing: a bad address leaves nothing
        out.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temps(out / "tiles")
        if removed:
            echo(f"removed {removed} temporary files left by an interrupted build")
        config_text = yaml.safe_dump(asdict(cfg), sort_keys=False)
        write_bytes_atomic(out / "build.yaml", lambda p: p.write_text(config_text))
        parts, todo = resume_scan(client, out, list(runnable))
        cached = sum(map(len, parts))
        if cfg.max_tiles is not None and cached >= cfg.max_tiles:
            parts, todo = [TileRows.concat(parts).sorted().take(np.arange(cfg.max_tiles))], []
            cached = cfg.max_tiles
        summary.statuses["cached"] += cached
        want = None if cfg.max_tiles is None else cfg.max_tiles - cached
        limit = f", stopping once {cfg.max_tiles} are ready" if cfg.max_tiles else ""
        echo(
            f"{search['imagery_items']} NAIP + {search['lidar_items']} LiDAR items; "
            f"{len(todo)} tiles to build{limit}, {cached} already built, "
            f"{sum(summary.skipped.values())} skipped at planning"
        )
        jobs = (
            TileJob(
                p.tile, tuple(p.imagery), tuple(p.lidar), signer, str(out), cfg.min_coverage, policy
            )
            for p in (runnable[t] for t in todo)
        )
        buffer = _RowBuffer(parts)
        t_tiles = time.perf_counter()
        if todo:
            client.run(_warm_up)
            for result in run_jobs(client, jobs, progress, want=want, total=len(todo)):
                summary.tasks += 1
                summary.add(result.tile_id, result.status, result.reason, result.seconds,
                            result.worker)  # fmt: skip
                if result.status in ("built", "cached"):
                    buffer.add(result.manifest, result.stamp)
        buffer.flush()
        summary.tile_seconds = time.perf_counter() - t_tiles
    summary.not_attempted = len(todo) - summary.tasks
    rows = TileRows.concat(parts).sorted()
    write_outputs(out, rows, cfg, region, summary, search, t0)
    return summary


def write_outputs(
    out: Path,
    rows: TileRows,
    cfg: BuildConfig,
    region: Region,
    summary: BuildSummary,
    search: dict,
    t0: float,
) -> None:
    """Everything that describes the finished tiles (`rows`, sorted by id): splits, index,
    footprints, STAC collection and sub-catalogs, stats, report, preview."""
    # Grids are told apart by CRS and tile span; the split hashes their names, so these stay
    # what they always were: a rerun must not reshuffle an earlier build's splits.
    pairs, grid = np.unique(
        np.stack([rows.crs.astype(np.float64), rows.span], axis=1), axis=0, return_inverse=True
    )
    names = [f"{rows.crs_wkts[int(c)]}|{float(span)}" for c, span in pairs]
    splits = split_codes(
        names, grid.ravel(), rows.col, rows.row, cfg.split_ratios, cfg.split_block, cfg.seed
    )
    write_ledger(out, rows)
    frame = index_frame(rows, splits)
    write_index(out, frame)
    write_footprints(out, frame)
    extent = None
    if len(frame):
        w, s, e, n = frame.geometry.bounds.to_numpy().T
        extent = (float(w.min()), float(s.min()), float(e.max()), float(n.max()))
    del frame
    when = pc.min_max(rows.datetime).as_py() if len(rows) else None
    interval = (when["min"], when["max"]) if when else None
    write_stac(out, rows.tile_id.to_pylist(), extent, interval, region)
    summary.seconds = time.perf_counter() - t0
    write_report(out, summary, rows, splits, search)
