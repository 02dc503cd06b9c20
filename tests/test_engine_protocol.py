"""The engine protocol (geoseg/protocol.py) and `python -m geoseg.engine` via the plugin's client.

The client is the QGIS plugin's own engine_client (standard library only), so these tests run the
exact code QGIS runs, minus QGIS.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from geoseg.cli import main
from geoseg.engine import options_argv
from geoseg.protocol import (
    PREFIX,
    PROTOCOL_VERSION,
    ProtocolError,
    decode,
    encode,
    message,
    request,
)
from qgis_plugin.geoseg_qgis.engine_client import (
    EngineError,
    EngineProcess,
    WarmEngine,
    run_engine,
)

ROOT = Path(__file__).parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
NOISY_STARTUP = """
import atexit, os
os.write(1, b'noise before the engine starts {"type": "result"}\\n')
atexit.register(lambda: os.write(1, b"@geoseg-protoco noise at exit\\n"))
"""


@pytest.fixture()
def engine_env(tmp_path: Path) -> dict[str, str]:
    """Engine environment with its own state folder and a sitecustomize that writes to fd 1."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NOISY_STARTUP)
    return {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "site"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
    }


def collect(python: str, req: dict[str, Any], env: dict[str, str], **kw: Any) -> tuple[Any, list]:
    seen: list[dict[str, Any]] = []
    try:
        reply: Any = run_engine(python, req, seen.append, env=env, **kw)
    except EngineError as exc:
        reply = exc
    return reply, seen


def test_message_round_trip() -> None:
    for msg in (
        request("train", {"max_steps": 2}, "cpu", []),
        message("progress", percent=12.5, stage="Epoch 0"),
        message("log", level="info", message="ünïcode ✓"),
        message("result", op="predict", summary="ok", outputs={"out": "/x.tif"}),
        message("error", code="failed", message="no tiles", fix=None),
    ):
        line = encode(msg)
        assert line.startswith(PREFIX) and line.endswith("\n") and line.count("\n") == 1
        assert decode(line) == msg and msg["v"] == PROTOCOL_VERSION


def test_decode_ignores_noise_and_rejects_bad_lines() -> None:
    assert decode('{"v": 1, "type": "result"}\n') is None  # no prefix: library noise
    assert decode("Epoch 0: 100%|####|\n") is None
    with pytest.raises(ProtocolError, match="malformed"):
        decode(PREFIX + "{not json\n")
    with pytest.raises(ProtocolError, match="version 99"):
        decode(PREFIX + json.dumps({"v": 99, "type": "log"}) + "\n")
    with pytest.raises(ProtocolError):
        message("error", code="oops", message="x")
    with pytest.raises(ProtocolError):
        message("hello")


def test_options_argv() -> None:
    args = {"max_steps": 4, "no_progress": True, "dry": False, "vector": None, "bbox": [1, 2, 3, 4]}
    assert options_argv(args) == ["--max-steps", "4", "--no-progress", "--bbox", "1", "2", "3", "4"]
    repeated = options_argv({"points": ["a.laz", "b.laz"]}, frozenset({"points"}))
    assert repeated == ["--points", "a.laz", "--points", "b.laz"]


def test_one_engine_serves_request_after_request(engine_env: dict[str, str]) -> None:
    """The warm engine: one process answers several requests; stdin closed, it exits."""
    engine = EngineProcess(PYTHON, engine_env)
    try:
        first = engine.request(request("diagnostics"), lambda m: None)["outputs"]["pid"]
        bad = request("describe", {"checkpoint": "/nonexistent/last.ckpt"})
        with pytest.raises(EngineError, match="checkpoint not found") as info:
            engine.request(bad, lambda m: None)
        assert info.value.code == "bad_input" and "RUN/checkpoints/last.ckpt" in str(info.value)
        again = engine.request(request("diagnostics"), lambda m: None)["outputs"]["pid"]
        assert first == again == engine.pid and engine.alive()
    finally:
        engine.close()
    assert engine.proc.returncode == 0  # the last reply was a result, and it left by itself


