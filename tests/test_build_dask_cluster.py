"""A build attached to a real multi-process dask cluster: `dask scheduler` + 2 `dask worker`s."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.utils import checksums, geoseg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([_bin("dask"), *args], stdout=f, stderr=subprocess.STDOUT)


@pytest.fixture()
def dask_cluster(tmp_path: Path) -> Iterator[str]:
    """`dask scheduler` + 2 single-threaded `dask worker` processes on 127.0.0.1."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
    procs = [_start(scheduler, tmp_path / "scheduler.log")]
    for i in range(2):
        worker = ["worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                  "--name", f"w{i}", "--local-directory", str(tmp_path / f"w{i}")]  # fmt: skip
        procs.append(_start(worker, tmp_path / f"worker{i}.log"))
    try:
        from dask.distributed import Client

        deadline = time.time() + 60
        with Client(address, timeout="30s") as client:
            while len(client.scheduler_info()["workers"]) < 2:
                assert time.time() < deadline, (tmp_path / "worker0.log").read_text()[-2000:]
                time.sleep(0.2)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_build_through_an_existing_scheduler(dask_cluster: str, sample_build: Path, tmp_path: Path):
    out = tmp_path / "via-scheduler"
    res = geoseg(
        "build-dataset",
        "--catalog",
        "sample",
        "--scheduler",
        dask_cluster,
        "--no-progress",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    assert "attached to" in res.stderr
    report = json.loads((out / "report.json").read_text())
    assert len(report["workers"]) == 2  # both worker processes built tiles
    assert checksums(out) == checksums(sample_build)  # same bytes as a local-cluster build


def test_unreachable_scheduler_is_a_clear_error(tmp_path: Path):
    out = tmp_path / "nope"
    res = geoseg(
        "build-dataset",
        "--catalog",
        "sample",
        "--scheduler",
        f"tcp://127.0.0.1:{_free_port()}",
        "--no-progress",
        "--out",
        str(out),
    )
    assert res.returncode == 1
    assert "dask scheduler" in res.stderr and len(res.stderr.strip().splitlines()) <= 3
