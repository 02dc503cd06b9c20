"""Serve an on-disk catalog as a local STAC API with `rustac serve`.

`--catalog sample` and the tests go through this server so that they exercise exactly the
pystac-client code path used against Planetary Computer. Layout of a catalog folder:
`collections/*.json` (one Collection each) and `items/*.json` (one FeatureCollection each) whose
asset hrefs are relative to the items file, absolute paths, `file://` URIs or URLs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from geoseg.regions import data_catalog_dir
from geoseg.stac.errors import StacError

STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
LOG_TAIL_CHARS = 1000


def sample_catalog_dir() -> Path:
    """The embedded sample catalog: `<data_catalog>/sample` (see `geoseg.regions`)."""
    return data_catalog_dir() / "sample"


@contextmanager
def serve_catalog(
    catalog_dir: Path, host: str = "127.0.0.1", port: int | None = None
) -> Iterator[str]:
    """Serve `catalog_dir` while the context is open; yields the API URL `http://host:port`.

    rustac keeps asset hrefs verbatim and pystac resolves non-URL hrefs against the API URL, so
    every local href is rewritten to an absolute `file://` URI in a temporary copy first.
    """
    catalog_dir = Path(catalog_dir)
    collections = sorted((catalog_dir / "collections").glob("*.json"))
    item_files = sorted((catalog_dir / "items").glob("*.json"))
    if not collections:
        raise StacError(f"catalog {catalog_dir} has no collections/*.json")
    rustac = _rustac_executable()
    port = port or _free_port(host)
    with tempfile.TemporaryDirectory(prefix="geoseg-stac-") as tmp:
        work = Path(tmp)
        hrefs = [
            _rewritten_copy(path, work / f"collection-{i}.json", feature_collection=False)
            for i, path in enumerate(collections)
        ] + [
            _rewritten_copy(path, work / f"items-{i}.json", feature_collection=True)
            for i, path in enumerate(item_files)
        ]
        log_path = work / "rustac.log"
        # `--use-duckdb false`: the DuckDB backend downloads an extension at runtime and hangs
        # every request offline; the in-memory backend needs nothing.
        command = [rustac, "serve", "--use-duckdb", "false", "--addr", f"{host}:{port}", *hrefs]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            url = f"http://{host}:{port}"
            _wait_until_ready(url, process, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _rustac_executable() -> str:
    """Prefer the rustac of this environment (the venv may not be on PATH)."""
    beside = Path(sys.executable).with_name("rustac")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("rustac")
    if found is None:
        raise StacError("the `rustac` executable is missing; install it with `pip install rustac`")
    return found


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _rewritten_copy(source: Path, target: Path, *, feature_collection: bool) -> str:
    try:
        document = json.loads(source.read_text())
    except (OSError, ValueError) as err:
        raise StacError(f"cannot read catalog file {source}: {err}") from err
    if feature_collection:
        if document.get("type") != "FeatureCollection":
            raise StacError(f"{source} is not a GeoJSON FeatureCollection of STAC items")
        objects = document.get("features", [])
    else:
        objects = [document]
    for obj in objects:
        for asset in (obj.get("assets") or {}).values():
            if asset.get("href"):
                asset["href"] = _absolute_href(asset["href"], source.parent)
    target.write_text(json.dumps(document))
    return str(target)


def _absolute_href(href: str, base: Path) -> str:
    if urlparse(href).scheme:  # URL or file:// URI: already absolute
        return href
    return (base / href).resolve().as_uri()


def _wait_until_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StacError(
                f"rustac serve exited with code {process.returncode}: {_tail(log_path)}"
            )
        try:
            with opener.open(f"{url}/collections", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise StacError(
        f"rustac serve did not answer at {url} within {STARTUP_TIMEOUT_S:.0f} s: {_tail(log_path)}"
    )


def _tail(log_path: Path) -> str:
    text = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    return " | ".join(line for line in text.splitlines() if line.strip()) or "(no output)"