def test_warm_engine_restarts_after_a_crash(engine_env: dict[str, str]) -> None:
    warm = WarmEngine()
    try:
        first = warm.run(PYTHON, request("diagnostics"), lambda m: None, env=engine_env)
        pid = first["outputs"]["pid"]
        assert warm.pid == pid
        os.kill(pid, 9)
        time.sleep(0.3)
        second = warm.run(PYTHON, request("diagnostics"), lambda m: None, env=engine_env)
        assert second["outputs"]["pid"] not in (pid, None) and warm.pid == second["outputs"]["pid"]
    finally:
        warm.close()
    assert warm.pid is None


def test_bad_checkpoint_is_answered_without_torch(
    engine_env: dict[str, str], tmp_path: Path
) -> None:
    """The engine checks a checkpoint argument before any heavy import: with torch made
    unimportable it still answers a wrong path with the one-line error and its fix (before:
    only after ~14 s of start-up, or a torch `weights_only` paragraph for a foreign file)."""
    (tmp_path / "site" / "sitecustomize.py").write_text("import sys; sys.modules['torch'] = None\n")
    foreign = tmp_path / "notes.ckpt"
    foreign.write_text("not a model")
    cases = {
        tmp_path / "missing.ckpt": "checkpoint not found",
        foreign: "is not a geoseg checkpoint (not a PyTorch archive, or truncated: ",
    }
    for path, text in cases.items():
        args = {"checkpoint": str(path), "image": str(tmp_path), "out": str(tmp_path / "c.tif")}
        reply, _ = collect(PYTHON, request("predict", args), engine_env)
        assert isinstance(reply, EngineError) and reply.code == "bad_input", reply
        assert text in reply.args[0] and "\n" not in reply.args[0] and reply.fix


FINISHED_THEN_CANCELLED = r"""
import json, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.readline()
def line(msg): return "@geoseg-protocol " + json.dumps(msg)
print(line({"v": 1, "type": "progress", "percent": 100.0, "stage": "predicting"}), flush=True)
time.sleep(0.5)
print(line({"v": 1, "type": "result", "op": "predict", "summary": "predicted", "outputs": {}}),
      flush=True)
time.sleep(2)
"""


def test_work_finished_before_a_cancel_is_kept(tmp_path: Path) -> None:
    """Cancel pressed while the engine finishes (here: after its last progress message): its
    result is returned, not "cancelled" (fails before: the finished prediction was discarded)."""
    script = tmp_path / "engine.py"
    script.write_text(FINISHED_THEN_CANCELLED)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {PYTHON} {script}\n")
    python.chmod(0o755)
    cancel = threading.Event()

    def on_message(msg: dict[str, Any]) -> None:
        if msg["type"] == "progress":
            cancel.set()

    reply = run_engine(str(python), request("predict"), on_message, cancel.is_set, grace_s=5)
    assert reply["type"] == "result" and reply["summary"] == "predicted"


def test_engine_without_geoseg_gets_the_install_fix(tmp_path: Path) -> None:
    """Python prints `No module named 'geoseg'` (quoted): the error says how to fix it."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\nexec /usr/bin/python3 -I "$@"\n')
    python.chmod(0o755)
    with pytest.raises(EngineError) as info:
        run_engine(str(python), request("diagnostics"), lambda m: None)
    assert info.value.code == "missing" and "geoseg qgis install" in str(info.value)


def test_diagnostics_through_stdout_noise(engine_env: dict[str, str]) -> None:
    """Noise on fd 1 before and after the engine runs does not reach or break the protocol."""
    reply, _ = collect(PYTHON, request("diagnostics"), engine_env)
    assert isinstance(reply, dict), reply
    report = reply["outputs"]
    assert report["device"] == "cpu" and report["protocol"] == PROTOCOL_VERSION
    assert report["versions"]["torch"] and "predict" in report["ops"]
    assert report["executable"] == PYTHON and report["last_error"] is None


def test_errors_are_reported_and_remembered(engine_env: dict[str, str], tmp_path: Path) -> None:
    """The CLI's one-line error comes back as the message; diagnostics shows the last one."""
    args = {"config": str(ROOT / "configs" / "ikdnet-tiny.yaml"), "data": str(tmp_path)}
    reply, _ = collect(PYTHON, request("train", {**args, "out": str(tmp_path / "run")}), engine_env)
    assert isinstance(reply, EngineError) and reply.code == "bad_input"
    assert (
        str(reply)
        == f"{tmp_path}/index.parquet not found; is {tmp_path} a geoseg build-dataset output?"
    )
    unknown, _ = collect(PYTHON, request("fly", {}), engine_env)
    assert unknown.code == "bad_input" and "it knows: describe, diagnostics" in str(unknown)
    report, _ = collect(PYTHON, request("diagnostics"), engine_env)
    assert report["outputs"]["last_error"]["op"] == "fly"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_gpu_that_is_not_there_is_an_error_not_a_cpu_run(engine_env: dict[str, str]) -> None:
    reply, _ = collect(PYTHON, request("diagnostics", device="cuda"), engine_env)
    assert isinstance(reply, EngineError) and reply.code == "bad_input"
    assert reply.args[0] == "device 'cuda' asked for, but torch sees 0 CUDA GPU(s) here"
    assert reply.fix == "choose auto or cpu as the device in geoseg's Settings"


