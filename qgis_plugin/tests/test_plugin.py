"""The plugin in a QGIS GUI (pytest-qgis iface, Xvfb in `make test`): load, click, unload."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.PyQt.QtWidgets import QApplication

pytestmark = pytest.mark.timeout(300)


@pytest.fixture()
def plugin(qgis_iface: Any, qgis_processing: Any) -> Iterator[Any]:
    """The plugin as QGIS loads it (classFactory + initGui), unloaded afterwards."""
    from geoseg_qgis import classFactory

    registry = QgsApplication.processingRegistry()
    session = registry.providerById("geoseg")
    if session is not None:  # the algorithm tests' provider: the plugin must own its own
        registry.removeProvider(session)
    from qgis.gui import QgsBrowserGuiModel

    browser = QgsBrowserGuiModel()  # the real iface has one; Processing dialogs ask for it
    qgis_iface.browserModel = lambda: browser
    instance = classFactory(qgis_iface)
    instance.initGui()
    yield instance
    instance.unload()
    if session is not None:
        from geoseg_qgis.provider import GeosegProvider

        registry.addProvider(GeosegProvider())


def wait_for(condition: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        QApplication.processEvents()
        time.sleep(0.05)


def test_load_and_unload(qgis_iface: Any, qgis_processing: Any) -> None:
    from geoseg_qgis import classFactory

    registry = QgsApplication.processingRegistry()
    session = registry.providerById("geoseg")
    if session is not None:
        registry.removeProvider(session)
    instance = classFactory(qgis_iface)
    instance.initGui()
    provider = registry.providerById("geoseg")
    assert provider is not None and len(provider.algorithms()) == 7
    assert {"build", "train", "segment", "search", "settings", "diagnostics"} == set(
        instance.actions
    )
    instance.unload()
    assert registry.providerById("geoseg") is None and not instance.actions
    if session is not None:
        from geoseg_qgis.provider import GeosegProvider

        registry.addProvider(GeosegProvider())


def test_toolbar_actions_open_prefilled_dialogs(
    plugin: Any, qgis_iface: Any, qgis_canvas: Any, tmp_path: Path
) -> None:
    """Build takes the canvas extent; Segment the active raster layer; Settings saves."""
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    qgis_canvas.setExtent(QgsRectangle(-13580000, 4480000, -13570000, 4490000))
    plugin.actions["build"].trigger()
    build = plugin.dialogs[-1]
    assert build.isVisible() and build.algorithm().id() == "geoseg:builddataset"
    extent = build.mainWidget().wrappers["EXTENT"].parameterValue()
    assert str(extent).startswith("-135")

    from osgeo import gdal, osr

    scene = tmp_path / "scene.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(scene), 32, 32, 4, gdal.GDT_Byte)
    ds.SetGeoTransform([600000, 0.5, 0, 4130000, 0, -0.5])
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32610)
    ds.SetProjection(srs.ExportToWkt())
    ds = None
    layer = QgsRasterLayer(str(scene), "scene")
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    plugin.actions["segment"].trigger()
    segment = plugin.dialogs[-1]
    assert segment.algorithm().id() == "geoseg:segment"
    assert segment.mainWidget().wrappers["INPUT"].parameterValue() in (layer, layer.id())
    plugin.actions["train"].trigger()
    assert plugin.dialogs[-1].algorithm().id() == "geoseg:train"

    plugin.actions["settings"].trigger()
    dialog = plugin.dialogs[-1]
    dialog.device.setCurrentText("cpu")
    dialog.accept()
    from geoseg_qgis import settings

    assert settings.device() == "cpu"
    settings.save("", "auto", "")  # pytest-qgis keeps .qgis-settings between sessions
    QgsProject.instance().removeMapLayer(layer.id())


def test_diagnostics_button_shows_engine_report(plugin: Any) -> None:
    plugin.actions["diagnostics"].trigger()
    wait_for(lambda: plugin.task is None and plugin.dialogs)
    text = plugin.dialogs[-1].text()
    assert json.loads(text)["device"] == "cpu"


def test_search_dock_shows_hits_zooms_and_adds_layer(
    plugin: Any, qgis_iface: Any, qgis_canvas: Any, tmp_path: Path
) -> None:
    """A hits file in the dock: ranked list, click zooms the canvas, hits become a layer."""
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    plugin.actions["search"].trigger()
    dock = plugin.dock
    assert not dock.isHidden()
    hits = tmp_path / "hits.geojson"
    square = [[-121.90, 37.30], [-121.899, 37.30], [-121.899, 37.301], [-121.90, 37.301]]
    features = [
        {
            "type": "Feature",
            "id": f"tile{i}",
            "geometry": {"type": "Polygon", "coordinates": [[*square, square[0]]]},
            "properties": {"rank": i + 1, "score": 0.9 - i / 10, "tile_id": f"tile{i}"},
        }
        for i in range(3)
    ]
    hits.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    dock.query.setText("trees next to buildings")
    dock.show_hits(str(hits))
    assert dock.results.count() == 3 and dock.results.item(0).text().startswith("1. tile0")
    dock.zoom_to(dock.results.item(0))
    assert qgis_canvas.extent().width() < 1000  # zoomed onto one ~90 m tile
    layer = dock.add_layer()
    assert layer is not None and layer.featureCount() == 3
    QgsProject.instance().removeMapLayer(layer.id())
    save_screenshot(dock, tmp_path)


def save_screenshot(dock: Any, tmp_path: Path) -> None:
    """The dock as a floating window; GEOSEG_QGIS_SCREENSHOT=path also keeps it (docs/img)."""
    dock.setFloating(True)
    dock.resize(520, 560)
    dock.show()
    QApplication.processEvents()
    shot = tmp_path / "dock.png"
    assert dock.grab().save(str(shot)) and shot.stat().st_size > 1000
    if os.environ.get("GEOSEG_QGIS_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["GEOSEG_QGIS_SCREENSHOT"])


def test_search_dock_real_search(
    plugin: Any, qgis_canvas: Any, search_index: Path, tmp_path: Path
) -> None:
    """Text query -> geoseg:search in the background -> ranked hits with tile thumbnails.

    GEOSEG_QGIS_INDEX=folder searches a real (trained) index instead, e.g. for the screenshot.
    """
    plugin.actions["search"].trigger()
    dock = plugin.dock
    dock.index.setFilePath(os.environ.get("GEOSEG_QGIS_INDEX") or str(search_index))
    dock.query.setText("trees next to buildings")
    dock.search()
    wait_for(lambda: dock.task is None, timeout=240)
    assert dock.results.count() > 0, dock.status.text()
    assert not dock.results.item(0).icon().isNull()
    save_screenshot(dock, tmp_path)
