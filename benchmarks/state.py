"""California-size rehearsal of `geoseg build-dataset --region CA` (issue 16), without pixels.

Phases, each in its own process (its peak RSS and CPU time are its own):

1. catalog: a synthetic STAC catalog shaped like the Planetary Computer's, covering California:
   NAIP quarter-quad items for one year (3.75' cells plus PC's ~300 m overlap, UTM 10N/11N,
   PC's item layout) and 3DEP COPC tile items (1 km tiles on each project's UTM grid, projects
   of 40 x 40 km flown in 2014-2022, one in seven flown twice; PC's COPC item layout, compound
   CRS in proj:projjson). Written as newline-delimited JSON.
2. plan: the catalog in pgstac (PostgreSQL 15 + PostGIS from apt, schema and load by pypgstac),
   served by `rustac serve --pgstac`, all started here; `plan_build` for --region CA against it,
   as a build runs it: paging through every item of both collections (timed on its own), then
   planning the tile grid. Peak RSS and CPU of the planner and of the servers, tile counts.
   With `--max-pages N` each search pages N pages only: the paging rate is measured on them
   and the time of all pages extrapolated, and the plan is made from the same items read from
   the catalog files (the run counts how many sampled items equal them).
   (rustac's in-memory backend held 14.2 GiB for this catalog and was killed: docs/benchmarks.md.)
3. outputs: the end of a build over the planned tiles with stub results (realistic manifests,
   no pixel work): manifests folded into `TileRows` in batches as the driver does while tiles
   finish, then `write_outputs` (splits, index, footprints, STAC catalogs, stats, report). Time,
   peak RSS and the size of every output file.
4. scan: the resume scan (`resume_scan`, 2 dask workers over 4096-tile chunks) over finished
   stub tiles on disk (a manifest and an item per tile; the data files are hard links to empty
   files, as the scan only checks sizes). `--scan-tiles` of them (default 200 000: 1.6 M tiles
   would need ~5 M directory entries and ~13 GB on this shared disk); the per-tile time is
   extrapolated to the planned tile count.

Results: benchmarks/results/state.json (or --json), a table on stdout.
Usage: python benchmarks/state.py [--work DIR] [--only catalog,plan,outputs,scan] [--scan-tiles N]
       [--max-pages N]
Needs: pypgstac (`pip install -e '.[state]'`), PostgreSQL 15 with PostGIS
(`apt-get install postgresql-15 postgresql-15-postgis-3`), ~10 GB free under --work.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXAMPLES = REPO / "tests" / "data" / "stac_examples"
RESULTS = REPO / "benchmarks" / "results" / "state.json"
BIN = Path(sys.executable).parent
YEAR = 2022
QQ = 0.0625  # a NAIP quarter quad: 3.75 arc-minutes
QQ_PAD = 0.0027  # PC footprints overlap their neighbours by about 300 m
COPC_TILE = 1000.0  # m
PROJECT = 40_000.0  # m
PG_PORT = 55432
API_PORT = 7988
TARGETS = {
    "plan_s": 600,
    "plan_rss_gib": 4,
    "outputs_s": 600,
    "outputs_rss_gib": 4,
    "scan_s": 120,
    "largest_file_mb": 100,
}


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _hash(*parts: object) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16)


# -- phase 1: the catalog ---------------------------------------------------------------------
def _template(collection: str, pattern: str) -> dict[str, Any]:
    item = json.loads(next((EXAMPLES / "items" / collection).glob(pattern)).read_text())
    item["links"] = []
    return item


def naip_items(state) -> Iterator[dict[str, Any]]:
    """One NAIP item per quarter quad touching California (PC's layout, one year)."""
    import shapely
    from pyproj import Transformer

    template = _template("naip", "*2022*.json")
    w, s, e, n = state.bounds
    lons = np.arange(np.floor(w / QQ) * QQ, e, QQ)
    lats = np.arange(np.floor(s / QQ) * QQ, n, QQ)
    lon0, lat0 = (a.ravel() for a in np.meshgrid(lons, lats))
    cells = shapely.box(lon0 - QQ_PAD, lat0 - QQ_PAD, lon0 + QQ + QQ_PAD, lat0 + QQ + QQ_PAD)
    shapely.prepare(state)
    keep = shapely.intersects(state, cells)
    to_utm = {z: Transformer.from_crs(4326, 26900 + z, always_xy=True) for z in (10, 11)}
    for x, y, cell in zip(lon0[keep], lat0[keep], cells[keep], strict=True):
        zone = 10 if x + QQ / 2 < -120 else 11
        quad = f"{int(y + 1):02d}{int(-x) + 1:03d}"
        q = f"{int((y % 1) / QQ):02d}{int((x % 1) / QQ):02d}"
        day = datetime(YEAR, 4, 1, 16, tzinfo=UTC) + timedelta(days=_hash(quad, q) % 150)
        name = f"m_{quad}{q}_{zone}_060_{day:%Y%m%d}"
        ux, uy = to_utm[zone].transform(*np.array(cell.exterior.coords).T)
        x0, y0, x1, y1 = np.floor(min(ux)), np.floor(min(uy)), np.ceil(max(ux)), np.ceil(max(uy))
        image = {
            **template["assets"]["image"],
            "href": f"https://naipeuwest.blob.core.windows.net/naip/v002/ca/{YEAR}/"
            f"ca_060cm_{YEAR}/{quad}/{name}.tif",
        }
        yield {
            **template,
            "id": f"ca_{name}",
            "bbox": list(cell.bounds),
            "geometry": shapely.geometry.mapping(cell),
            "assets": {**template["assets"], "image": image},
            "properties": {
                **template["properties"],
                "datetime": day.isoformat().replace("+00:00", "Z"),
                "naip:year": str(YEAR),
                "proj:epsg": 26900 + zone,
                "proj:bbox": [x0, y0, x1, y1],
                "proj:shape": [int((y1 - y0) / 0.6), int((x1 - x0) / 0.6)],
                "proj:transform": [0.6, 0.0, x0, 0.0, -0.6, y1, 0.0, 0.0, 1.0],
                "proj:centroid": {"lat": y + QQ / 2, "lon": x + QQ / 2},
            },
        }


def _projjson(template: dict[str, Any], zone: int) -> dict[str, Any]:
    """The template's NAD83 / UTM + NAVD88 compound CRS, moved to `zone`."""
    projjson = json.loads(json.dumps(template["properties"]["proj:projjson"]))
    horizontal = projjson["components"][0]
    horizontal["id"]["code"] = 26900 + zone
    horizontal["name"] = f"NAD83 / UTM zone {zone}N"
    horizontal["conversion"]["name"] = f"UTM zone {zone}N"
    horizontal["conversion"]["parameters"][1]["value"] = zone * 6 - 183
    projjson["name"] = f"NAD83 / UTM zone {zone}N + NAVD88 height"
    return projjson


def copc_items(state) -> Iterator[dict[str, Any]]:
    """3DEP COPC tiles over California: 1 km tiles on each project's UTM grid; projects of
    40 x 40 km flown in 2014-2022, one in seven flown a second time three years earlier."""
    import shapely
    from pyproj import Transformer

    template = _template("3dep-lidar-copc", "*.json")
    for zone, (west, east) in ((10, (-126.0, -120.0)), (11, (-120.0, -114.0))):
        band = shapely.intersection(state, shapely.box(west, 30, east, 44))
        to_utm = Transformer.from_crs(4326, 26900 + zone, always_xy=True)
        to_lonlat = Transformer.from_crs(26900 + zone, 4326, always_xy=True)
        bx, by = to_utm.transform(*np.array(shapely.envelope(band).exterior.coords).T)
        xs = np.arange(np.floor(min(bx) / COPC_TILE), np.ceil(max(bx) / COPC_TILE)) * COPC_TILE
        ys = np.arange(np.floor(min(by) / COPC_TILE), np.ceil(max(by) / COPC_TILE)) * COPC_TILE
        x0, y0 = (a.ravel() for a in np.meshgrid(xs, ys))
        corners_x = np.stack([x0, x0 + COPC_TILE, x0 + COPC_TILE, x0, x0], axis=1)
        corners_y = np.stack([y0, y0, y0 + COPC_TILE, y0 + COPC_TILE, y0], axis=1)
        lon, lat = to_lonlat.transform(corners_x.ravel(), corners_y.ravel())
        rings = np.stack([lon, lat], axis=1).reshape(len(x0), 5, 2)
        shapely.prepare(band)
        keep = shapely.intersects(band, shapely.polygons(rings))
        projjson = _projjson(template, zone)
        for x, y, ring in zip(x0[keep], y0[keep], rings[keep], strict=True):
            px, py = int(x // PROJECT), int(y // PROJECT)
            flights = [2014 + _hash(zone, px, py) % 9]
            if _hash("again", zone, px, py) % 7 == 0:
                flights.append(flights[0] - 3)
            (w, s), (e, n) = ring.min(axis=0), ring.max(axis=0)
            square = [
                [x, y],
                [x + COPC_TILE, y],
                [x + COPC_TILE, y + COPC_TILE],
                [x, y + COPC_TILE],
                [x, y],
            ]
            for year in flights:
                project = f"CA_Z{zone}_{px}_{py}_{year}"
                item_id = f"USGS_LPC_{project}_e{int(x / 1000)}n{int(y / 1000)}"
                data = {
                    **template["assets"]["data"],
                    "href": "https://usgslidareuwest.blob.core.windows.net/usgs-3dep-copc/"
                    f"usgs-copc/{project}/copc/{item_id}.copc.laz",
                }
                yield {
                    **template,
                    "id": item_id,
                    "bbox": [w, s, 0.0, e, n, 4400.0],
                    "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]},
                    "assets": {**template["assets"], "data": data},
                    "properties": {
                        **template["properties"],
                        "pc:count": 2_000_000 + _hash(x, y) % 4_000_000,
                        "proj:bbox": [x, y, 0.0, x + COPC_TILE, y + COPC_TILE, 4400.0],
                        "proj:projjson": projjson,
                        "proj:geometry": {"type": "Polygon", "coordinates": [square]},
                        "3dep:usgs_id": project,
                        "start_datetime": f"{year}-01-01T00:00:00Z",
                        "end_datetime": f"{year}-12-31T00:00:00Z",
                    },
                }


def write_catalog(work: Path) -> dict[str, Any]:
    """Collections and items as newline-delimited JSON (what `pypgstac load` reads)."""
    from geoseg.regions import resolve_region

    t0 = time.perf_counter()
    state = resolve_region("CA").geometry
    root = work / "catalog"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "collections.ndjson", "w") as f:
        for name in ("naip", "3dep-lidar-copc"):
            doc = json.loads((EXAMPLES / "collections" / f"{name}.json").read_text())
            f.write(json.dumps(doc) + "\n")
    counts, sizes = {}, {}
    for name, make in (("naip", naip_items), ("3dep-lidar-copc", copc_items)):
        path = root / f"{name}.ndjson"
        n = 0
        with open(path, "w") as f:
            for item in make(state):
                f.write(json.dumps(item) + "\n")
                n += 1
        counts[name], sizes[name] = n, path.stat().st_size
    return {
        "items": counts,
        "json_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }


# -- measuring --------------------------------------------------------------------------------
def _tree(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _cpu_of(procs: list[psutil.Process]) -> float:
    """CPU seconds of `procs`, their reaped children included (postgres backends come and go)."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _busy_cpu() -> float:
    """Machine-wide busy CPU seconds (everyone's)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _hwm_gib(pid: int) -> float:
    """Peak RSS (VmHWM) of one process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def run_phase(phase: str, args: argparse.Namespace, servers: list[int] = ()) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its result plus the wall time, the servers' CPU
    and the CPU everyone else on the machine used meanwhile (the load)."""
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--work",
        str(args.work),
        "--scan-tiles",
        str(args.scan_tiles),
        "--max-pages",
        str(args.max_pages),
        "--region",
        args.region,
    ]
    if args.stac_url:
        cmd += ["--stac-url", args.stac_url]
    server_cpu0, busy0, t0 = (
        _cpu_of([p for s in servers for p in _tree(s)]),
        _busy_cpu(),
        time.perf_counter(),
    )
    proc = subprocess.Popen(cmd, cwd=REPO)
    while proc.poll() is None:  # a shared machine: never let a phase take it all
        rss = sum(p.memory_info().rss for p in _tree(proc.pid) if p.is_running()) / 2**30
        if rss > args.max_rss_gib:
            for p in reversed(_tree(proc.pid)):
                p.kill()
            raise SystemExit(f"phase {phase} stopped: {rss:.1f} GiB > --max-rss-gib")
        time.sleep(1.0)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"phase {phase} failed ({proc.returncode})")
    result = json.loads((args.work / f"{phase}.json").read_text())
    server_cpu = _cpu_of([p for s in servers for p in _tree(s)]) - server_cpu0
    others = _busy_cpu() - busy0 - result["cpu_s"] - server_cpu
    result |= {
        "process_wall_s": round(wall, 1),
        "other_load_cores": round(max(others, 0.0) / wall, 2),
    }
    if servers:
        result["server_cpu_s"] = round(server_cpu, 1)
    return result


@contextlib.contextmanager
def peak_site(into: dict[str, Any]) -> Iterator[None]:
    """Sample this process's RSS every 0.2 s; note the peak and the geoseg functions the main
    thread was in then (innermost first)."""
    import threading

    main, stop, proc = threading.main_thread().ident, threading.Event(), psutil.Process()

    def sample() -> None:
        while not stop.wait(0.2):
            rss = proc.memory_info().rss
            if rss > into.get("bytes", 0):
                frame, site = sys._current_frames().get(main), []
                while frame is not None:
                    if "/geoseg/" in frame.f_code.co_filename:
                        site.append(frame.f_code.co_name)
                    frame = frame.f_back
                into.update(bytes=rss, gib=round(rss / 2**30, 2), at=" < ".join(site[:4]))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# -- phase 2: pgstac, the API and the plan -----------------------------------------------------
def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise SystemExit(
            "PostgreSQL not found: apt-get install postgresql-15 postgresql-15-postgis-3"
        )
    return str(found[-1])


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _wait_port(port: int, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.5)
    raise SystemExit(f"{what} did not start on port {port}")


@contextlib.contextmanager
def postgres(work: Path) -> Iterator[tuple[str, int]]:
    """A throw-away PostgreSQL cluster under `work/pg` (kept between runs: the loaded catalog
    is reused); (DSN, postmaster pid). Durability is off: it is a benchmark's scratch database."""
    pg = work / "pg"
    data = pg / "data"
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(pg, "postgres")
            shutil.chown(data, "postgres")
        subprocess.run(
            _as_postgres(
                [
                    _pg_bin("initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )
    settings = {
        "listen_addresses": "127.0.0.1",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "shared_buffers": "512MB",
        "work_mem": "64MB",
        "maintenance_work_mem": "512MB",
        "max_wal_size": "8GB",
    }
    cmd = [_pg_bin("postgres"), "-D", str(data), "-p", str(PG_PORT), "-k", str(pg)]
    for key, value in settings.items():
        cmd += ["-c", f"{key}={value}"]
    with open(pg / "log", "ab") as log:
        proc = subprocess.Popen(_as_postgres(cmd), stdout=log, stderr=log)
    try:
        _wait_port(PG_PORT, "PostgreSQL")
        time.sleep(1.0)  # the port opens before the cluster accepts logins
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield f"postgresql://postgres@127.0.0.1:{PG_PORT}/postgres", pid
    finally:
        proc.terminate()  # runuser passes SIGTERM on: a "smart" shutdown
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(120)
        if proc.poll() is None:
            proc.kill()


def load_catalog(dsn: str, work: Path) -> dict[str, Any]:
    """pgstac's schema and the catalog's items, unless this database holds them already."""
    import psycopg

    expected = json.loads((work / "catalog.json").read_text())["items"]

    def counts() -> dict[str, int]:
        with psycopg.connect(dsn) as conn:
            try:
                rows = conn.execute(
                    "select collection, count(*) from pgstac.items group by 1"
                ).fetchall()
            except psycopg.errors.UndefinedTable:
                return {}
        return dict(rows)

    if counts() == expected:
        return {"loaded_now": False}
    t0 = time.perf_counter()
    pypgstac = [str(BIN / "pypgstac")]
    subprocess.run([*pypgstac, "migrate", "--dsn", dsn], check=True)
    root = work / "catalog"
    subprocess.run(
        [
            *pypgstac,
            "load",
            "collections",
            str(root / "collections.ndjson"),
            "--dsn",
            dsn,
            "--method",
            "upsert",
        ],
        check=True,
    )
    for name in expected:
        subprocess.run(
            [
                *pypgstac,
                "load",
                "items",
                str(root / f"{name}.ndjson"),
                "--dsn",
                dsn,
                "--method",
                "upsert",
            ],
            check=True,
        )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("vacuum analyze pgstac.items")
    if counts() != expected:
        raise SystemExit(f"pgstac holds {counts()} items, the catalog {expected}")
    return {"loaded_now": True, "load_s": round(time.perf_counter() - t0, 1)}


@contextlib.contextmanager
def stac_api(dsn: str, work: Path) -> Iterator[tuple[str, int]]:
    """`rustac serve --pgstac` on the database; (URL, pid). pgstac's functions need their
    schema on the search path."""
    url = f"http://127.0.0.1:{API_PORT}"
    pg = f"{dsn}?options=-csearch_path%3Dpgstac,public"
    with open(work / "api.log", "ab") as log:
        proc = subprocess.Popen(
            [str(BIN / "rustac"), "serve", "--pgstac", pg, "--addr", f"127.0.0.1:{API_PORT}"],
            stdout=log,
            stderr=log,
        )
    try:
        _wait_port(API_PORT, "rustac serve")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def catalog_items(work: Path, intersects: dict[str, Any]) -> tuple[list, list]:
    """What a full search returns, read from the catalog files: every item intersecting
    `intersects`, parsed and sorted by id as `find_inputs` does."""
    import shapely

    from geoseg.stac.items import parse_imagery, parse_pointcloud

    area = shapely.geometry.shape(intersects)
    shapely.prepare(area)
    found = []
    for name, parse in (("naip", parse_imagery), ("3dep-lidar-copc", parse_pointcloud)):
        with open(work / "catalog" / f"{name}.ndjson") as f:  # 2.2 GB of JSON: line by line
            items = (json.loads(line) for line in f)
            kept = [
                parse(i)
                for i in items
                if shapely.intersects(area, shapely.geometry.shape(i["geometry"]))
            ]
        found.append(sorted(kept, key=lambda i: i.id))
    return found[0], found[1]


def sampled_paging(stac_url: str, intersects: dict[str, Any], pages: int) -> dict[str, Any]:
    """`find_inputs` through the API with each of its searches stopped after `pages` pages:
    the paging rate with its real strips and threads, when paging everything takes hours."""
    import geoseg.stac.client as client

    search_items, fetched, waits = client.search_items, [], {"first": [], "later": []}

    def first_pages(*a: Any, **k: Any) -> Iterator[dict[str, Any]]:
        n, t = 0, time.perf_counter()
        for item in itertools.islice(search_items(*a, **k), pages * client.PAGE_SIZE):
            if n % client.PAGE_SIZE == 0:  # a page arrived: how long it took (4 threads share)
                waits["later" if n else "first"].append(time.perf_counter() - t)
                t = time.perf_counter()
            n += 1
            yield item
        fetched.append(n)

    client.search_items = first_pages
    t, c = time.perf_counter(), _cpu_s()
    try:
        imagery, lidar = client.find_inputs(stac_url, intersects, None)
    finally:
        client.search_items = search_items
    seconds = time.perf_counter() - t
    count = sum(-(-n // client.PAGE_SIZE) for n in fetched)
    return {
        "pages_per_search": pages,
        "searches": len(fetched),
        "pages": count,
        "items": sum(fetched),
        "seconds": round(seconds, 1),
        "cpu_s": round(_cpu_s() - c, 1),
        "pages_per_s": round(count / seconds, 3),
        "median_page_s": {k: round(float(np.median(v)), 1) for k, v in waits.items() if v},
        "sample": imagery + lidar,
    }


def full_search_pages(intersects: dict[str, Any], imagery: list, lidar: list) -> int:
    """Pages `find_inputs` fetches for these items: each strip's search, per collection."""
    import shapely

    from geoseg.stac.client import PAGE_SIZE, search_parts

    pages = 0
    for part in search_parts(intersects):
        area = shapely.geometry.shape(part)
        shapely.prepare(area)
        for items in (imagery, lidar):
            feet = shapely.from_wkt([i.footprint_wkt for i in items])
            pages += -(-int(shapely.intersects(area, feet).sum()) // PAGE_SIZE)
    return pages


def plan_phase(work: Path, stac_url: str, region: str, max_pages: int) -> dict[str, Any]:
    """`plan_build` for the whole state, with the paging through the API timed on its own.

    With `max_pages`, each search pages that far only (its rate is measured, the time of all
    pages extrapolated from it) and the plan is made from the same items read from the catalog
    files; the sampled items are checked to equal the catalog's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import geoseg.builder.runner as runner

    paging: dict[str, Any] = {}
    find_inputs = runner.find_inputs

    def timed_find_inputs(url: str, intersects: dict[str, Any], *a: Any, **k: Any) -> Any:
        if max_pages:
            paging["sampled"] = sampled_paging(url, intersects, max_pages)
        t, c = time.perf_counter(), _cpu_s()
        if max_pages:
            imagery, lidar = catalog_items(work, intersects)
        else:
            imagery, lidar = find_inputs(url, intersects, *a, **k)
        paging.update(
            seconds=time.perf_counter() - t,
            cpu_s=_cpu_s() - c,
            rss_gib=_rss_gib(),
            items=len(imagery) + len(lidar),
        )
        if max_pages:
            paging["found"] = (intersects, imagery, lidar)
        return imagery, lidar

    runner.find_inputs = timed_find_inputs
    cfg = runner.BuildConfig(out=str(work / "out"), region=region, stac_url=stac_url, signer="none")
    t0, peak = time.perf_counter(), {}
    with peak_site(peak):
        _, _, planned, search = runner.plan_build(cfg)
    seconds = time.perf_counter() - t0
    peak.pop("bytes", None)
    runnable = [p for p in planned if p.skip_reason is None]
    skipped: dict[str, int] = {}
    for p in planned:
        if p.skip_reason:
            skipped[p.skip_reason] = skipped.get(p.skip_reason, 0) + 1
    wkts = {w: k for k, w in enumerate(dict.fromkeys(p.tile.crs_wkt for p in runnable))}
    table = pa.table(
        {
            "tile_id": [p.tile.id for p in runnable],
            "epsg": np.array([p.tile.epsg or -1 for p in runnable], np.int32),
            "crs": np.array([wkts[p.tile.crs_wkt] for p in runnable], np.int16),
            "col": np.array([p.tile.col for p in runnable], np.int64),
            "row": np.array([p.tile.row for p in runnable], np.int64),
            "gsd": np.array([p.tile.gsd for p in runnable], np.float64),
            "size": np.array([p.tile.size for p in runnable], np.int32),
            "year": np.array([p.imagery[0].year for p in runnable], np.int16),
            "datetime": [p.imagery[0].datetime.isoformat() for p in runnable],
            "lidar_project": [p.lidar[-1].project for p in runnable],
        }
    )
    table = table.replace_schema_metadata(
        {"crs_wkts": json.dumps(list(wkts)), "search": json.dumps(search)}
    )
    pq.write_table(table, work / "planned.parquet")
    counts = {
        "plan_peak_rss": peak,
        "items": {"naip": search["imagery_items"], "3dep-lidar-copc": search["lidar_items"]},
        "planned_tiles": len(planned),
        "tiles": len(runnable),
        "skipped": skipped,
    }
    if max_pages:  # planning = all pages at the sampled rate + the plan made from the items
        sampled = paging["sampled"]
        intersects, imagery, lidar = paging.pop("found")
        catalog = {i.id: i for i in (*imagery, *lidar)}
        sample = sampled.pop("sample")
        sampled["unique_items"] = len(sample)  # items on a strip edge are fetched twice
        sampled["unique_items_equal_to_catalog"] = sum(catalog.get(i.id) == i for i in sample)
        sampled["all_pages"] = full_search_pages(intersects, imagery, lidar)
        sampled["all_pages_s"] = round(sampled["all_pages"] / sampled["pages_per_s"], 1)
        return {
            "seconds": round(sampled["all_pages_s"] + seconds - paging["seconds"], 1),
            "paging_s": sampled["all_pages_s"],
            "paging_sampled": sampled,
            "catalog_read_s": round(paging["seconds"], 1),
            "plan_without_paging_s": round(seconds - paging["seconds"], 1),
            **counts,
        }
    return {
        "seconds": round(seconds, 1),
        "paging_s": round(paging["seconds"], 1),
        "paging_cpu_s": round(paging["cpu_s"], 1),
        "paging_rss_gib": round(paging["rss_gib"], 2),
        "pages_of_1000": search["imagery_items"] // 1000 + search["lidar_items"] // 1000 + 2,
        **counts,
    }


# -- phase 3: end-of-build writing -------------------------------------------------------------
def _template_manifest(work: Path) -> tuple[dict[str, Any], Path]:
    """A real tile's manifest and folder (one tile of the sample, built once under `work`)."""
    out = work / "template"
    tiles = sorted((out / "tiles").glob("*/tile.json")) if out.exists() else []
    if not tiles:
        subprocess.run(
            [
                str(BIN / "geoseg"),
                "build-dataset",
                "--catalog",
                "sample",
                "--max-tiles",
                "1",
                "--workers",
                "1",
                "--no-progress",
                "--out",
                str(out),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tiles = sorted((out / "tiles").glob("*/tile.json"))
    return json.loads(tiles[0].read_text()), tiles[0].parent


def _planned(work: Path) -> tuple[Any, list[str], dict[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(work / "planned.parquet")
    meta = table.schema.metadata
    return table, json.loads(meta[b"crs_wkts"]), json.loads(meta[b"search"])


def stub_manifests(
    table: Any, wkts: list[str], template: dict[str, Any], start: int, stop: int, sizes: bool = True
) -> list[dict[str, Any]]:
    """Manifests of planned tiles [start, stop) as a built tile would have: the template's
    layout with the tile's own grid cell, date, project and (seeded) counts and sums."""
    from geoseg.classes import N3C

    rng = np.random.default_rng(start)
    cols = {
        k: table.column(k).slice(start, stop - start).to_pylist()
        for k in (
            "tile_id",
            "epsg",
            "crs",
            "col",
            "row",
            "gsd",
            "size",
            "year",
            "datetime",
            "lidar_project",
        )
    }
    out = []
    for i in range(stop - start):
        size, gsd = cols["size"][i], cols["gsd"][i]
        span = size * gsd
        pixels = rng.multinomial(size * size, [0.3, 0.05, 0.35, 0.25, 0.05])
        points = rng.multinomial(int(rng.integers(50_000, 400_000)), [0.05, 0.02, 0.4, 0.45, 0.08])
        m = dict(template)
        col, row = cols["col"][i], cols["row"][i]
        m |= {
            "tile_id": cols["tile_id"][i],
            "tile": {
                "bounds": [col * span, row * span, (col + 1) * span, (row + 1) * span],
                "col": col,
                "crs_wkt": wkts[cols["crs"][i]],
                "epsg": cols["epsg"][i],
                "gsd": gsd,
                "row": row,
                "size": size,
            },
            "datetime": cols["datetime"][i],
            "year": cols["year"][i],
            "missing_bands": [],
            "inputs": {**template["inputs"], "lidar_project": cols["lidar_project"][i]},
            "pixels": dict(zip(N3C.names, map(int, pixels), strict=True)),
            "points": {
                "asprs": {
                    "1": int(points[0]),
                    "2": int(points[2]),
                    "5": int(points[3]),
                    "6": int(points[4]),
                    "9": int(points[1]),
                },
                "count": int(points.sum()),
                "n3c": dict(zip(N3C.names, map(int, points), strict=True)),
            },
            "stats": {
                layer: {
                    "count": [int(size * size)] * bands,
                    "sum": (rng.random(bands) * 1e7).tolist(),
                    "sumsq": (rng.random(bands) * 1e10).tolist(),
                }
                for layer, bands in (("image", 4), ("dsm", 1), ("intensity", 1))
            },
            "files": {
                name: {"sha256": meta["sha256"], "size": meta["size"] if sizes else 0}
                for name, meta in template["files"].items()
            },
        }
        out.append(m)
    return out


def outputs_phase(work: Path, region: str) -> dict[str, Any]:
    """Fold stub manifests into rows as the driver does, then time `write_outputs`."""
    from geoseg.builder.ledger import TileRows
    from geoseg.builder.report import BuildSummary, preview_picks
    from geoseg.builder.runner import BuildConfig, write_outputs
    from geoseg.regions import resolve_region

    table, wkts, search = _planned(work)
    template, template_dir = _template_manifest(work)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n, batch, parts, fold_s = len(table), 2048, [], 0.0
    for start in range(0, n, batch):
        manifests = stub_manifests(table, wkts, template, start, min(n, start + batch))
        t = time.perf_counter()
        parts.append(TileRows.from_manifests(manifests))
        fold_s += time.perf_counter() - t
    rss_rows = _rss_gib()
    summary = BuildSummary(out)
    summary.statuses["built"] = n
    cfg = BuildConfig(out=str(out), region=region, stac_url=search["stac_url"], signer="none")
    t0, c0 = time.perf_counter(), _cpu_s()
    rows = TileRows.concat(parts).sorted()
    del parts
    # The preview draws 4 tiles: give exactly those the template tile's files.
    ids = rows.tile_id.to_numpy(zero_copy_only=False)
    for tile_id in preview_picks(
        ids, rows.epsg, (rows.pixels[:, 1:] > 0).sum(axis=1), rows.pixels[:, 0], 4
    ):
        shutil.copytree(template_dir, out / "tiles" / tile_id)
    del ids
    before, peak = psutil.Process().memory_info().rss / 2**30, {}
    with peak_site(peak):
        write_outputs(out, rows, cfg, resolve_region(region), summary, search, t0)
    peak.pop("bytes", None)
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - c0
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out)
        if path.is_file() and rel.parts[0] not in ("tiles", "catalogs"):
            files[str(rel)] = path.stat().st_size
    catalogs = [p.stat().st_size for p in (out / "catalogs").rglob("*.json")]
    files["catalogs/<grid>/<block>.json"] = max(catalogs)
    return {
        "tiles": n,
        "fold_s": round(fold_s, 1),
        "fold_us_per_tile": round(fold_s / max(n, 1) * 1e6, 1),
        "rows_rss_gib": round(rss_rows, 2),
        "rss_before_write_gib": round(before, 2),
        "write_peak_rss": peak,
        "seconds": round(seconds, 1),
        "write_cpu_s": round(cpu, 1),
        "file_bytes": files,
        "catalog_files": len(catalogs),
        "catalog_bytes_total": sum(catalogs),
        "largest_file_mb": round(max(files.values()) / 1e6, 1),
    }


# -- phase 4: the resume scan ------------------------------------------------------------------
def scan_phase(work: Path, tiles: int) -> dict[str, Any]:
    """Finished stub tiles on disk, then `resume_scan` over them with 2 dask workers."""
    from dask.distributed import Client, LocalCluster

    from geoseg.builder.catalog import write_item
    from geoseg.builder.ledger import LEDGER, TileRows, write_ledger
    from geoseg.builder.runner import resume_scan
    from geoseg.builder.writers import write_json

    table, wkts, _ = _planned(work)
    template, _ = _template_manifest(work)
    tiles = min(tiles, len(table))
    out = work / "scan"
    ready = out / "ready.json"
    if not ready.exists() or json.loads(ready.read_text()) != tiles:
        shutil.rmtree(out, ignore_errors=True)
        (out / "empty").mkdir(parents=True)
        for start in range(0, tiles, 4096):
            for m in stub_manifests(table, wkts, template, start, min(tiles, start + 4096), False):
                folder = out / "tiles" / m["tile_id"]
                folder.mkdir(parents=True)
                # ext4 allows 65 000 links to a file: a pool of empty files stands in for data
                for k, name in enumerate(m["files"]):
                    target = out / "empty" / f"{(start // 8192) % 64}_{k}"
                    target.touch()
                    os.link(target, folder / name)
                write_json(folder / "tile.json", m)
                write_item(folder, m)
        ready.write_text(json.dumps(tiles))
    ids = table.column("tile_id").slice(0, tiles).to_pylist()
    shutil.rmtree(out / LEDGER, ignore_errors=True)
    timings = {}
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(lambda: __import__("geoseg.builder.tile"))
        # First without a ledger (a build killed before its end: every manifest is read),
        # then with the ledger the finished build leaves (a few stat calls per tile).
        for name in ("manifests", "ledger"):
            t0 = time.perf_counter()
            parts, todo = resume_scan(client, out, ids)
            timings[name] = time.perf_counter() - t0
            found = sum(map(len, parts))
            if todo or found != tiles:
                raise SystemExit(f"scan found {found} of {tiles} finished tiles")
            write_ledger(out, TileRows.concat(parts).sorted())
    total = len(table)
    return {
        "scanned_tiles": tiles,
        "planned_tiles": total,
        **{
            f"{name}_{key}": value
            for name, seconds in timings.items()
            for key, value in (
                ("s", round(seconds, 1)),
                ("us_per_tile", round(seconds / tiles * 1e6, 1)),
                ("s_at_planned_tiles", round(seconds / tiles * total, 1)),
            )
        },
    }


# -- entry point ------------------------------------------------------------------------------
def _table(result: dict[str, Any]) -> str:
    plan, outputs, scan = (result.get(k, {}) for k in ("plan", "outputs", "scan"))
    rows = [
        ("planning (paging + grid)", plan.get("seconds"), TARGETS["plan_s"], "s"),
        ("  paging through the API", plan.get("paging_s"), None, "s"),
        ("planning peak RSS", plan.get("rss_gib"), TARGETS["plan_rss_gib"], "GiB"),
        ("end-of-build writing", outputs.get("seconds"), TARGETS["outputs_s"], "s"),
        ("end-of-build peak RSS", outputs.get("rss_gib"), TARGETS["outputs_rss_gib"], "GiB"),
        (
            "resume scan at the planned count",
            scan.get("ledger_s_at_planned_tiles"),
            TARGETS["scan_s"],
            "s",
        ),
        ("  without the ledger", scan.get("manifests_s_at_planned_tiles"), None, "s"),
        ("largest output file", outputs.get("largest_file_mb"), TARGETS["largest_file_mb"], "MB"),
    ]
    lines = [f"{'measure':36} {'value':>10} {'target':>8}", "-" * 58]
    for name, value, target, unit in rows:
        ok = "" if value is None or target is None else ("ok" if value <= target else "MISSED")
        lines.append(
            f"{name:36} {value if value is not None else '-':>10} "
            f"{target if target is not None else '':>8} {unit:4} {ok}"
        )
    lines.append(f"tiles: {plan.get('tiles')} (planned {plan.get('planned_tiles')})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/geoseg-state"))
    parser.add_argument("--only", default="catalog,plan,outputs,scan")
    parser.add_argument("--scan-tiles", type=int, default=200_000)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--stac-url", help="plan against this API instead of starting pgstac")
    parser.add_argument(
        "--max-pages",
        type=int,
        default=0,
        help="page each search this far only, extrapolate, plan from the catalog files",
    )
    parser.add_argument("--region", default="CA", help="a county, for a quick trial run")
    parser.add_argument("--max-rss-gib", type=float, default=6.0, help="kill a phase above this")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase here
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase:
        run = {
            "catalog": lambda: write_catalog(args.work),
            "plan": lambda: plan_phase(args.work, args.stac_url, args.region, args.max_pages),
            "outputs": lambda: outputs_phase(args.work, args.region),
            "scan": lambda: scan_phase(args.work, args.scan_tiles),
        }[args.phase]
        result = run() | {"rss_gib": round(_rss_gib(), 2), "cpu_s": round(_cpu_s(), 1)}
        (args.work / f"{args.phase}.json").write_text(json.dumps(result, indent=2))
        return
    only = args.only.split(",")
    result: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    result["machine"] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "measured": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    result["targets"] = TARGETS
    if "catalog" in only:
        result["catalog"] = run_phase("catalog", args)
    elif (args.work / "catalog.json").exists():  # the catalog of an earlier run, reused
        result["catalog"] = json.loads((args.work / "catalog.json").read_text())
    if "plan" in only:
        if args.stac_url:
            result["plan"] = run_phase("plan", args)
        else:
            with postgres(args.work) as (dsn, pg_pid):
                load = load_catalog(dsn, args.work)
                with stac_api(dsn, args.work) as (url, api_pid):
                    args.stac_url = url
                    result["plan"] = run_phase("plan", args, [pg_pid, api_pid])
                    result["plan"]["server"] = {
                        "stack": "PostgreSQL 15 + PostGIS 3.3 + pgstac 0.10, rustac serve --pgstac",
                        "api_peak_rss_gib": round(_hwm_gib(api_pid), 2),
                        "postgres_largest_rss_gib": round(
                            max(_hwm_gib(p.pid) for p in _tree(pg_pid)), 2
                        ),
                        **load,
                    }
                args.stac_url = None
    if "outputs" in only:
        result["outputs"] = run_phase("outputs", args)
    if "scan" in only:
        result["scan"] = run_phase("scan", args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))


if __name__ == "__main__":
    main()
