"""Headless: `geoseg qgis install` into a fresh QGIS profile, then `qgis_process run geoseg:...`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ENGINE
from test_algorithms import _engine_processes

pytestmark = pytest.mark.timeout(300)
# Debian's qgis_process wrapper passes --noversioncheck from /etc/default/qgis, which the
# 3.22 binary rejects; the .bin is the real tool.
QGIS_PROCESS = shutil.which("qgis_process.bin") or shutil.which("qgis_process")


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240, check=False)


@pytest.mark.skipif(QGIS_PROCESS is None, reason="qgis_process not installed")
def test_installed_plugin_runs_in_qgis_process(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "qgis"),
        "QT_QPA_PLATFORM": "offscreen",
        "PYTHONWARNINGS": "always::ResourceWarning",
    }
    env.pop("GEOSEG_ENGINE_PYTHON", None)  # the plugin must find the engine from the install
    installed = run([ENGINE, "-m", "geoseg.cli", "qgis", "install"], env)
    assert installed.returncode == 0, installed.stderr
    enabled = run([QGIS_PROCESS, "plugins", "enable", "geoseg_qgis"], env)
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    listed = run([QGIS_PROCESS, "list"], env)
    assert "geoseg:segment" in listed.stdout and "geoseg:builddataset" in listed.stdout
    res = run([QGIS_PROCESS, "--json", "run", "geoseg:diagnostics"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(json.loads(res.stdout[res.stdout.index("{") :])["results"]["REPORT"])
    assert report["engine_python"] == ENGINE and report["device"] == "cpu"
    # Fails before: `ResourceWarning: unclosed file` (the engine's pipes were never closed).
    assert "ResourceWarning" not in res.stdout + res.stderr
    # The engine goes with qgis_process (its stdin closes; it finishes and exits).
    deadline = time.monotonic() + 60
    while report["pid"] in _engine_processes():
        assert time.monotonic() < deadline, "the engine outlived qgis_process"
        time.sleep(0.2)
