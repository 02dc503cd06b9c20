"""Fixtures for the plugin tests: real QGIS (pytest-qgis), the real engine in the repo's .venv.

Run with the light QGIS venv (Debian's /usr/bin/python3 + pytest-qgis, no torch), e.g.
`xvfb-run -a .qgis-venv/bin/python -m pytest qgis_plugin/tests` (see `make test`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "qgis_plugin"))
ENGINE = os.environ.get("GEOSEG_ENGINE_PYTHON") or str(ROOT / ".venv" / "bin" / "python")
SAMPLE = ROOT / "data_catalog" / "sample" / "assets"
# The sample's Lambert-93 scene (0.5 m RGBN, `make demo` segments it) and its LiDAR (COPC).
SCENE = SAMPLE / "naip" / "fr_lambert93_0484_6633_050_2024.tif"
COPC = SAMPLE / "3dep-lidar-copc" / "FR_L93_LPC_2024_0484_6633.copc.laz"
# A 64 m square inside the scene with dense LiDAR: a few IKD-Net windows, seconds on a CPU.
SCENE_EXTENT = (484780.0, 484844.0, 6632780.0, 6632844.0)
# An EPT point cloud (what Debian's QGIS 3.22 opens as a point cloud layer: it has no PDAL or
# COPC provider) with the sample COPC's points and CRS, in LAS 1.2 format 3 (3.22 draws it).
MAKE_EPT = """
import json, sys
from pathlib import Path
import laspy, numpy as np
src, out = laspy.read(sys.argv[1]), Path(sys.argv[2])
(out / "ept-data").mkdir(parents=True)
(out / "ept-hierarchy").mkdir()
header = laspy.LasHeader(point_format=3, version="1.2")
header.offsets, header.scales = src.header.offsets, src.header.scales
header.add_crs(src.header.parse_crs())
node = laspy.LasData(header)
node.x, node.y, node.z, node.intensity = src.x, src.y, src.z, src.intensity
node.classification = np.minimum(np.asarray(src.classification), 31)
node.write(out / "ept-data" / "0-0-0-0.laz")
lo, hi = src.header.mins, src.header.maxs
side = float(max(hi - lo))
dims = [dict(name=n, type=t, size=z) for n, t, z in (("X", "signed", 4), ("Y", "signed", 4),
        ("Z", "signed", 4), ("Intensity", "unsigned", 2), ("Classification", "unsigned", 1))]
for dim, scale, offset in zip(dims, src.header.scales, src.header.offsets):
    dim.update(scale=float(scale), offset=float(offset))
crs = src.header.parse_crs()
(out / "ept.json").write_text(json.dumps(dict(
    bounds=[*lo.tolist(), *(lo + side).tolist()], boundsConforming=[*lo.tolist(), *hi.tolist()],
    dataType="laszip", hierarchyType="json", points=len(src.points), schema=dims, span=128,
    srs=dict(wkt=crs.to_wkt(), authority="EPSG", horizontal=str(crs.to_epsg())),
    version="1.0.0")))
