"""Fixtures for the plugin tests: real QGIS (pytest-qgis), the real engine in the repo's .venv.

Run with the light QGIS venv (Debian's /usr/bin/python3 + pytest-qgis, no torch), e.g.
`xvfb-run -a .qgis-venv/bin/python -m pytest qgis_plugin/tests` (see `make test`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "qgis_plugin"))
ENGINE = os.environ.get("GEOSEG_ENGINE_PYTHON") or str(ROOT / ".venv" / "bin" / "python")


@pytest.fixture(scope="session", autouse=True)
def engine_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Point the plugin at the repo's engine; keep the engine's state out of the user's home."""
    state = tmp_path_factory.mktemp("state")
    saved = {k: os.environ.get(k) for k in ("GEOSEG_ENGINE_PYTHON", "XDG_STATE_HOME")}
    os.environ.update(GEOSEG_ENGINE_PYTHON=ENGINE, XDG_STATE_HOME=str(state))
    yield ENGINE
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def provider(qgis_processing: Any) -> Iterator[Any]:
    """The geoseg provider registered in QGIS's processing registry for the session."""
    from geoseg_qgis.provider import GeosegProvider
    from qgis.core import QgsApplication

    registry = QgsApplication.processingRegistry()
    if registry.providerById("geoseg") is not None:  # registered by a loaded plugin
        yield registry.providerById("geoseg")
        return
    assert registry.addProvider(GeosegProvider())
    yield registry.providerById("geoseg")
    if registry.providerById("geoseg") is not None:  # the plugin tests may have replaced it
        registry.removeProvider("geoseg")


def run_alg(name: str, params: dict[str, Any], feedback: Any = None) -> dict[str, Any]:
    """processing.run one geoseg algorithm (raises QgsProcessingException on failure).

    Pass layers as paths or as ids of project layers, as QGIS does: a layer object that is in
    no project, handed to a run that fails, segfaults QGIS 3.22 at exit.
    """
    import processing
    from qgis.core import QgsProcessingFeedback

    return processing.run(f"geoseg:{name}", params, feedback=feedback or QgsProcessingFeedback())


@pytest.fixture(scope="session")
def sample_data(provider: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small build of the embedded sample region made by geoseg:builddataset."""
    out = tmp_path_factory.mktemp("build") / "data"
    result = run_alg("builddataset", {"CATALOG": 1, "MAX_TILES": 24, "OUTPUT": str(out)})
    assert Path(result["OUTPUT"]) == out
    return out


@pytest.fixture(scope="session")
def unet_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny sample config with an image-only U-Net (what Segment can run)."""
    cfg = yaml.safe_load((ROOT / "configs" / "ikdnet-tiny.yaml").read_text())
    cfg["model"] = {"name": "unet", "kwargs": {"widths": [8, 16, 32, 64]}}
    path = tmp_path_factory.mktemp("config") / "unet-tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def checkpoint(
    sample_data: Path, unet_config: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A 2-step U-Net trained by geoseg:train."""
    out = tmp_path_factory.mktemp("train") / "run"
    params = {
        "CONFIG": str(unet_config),
        "DATA": str(sample_data),
        "MAX_STEPS": 2,
        "OUTPUT": str(out),
    }
    result = run_alg("train", params)
    return Path(result["CHECKPOINT"])


@pytest.fixture(scope="session")
def scene(sample_data: Path) -> Path:
    """One real NAIP tile image of the build (R, G, B, NIR at 0.5 m, UTM)."""
    return sorted(sample_data.glob("tiles/*/image.tif"))[0]


@pytest.fixture(scope="session")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained retrieval embedder of the tiny config, saved by the engine's Python.

    Training one takes minutes; ranking quality is not what the plugin tests check.
    """
    out = tmp_path_factory.mktemp("embedder") / "embedder"
    code = (
        "import sys, yaml; from retrieval.embedder import create_embedder; "
        "create_embedder(yaml.safe_load(open(sys.argv[1]))['model']).save(sys.argv[2])"
    )
    config = ROOT / "configs" / "retrieval-tiny.yaml"
    subprocess.run([ENGINE, "-c", code, str(config), str(out)], check=True, timeout=240)
    return out


@pytest.fixture(scope="session")
def search_index(
    sample_data: Path, embedder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The sample build embedded by geoseg:index."""
    out = tmp_path_factory.mktemp("index") / "index"
    params = {"DATA": str(sample_data), "MODEL": str(embedder), "OUTPUT": str(out)}
    assert Path(run_alg("index", params)["OUTPUT"]) == out
    return out
