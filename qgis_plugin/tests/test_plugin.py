"""The plugin in a QGIS GUI (pytest-qgis iface, Xvfb in `make test`): load, click, unload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import flush_deletes, listing, opened, wait_for, write_raster
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import QApplication, QToolButton
from test_algorithms import fake_engine

pytestmark = pytest.mark.timeout(300)


def test_load_and_unload(qgis_iface: Any, qgis_processing: Any) -> None:
    from geoseg_qgis import classFactory
    from geoseg_qgis.engine_client import WARM

    registry = QgsApplication.processingRegistry()
    session = registry.providerById("geoseg")
    if session is not None:
        registry.removeProvider(session)
    instance = classFactory(qgis_iface)
    instance.initGui()
    provider = registry.providerById("geoseg")
    assert provider is not None and len(provider.algorithms()) == 8
    assert {
        "build",
        "train",
        "evaluate",
        "segment",
        "search",
        "models",
        "settings",
        "diagnostics",
    } == set(instance.actions)
    instance.unload()
    assert registry.providerById("geoseg") is None and not instance.actions
    assert WARM.pid is None  # the session's engine goes with the plugin (QGIS quits)
    if session is not None:
        from geoseg_qgis.provider import GeosegProvider

        registry.addProvider(GeosegProvider())


def test_toolbar_has_distinct_icons_with_text(plugin: Any) -> None:
    """Fails before: five identical icons and no text."""
    images = set()
    for key, action in plugin.actions.items():
        assert action.text() and not action.icon().isNull(), key
        image = action.icon().pixmap(24, 24).toImage()
        images.add(bytes(image.constBits().asarray(image.sizeInBytes())))
    assert len(images) == len(plugin.actions)
    assert plugin.toolbar.toolButtonStyle() == Qt.ToolButtonStyle.ToolButtonTextBesideIcon
    buttons = plugin.toolbar.findChildren(QToolButton)
    shown = {b.text() for b in buttons if b.defaultAction() in plugin.actions.values()}
    assert {"Build dataset", "Train", "Evaluate", "Segment", "Search tiles", "Models"} <= shown


def test_close_a_dialog_then_click_another_button(
    plugin: Any, qgis_iface: Any, qgis_canvas: Any, qgis_errors: list[str]
) -> None:
    """Fails before: `RuntimeError: wrapped C/C++ object of type AlgorithmDialog has been
    deleted` (an error pop-up) on the click after closing any geoseg dialog."""
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
    qgis_canvas.setExtent(QgsRectangle(-13580000, 4480000, -13570000, 4490000))
    for first, second in (("build", "train"), ("segment", "build"), ("train", "segment")):
        window = opened(plugin.actions[first])
        assert window is not None and window.isVisible()
        window.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)  # as Processing's do
        window.close()
        flush_deletes()
        other = opened(plugin.actions[second])
        assert other is not None and other.isVisible() and not qgis_errors
        again = opened(plugin.actions[first])  # reopen
        assert again is not None and again.isVisible() and not qgis_errors
        for shown in (other, again):
            shown.close()


def test_build_dialog_is_prefilled_and_outputs_default_beside_the_project(
    plugin: Any, qgis_canvas: Any, tmp_path: Path
) -> None:
    """Build takes the canvas extent; its output defaults to geoseg/ beside the saved project
    (fails before: a temporary folder that vanishes with the session)."""
    from qgis.core import QgsSettings

    project = QgsProject.instance()
    project.setFileName(str(tmp_path / "study.qgz"))
    chosen = QgsSettings().value("geoseg/output_folder", "")
    QgsSettings().setValue("geoseg/output_folder", "")  # no folder set in Settings
    try:
        qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:3857"))
        qgis_canvas.setExtent(QgsRectangle(-13580000, 4480000, -13570000, 4490000))
        build = plugin.build_dataset()
        assert build.isVisible() and build.algorithm().id() == "geoseg:builddataset"
        wrappers = build.mainWidget().wrappers
        assert str(wrappers["EXTENT"].parameterValue()).startswith("-135")
        assert wrappers["OUTPUT"].parameterValue() == str(tmp_path / "geoseg" / "data")
        build.close()
        segment = plugin.segment_layer()
        assert segment.output.filePath() == str(tmp_path / "geoseg" / "classes.tif")
        segment.close()
    finally:
        project.setFileName("")
        QgsSettings().setValue("geoseg/output_folder", chosen)


def test_settings_dialog_is_usable(plugin: Any, tmp_path: Path) -> None:
    """Fails before: a 280x140 px dialog with cut-off paths and no browse buttons."""
    from geoseg_qgis import settings
    from qgis.gui import QgsFileWidget

    dialog = opened(plugin.actions["settings"])
    assert dialog.windowTitle() == "geoseg settings"
    assert max(dialog.minimumWidth(), dialog.sizeHint().width()) >= 600
    browsers = dialog.findChildren(QgsFileWidget)
    assert {w.storageMode() for w in browsers} >= {
        QgsFileWidget.GetFile,
        QgsFileWidget.GetDirectory,
    }
    outputs = settings.output_setting()
    dialog.device.setCurrentText("cpu")
    dialog.outputs.setFilePath(str(tmp_path / "outputs"))
    dialog.accept()
    try:
        assert settings.device() == "cpu"
        assert settings.output_folder() == tmp_path / "outputs"
    finally:
        settings.save("", "auto", "", str(outputs), True)


def test_diagnostics_is_readable(plugin: Any, qgis_errors: list[str]) -> None:
    """Fails before: the report was raw JSON in a message box."""
    from qgis.PyQt.QtWidgets import QLabel

    plugin.actions["diagnostics"].trigger()

    def report() -> Any:
        for window in QApplication.topLevelWidgets():
            texts = [label.text() for label in window.findChildren(QLabel)]
            if (
                window.isVisible()
                and window.windowTitle() == "geoseg diagnostics"
                and any("cpu" in t for t in texts)
            ):
                return window
        return None

    wait_for(report)
    dialog = report()
    texts = [label.text() for label in dialog.findChildren(QLabel) if label.text()]
    assert not any(t.lstrip().startswith("{") for t in texts), texts  # not raw JSON
    assert "<b>Device used</b>" in texts and "cpu" in texts
    assert any(t.startswith("running (pid") for t in texts)  # the warm engine
    dialog.copy()
    assert json.loads(QApplication.clipboard().text())["device"] == "cpu"
    dialog.close()


def hits_file(folder: Path, data: Path) -> Path:
    """Three hits of the sample build: its first tiles, with lon/lat boxes as `geoseg search`
    writes them."""
    layer = QgsVectorLayer(str(data / "tiles.vrt"), "tiles", "ogr")
    tiles = sorted(layer.getFeatures(), key=lambda f: f["tile_id"])[:3]
    features = []
    for rank, tile in enumerate(tiles, 1):
        r = tile.geometry().boundingBox()
        box = [[r.xMinimum(), r.yMinimum()], [r.xMaximum(), r.yMinimum()],
               [r.xMaximum(), r.yMaximum()], [r.xMinimum(), r.yMaximum()]]  # fmt: skip
        features.append(
            {
                "type": "Feature",
                "id": tile["tile_id"],
                "geometry": {"type": "Polygon", "coordinates": [[*box, box[0]]]},
                "properties": {
                    "rank": rank,
                    "score": 0.9 - rank / 10,
                    "tile_id": tile["tile_id"],
                    "path": tile["path"],
                    "frac_tree": 0.6,
                    "frac_ground": 0.3,
                },
            }
        )
    path = folder / "hits.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture()
def dock(plugin: Any, sample_data: Path, tmp_path: Path) -> Any:
    """The search dock over a fake index folder of the sample build."""
    index = tmp_path / "index"
    index.mkdir()
    (index / "index.yaml").write_text(f"data: {sample_data}\n")
    plugin.actions["search"].trigger()
    dock = plugin.dock
    dock.index.setFilePath(str(index))
    yield dock
    dock.clear()
    QgsProject.instance().removeAllMapLayers()


def test_search_dock_hits_native_outlines_highlight_and_no_side_files(
    dock: Any, qgis_canvas: Any, sample_data: Path, tmp_path: Path, qgis_errors: list[str]
) -> None:
    """Thumbnails without .aux.xml beside the tiles; hits as squares in the tiles' own CRS,
    outlined and labelled with their rank; a click zooms, highlights and selects the hit.
    Fails before: .aux.xml files, opaque random fill, lon/lat boxes, no highlight."""
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:2154"))
    before = listing(sample_data)
    dock.query.setText("trees")
    dock.show_hits(str(hits_file(tmp_path, sample_data)))
    assert dock.results.count() == 3 and dock.results.item(0).text().startswith("1. 2154_")
    assert "tree 60%" in dock.results.item(0).text()
    assert not dock.results.item(0).icon().isNull()
    assert listing(sample_data) == before  # no image.tif.aux.xml beside the user's tiles

    layer = dock.add_layer()
    assert layer is not None and layer.featureCount() == 3
    assert layer.crs().authid() == "EPSG:2154"  # the tiles' own CRS, not lon/lat
    for feature in layer.getFeatures():
        box = feature.geometry().boundingBox()
        assert box.width() == pytest.approx(32.0) and box.height() == pytest.approx(32.0)
        assert feature.geometry().area() == pytest.approx(32.0 * 32.0)  # an axis-aligned square
    symbol = layer.renderer().symbol().symbolLayer(0)
    assert symbol.brushStyle() == Qt.BrushStyle.NoBrush  # outline only
    assert layer.labelsEnabled() and layer.labeling().settings().fieldName == "rank"

    dock.zoom_to(dock.results.item(1))
    assert qgis_canvas.extent().width() < 400  # one 32 m tile and a margin
    assert dock.highlight is not None and dock.highlight.asGeometry().area() == pytest.approx(
        32.0 * 32.0, rel=1e-3
    )
    assert [f["rank"] for f in layer.selectedFeatures()] == [2]
    save_screenshot(dock, tmp_path)


def test_failed_search_clears_stale_hits_and_says_why(
    dock: Any, sample_data: Path, tmp_path: Path, qgis_errors: list[str]
) -> None:
    """Fails before: the old hits stayed and the status showed only the Fix hint."""
    dock.show_hits(str(hits_file(tmp_path, sample_data)))
    assert dock.results.count() == 3
    dock.index.setFilePath(str(sample_data))  # a build folder, not an index
    dock.query.setText("trees")
    dock.search()
    wait_for(lambda: dock.search_button.isEnabled())
    assert dock.results.count() == 0 and not dock.add_button.isEnabled()
    status = dock.status.text()
    assert status.startswith("search failed: geoseg search: ") and "not a tile index" in status


def test_failed_search_shows_the_cause_with_its_fix(
    dock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qgis_errors: list[str]
) -> None:
    """An error that comes with a fix (an engine Python without geoseg): the status line shows
    the cause and the fix (fails before: only the last line, the "Fix:" hint)."""
    python = fake_engine(tmp_path, 'exec /usr/bin/python3 -I "$@"')
    monkeypatch.setenv("GEOSEG_ENGINE_PYTHON", str(python))
    dock.query.setText("trees")
    dock.search()
    wait_for(lambda: dock.search_button.isEnabled())
    status = dock.status.text()
    assert status.startswith("search failed: ") and "has no geoseg installed" in status, status
    assert "Fix: in the geoseg environment run" in status


def save_screenshot(dock: Any, tmp_path: Path) -> None:
    """The dock renders as a floating window (docs' images: test_screenshots.py)."""
    dock.setFloating(True)
    dock.resize(520, 560)
    dock.show()
    QApplication.processEvents()
    shot = tmp_path / "dock.png"
    assert dock.grab().save(str(shot)) and shot.stat().st_size > 1000
    dock.setFloating(False)


def test_search_dock_real_search(
    plugin: Any, qgis_canvas: Any, search_index: Path, tmp_path: Path, qgis_errors: list[str]
) -> None:
    """Text query -> geoseg:search in the background -> ranked hits with tile thumbnails; the
    second search is answered by the warm engine (same process)."""
    from geoseg_qgis.engine_client import WARM

    plugin.actions["search"].trigger()
    dock = plugin.dock
    dock.index.setFilePath(str(search_index))
    pids = []
    for query in ("trees next to buildings", "bare ground"):
        dock.query.setText(query)
        dock.search()
        wait_for(lambda: dock.job is None, timeout=240)
        assert dock.results.count() > 0, dock.status.text()
        assert not dock.results.item(0).icon().isNull()
        # No PNG grid: the dock draws its own thumbnails (the grid was ~2/3 of a warm search)
        assert not Path(dock.hits_path).with_suffix(".png").exists()
        pids.append(WARM.pid)
    assert pids[0] is not None and pids[0] == pids[1]
    dock.clear()


def test_segment_button_uses_the_active_raster(
    plugin: Any, qgis_iface: Any, tmp_path: Path
) -> None:
    scene = write_raster(tmp_path / "scene.tif", 32610, (600000.0, 4130000.0), 32, 4)
    layer = QgsRasterLayer(str(scene), "scene")
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    try:
        dialog = plugin.segment_layer()
        assert dialog.layer.currentLayer() == layer
        assert Path(dialog.output.filePath()).name.startswith("scene_classes")
        dialog.close()
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