def test_incompatible_or_missing_engine(engine_env: dict[str, str], tmp_path: Path) -> None:
    future = {**request("diagnostics"), "v": PROTOCOL_VERSION + 1}
    reply, _ = collect(PYTHON, future, engine_env)
    assert reply.code == "protocol" and "pip install -U geoseg" in str(reply)
    missing, _ = collect(str(tmp_path / "nope" / "python"), request("diagnostics"), engine_env)
    assert missing.code == "missing" and "geoseg qgis install" in str(missing)


@pytest.mark.slow
def test_cancel_stops_training_promptly(
    sample_build: Path, engine_env: dict[str, str], tmp_path: Path
) -> None:
    """Cancel after the first progress message: the engine stops, the run folder stays."""
    cancel = threading.Event()
    seen: list[dict[str, Any]] = []

    def on_message(msg: dict[str, Any]) -> None:
        seen.append(msg)
        if msg["type"] == "progress":
            cancel.set()

    args = {
        "config": str(ROOT / "configs" / "ikdnet-tiny.yaml"),
        "data": str(sample_build),
        "max_steps": 100000,
        "out": str(tmp_path / "run"),
    }
    started = [0.0]

    def cancelled() -> bool:
        if cancel.is_set() and not started[0]:
            started[0] = time.monotonic()
        return cancel.is_set()

    with pytest.raises(EngineError, match="cancelled") as info:
        run_engine(PYTHON, request("train", args), on_message, cancelled, env=engine_env)
    assert info.value.code == "cancelled"
    assert time.monotonic() - started[0] < 15  # graceful stop, not the kill after the grace
    assert (tmp_path / "run" / "config.yaml").exists()
    assert any(m["type"] == "log" for m in seen)


def test_qgis_package_and_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["qgis", "package", "--out", str(tmp_path / "p.zip")])
    assert res.exit_code == 0, res.output
    with zipfile.ZipFile(tmp_path / "p.zip") as zf:
        names = set(zf.namelist())
        shipped = zf.read("geoseg_qgis/protocol.py")
        engine = json.loads(zf.read("geoseg_qgis/engine.json"))
    assert {"geoseg_qgis/metadata.txt", "geoseg_qgis/plugin.py", "geoseg_qgis/icon.png"} <= names
    assert not any("__pycache__" in n or "/tests/" in n for n in names)
    assert shipped == (ROOT / "geoseg" / "protocol.py").read_bytes()
    assert Path(engine["engine_python"]).name.startswith("python")

    monkeypatch.setenv("QGIS_CUSTOM_CONFIG_PATH", str(tmp_path / "qgis"))
    for _ in range(2):  # a reinstall replaces the old copy
        res = runner.invoke(main, ["qgis", "install", "--profile", "ci"])
        assert res.exit_code == 0, res.output
    plugin = tmp_path / "qgis" / "profiles" / "ci" / "python" / "plugins" / "geoseg_qgis"
    assert (plugin / "metadata.txt").exists() and (plugin / "engine.json").exists()
    assert sorted(p.name for p in plugin.parent.iterdir()) == ["geoseg_qgis"]