(out / "ept-hierarchy" / "0-0-0-0.json").write_text(json.dumps({"0-0-0-0": len(src.points)}))
"""


@pytest.fixture(scope="session", autouse=True)
def repo_data_untouched() -> Iterator[None]:
    """No test (nor the plugin, the engine or QGIS under it) writes into the repo's sample data:
    a stray `.aux.xml` there once came from a test opening the sample scene as a QGIS layer."""
    data = ROOT / "data_catalog"
    before = listing(data)
    yield
    assert listing(data) == before, sorted(listing(data) ^ before)


@pytest.fixture(scope="session", autouse=True)
def engine_env(tmp_path_factory: pytest.TempPathFactory, qgis_app: Any) -> Iterator[str]:
    """Point the plugin at the repo's engine; keep the engine's state and the plugin's outputs
    out of the user's home."""
    from geoseg_qgis import models
    from qgis.core import QgsSettings

    models.registry_path().unlink(missing_ok=True)  # .qgis-settings outlives test sessions
    state = tmp_path_factory.mktemp("state")
    saved = {k: os.environ.get(k) for k in ("GEOSEG_ENGINE_PYTHON", "XDG_STATE_HOME")}
    os.environ.update(GEOSEG_ENGINE_PYTHON=ENGINE, XDG_STATE_HOME=str(state))
    QgsSettings().setValue("geoseg/output_folder", str(tmp_path_factory.mktemp("outputs")))
    yield ENGINE
    QgsSettings().remove("geoseg")
    models.registry_path().unlink(missing_ok=True)
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
def ikdnet_checkpoint(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's model: a 2-step IKD-Net (configs/ikdnet-tiny.yaml) trained by geoseg:train."""
    out = tmp_path_factory.mktemp("train") / "ikdnet"
    params = {
        "CONFIG": str(ROOT / "configs" / "ikdnet-tiny.yaml"),
        "DATA": str(sample_data),
        "MAX_STEPS": 2,
        "OUTPUT": str(out),
    }
    return Path(run_alg("train", params)["CHECKPOINT"])


@pytest.fixture(scope="session")
def user_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder with the sample scene, its COPC and an EPT of it: the side-effect checks
    look for files appearing here."""
    folder = tmp_path_factory.mktemp("user")
    for source in (SCENE, COPC):
        (folder / source.name).write_bytes(source.read_bytes())
    subprocess.run(
        [ENGINE, "-c", MAKE_EPT, str(COPC), str(folder / "ept")], check=True, timeout=120
    )
    seen_in_qgis(folder / SCENE.name)
    return folder


def seen_in_qgis(raster: Path) -> None:
    """The user has looked at `raster` in QGIS before: QGIS itself (its default renderer's
    contrast stretch) keeps approximate band statistics in `raster.aux.xml`, written when the
    layer closes. That file is QGIS's, not the plugin's; making it first lets the side-effect
    checks see every file the plugin writes, including at layer close."""
    from qgis.core import QgsMapRendererSequentialJob, QgsMapSettings, QgsRasterLayer
    from qgis.PyQt.QtCore import QSize

    layer = QgsRasterLayer(str(raster), "seen")
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(layer.crs())
    settings.setExtent(layer.extent())
    settings.setOutputSize(QSize(64, 64))
    job = QgsMapRendererSequentialJob(settings)
    job.start()
    job.waitForFinished()
    del job, settings, layer


def write_raster(
    path: Path, epsg: int, origin: tuple[float, float], size: int, bands: int, fill: int = 0
) -> Path:
    """A north-up uint8 GeoTIFF at 0.5 m (QGIS's own GDAL)."""
    from osgeo import gdal, osr

    ds = gdal.GetDriverByName("GTiff").Create(str(path), size, size, bands, gdal.GDT_Byte)
    ds.SetGeoTransform([origin[0], 0.5, 0, origin[1], 0, -0.5])
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    ds.SetProjection(srs.ExportToWkt())
    for band in range(bands):
        ds.GetRasterBand(band + 1).Fill(fill)
    ds = None
    return path


def listing(folder: Path) -> set[str]:
    """Every path below `folder`, relative (to compare before and after)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


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


def wait_for(condition: Any, timeout: float = 240.0) -> None:
    """Let QGIS's event loop run (tasks finish, signals arrive) until `condition()` holds."""
    from qgis.PyQt.QtWidgets import QApplication

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        QApplication.processEvents()
        time.sleep(0.05)


def flush_deletes() -> None:
    """Run Qt's pending deleteLater()s, as the event loop would after a window closes."""
    from qgis.PyQt.QtCore import QCoreApplication, QEvent

    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    QCoreApplication.processEvents()


def opened(action: Any) -> Any:
    """Click a toolbar/menu action; the window that appeared (as a user sees it: the newest
    visible top-level window)."""
    from qgis.PyQt.QtWidgets import QApplication

    def visible() -> list[Any]:
        return [w for w in QApplication.allWidgets() if w.isWindow() and w.isVisible()]

    before = {id(w) for w in visible()}
    action.trigger()
    QApplication.processEvents()
    new = [w for w in visible() if id(w) not in before]
    assert len(new) == 1, new
    return new[0]


@pytest.fixture(scope="module")
def plugin(qgis_iface: Any, qgis_processing: Any) -> Iterator[Any]:
    """The plugin as QGIS loads it (classFactory + initGui), unloaded after the module."""
    from geoseg_qgis import classFactory
    from qgis.core import QgsApplication
    from qgis.gui import QgsBrowserGuiModel

    registry = QgsApplication.processingRegistry()
    session = registry.providerById("geoseg")
    if session is not None:  # the algorithm tests' provider: the plugin must own its own
        registry.removeProvider(session)
    browser = QgsBrowserGuiModel()  # the real iface has one; Processing dialogs ask for it
    qgis_iface.browserModel = lambda: browser
    instance = classFactory(qgis_iface)
    instance.initGui()
    yield instance
    instance.unload()
    if session is not None:
        from geoseg_qgis.provider import GeosegProvider

        registry.addProvider(GeosegProvider())


@pytest.fixture()
def qgis_errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Python errors a user would see: exceptions raised in Qt slots (QGIS shows them in an
    error pop-up) and Python tracebacks in QGIS's message log. Asserted empty after the test.
    (A failed algorithm's own message in the Processing log is not one of them.)"""
    from qgis.core import QgsApplication

    errors: list[str] = []

    def hook(kind: type, value: BaseException, tb: Any) -> None:
        errors.append(f"{kind.__name__}: {value}")

    def logged(text: str, tag: str, level: Any) -> None:
        if tag.startswith("Python") or "Traceback" in text:
            errors.append(f"[{tag}] {text}")

    monkeypatch.setattr(sys, "excepthook", hook)
    log = QgsApplication.messageLog()
    log.messageReceived.connect(logged)
    yield errors
    log.messageReceived.disconnect(logged)
    assert not errors, errors
