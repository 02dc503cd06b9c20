"""The screenshots of docs/qgis.md, made in real QGIS from the `make demo` outputs.

Skipped unless asked for (it segments the whole sample scene, ~1-2 CPU minutes):

    make demo DEMO=~/geoseg-demo
    make screenshots DEMO=~/geoseg-demo   # = GEOSEG_QGIS_SCREENSHOTS=docs/img GEOSEG_QGIS_DEMO=...
                                          #   xvfb-run -a .qgis-venv/bin/python -m pytest THIS_FILE

GEOSEG_QGIS_DEMO (default runs/demo) is the demo folder. Everything the windows show lives in
`<demo>/qgis/` (the project folder, its outputs folder `geoseg/`, the LiDAR layer, the model
registry), so no temporary path appears in an image.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import COPC, ENGINE, MAKE_EPT, ROOT, SCENE, listing, wait_for
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsMapRendererSequentialJob,
    QgsMapSettings,
    QgsPointCloudLayer,
    QgsProject,
    QgsRasterLayer,
    QgsSettings,
)
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QColor, QImage, QPainter
from qgis.PyQt.QtWidgets import QApplication

OUT = os.environ.get("GEOSEG_QGIS_SCREENSHOTS")
DEMO = Path(os.environ.get("GEOSEG_QGIS_DEMO") or ROOT / "runs" / "demo").resolve()
# What the demo index answers well (#12: its top hits are forest tiles); the test checks it.
QUERY = "coniferous forest"
pytestmark = [
    pytest.mark.skipif(not OUT, reason="set GEOSEG_QGIS_SCREENSHOTS=<folder> to make them"),
    pytest.mark.timeout(1800),
]


def save(widget: Any, name: str) -> Path:
    QApplication.processEvents()
    path = Path(OUT or ".") / name
    assert widget.grab().save(str(path)) and path.stat().st_size > 1000, path
    return path


@pytest.fixture(scope="module")
def demo_project(plugin: Any, qgis_iface: Any, qgis_canvas: Any) -> Any:
    """The user's project folder inside the demo: scene, EPT LiDAR, outputs, model registry."""
    from geoseg_qgis import models

    checkpoint = DEMO / "run" / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        pytest.fail(f"{checkpoint} not found: run `make demo` first")
    folder = DEMO / "qgis"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "lidar").mkdir(parents=True)
    subprocess.run([ENGINE, "-c", MAKE_EPT, str(COPC), str(folder / "lidar" / "ept")], check=True)
    saved = models.registry_path
    models.registry_path = lambda: folder / "models.json"
    QgsSettings().setValue("geoseg/output_folder", "")
    QgsSettings().remove("geoseg/last")
    project = QgsProject.instance()
    project.removeAllMapLayers()
    project.setFileName(str(folder / "demo.qgz"))
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:2154"))
    # The user's copy of the scene: QGIS keeps its statistics beside the rasters it shows, and
    # the repo's sample data must stay as it is (conftest's repo_data_untouched checks it).
    shutil.copy(SCENE, folder / SCENE.name)
    scene = QgsRasterLayer(str(folder / SCENE.name), SCENE.stem)
    cloud = QgsPointCloudLayer(str(folder / "lidar" / "ept" / "ept.json"), "lidar (EPT)", "ept")
    assert scene.isValid() and cloud.isValid()
    project.addMapLayers([scene, cloud])
    qgis_iface.setActiveLayer(scene)
    qgis_canvas.setExtent(scene.extent())
    manager = plugin.model_manager()
    manager.import_file(str(checkpoint))
    manager.use()
    manager.close()
    yield {"folder": folder, "scene": scene, "cloud": cloud, "checkpoint": checkpoint}
    models.registry_path = saved
    project.removeAllMapLayers()
    project.setFileName("")


def test_toolbar(plugin: Any, demo_project: Any) -> None:
    from qgis.PyQt.QtWidgets import QMainWindow

    # pytest-qgis's stand-in main window parents the toolbar without laying it out (100 px wide,
    # folded into its » menu): dock it in a real main window, as QGIS does.
    bar, window = plugin.toolbar, QMainWindow()
    parent = bar.parent()
    window.addToolBar(bar)
    window.resize(bar.sizeHint().width() + 40, 120)
    window.show()
    QApplication.processEvents()
    assert all(bar.widgetForAction(a).isVisible() for a in bar.actions())
    save(bar, "qgis_toolbar.png")
    window.removeToolBar(bar)
    bar.setParent(parent)  # back to the plugin's window, or it dies with ours
    window.close()


def test_segment_with_point_cloud_layer_and_named_legend(
    plugin: Any, demo_project: Any, qgis_canvas: Any, qgis_errors: list[str]
) -> None:
    """The done-when with the real `make demo` IKD-Net on the whole sample scene: the legend
    names the checkpoint's classes, no Python error, nothing written beside the scene's copy
    or the LiDAR but QGIS's own statistics cache of the scene."""
    from geoseg_qgis.checkpoint_info import describe

    folder = demo_project["folder"]
    inputs = {p for p in listing(folder) if not p.startswith("geoseg")}
    dialog = plugin.segment_layer()
    wait_for(lambda: dialog.model.needs_points() is not None)
    dialog.lidar.use_layer.setChecked(True)
    dialog.lidar.layer.setLayer(demo_project["cloud"])
    dialog.resize(700, dialog.sizeHint().height())
    save(dialog, "qgis_segment.png")
    dialog.run_button.click()
    wait_for(lambda: dialog.job is None, 1700)
    assert "class map added" in dialog.status.text(), dialog.status.text()
    classes = next(
        lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.name().endswith("classes")
    )
    assert classes.renderer().type() == "paletted"
    names = [c["name"] for c in describe(demo_project["checkpoint"])["classes"]]
    assert [c.label for c in classes.renderer().classes()] == names, names
    dialog.close()
    added = {p for p in listing(folder) if not p.startswith("geoseg")} - inputs
    assert added <= {SCENE.name + ".aux.xml"}, added  # QGIS's own, for the layer it draws
    legend_and_map(classes, demo_project["scene"], Path(OUT or ".") / "qgis_legend.png")


def legend_and_map(classes: QgsRasterLayer, scene: QgsRasterLayer, path: Path) -> None:
    """The layers panel (the class map's legend expanded) beside the map it draws."""
    from qgis.core import QgsLayerTreeModel
    from qgis.gui import QgsLayerTreeView

    model = QgsLayerTreeModel(QgsProject.instance().layerTreeRoot())
    view = QgsLayerTreeView()
    view.setModel(model)
    view.resize(340, 420)
    view.expandAll()
    view.show()
    QApplication.processEvents()
    panel = view.grab().toImage()
    classes.renderer().setOpacity(0.6)  # the imagery shows through the classes
    settings = QgsMapSettings()
    settings.setLayers([classes, scene])
    settings.setDestinationCrs(classes.crs())
    settings.setExtent(classes.extent())
    settings.setOutputSize(QSize(420, 420))
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererSequentialJob(settings)
    job.start()
    job.waitForFinished()
    image = QImage(panel.width() + 430, 420, QImage.Format_ARGB32)
    image.fill(Qt.GlobalColor.white)
    painter = QPainter(image)
    painter.drawImage(0, 0, panel)
    painter.drawImage(panel.width() + 10, 0, job.renderedImage())
    painter.end()
    assert image.save(str(path))
    view.close()


def test_model_manager(plugin: Any, demo_project: Any) -> None:
    manager = plugin.model_manager()
    manager.resize(960, 520)
    save(manager, "qgis_models.png")
    manager.close()


def test_search_dock(plugin: Any, demo_project: Any) -> None:
    index = DEMO / "index"
    if not (index / "index.yaml").exists():
        pytest.fail(f"{index} not found: run `make demo` first")
    plugin.actions["search"].trigger()
    dock = plugin.dock
    dock.index.setFilePath(str(index))
    dock.query.setText(QUERY)
    dock.search()
    wait_for(lambda: dock.job is None, 600)
    assert dock.results.count() > 0, dock.status.text()
    # A correct answer: most hits are tiles where tree is the largest class (about 1 in 9 of the
    # sample's tiles, so chance is ~1 hit in 10).
    features = json.loads(Path(dock.hits_path).read_text())["features"]
    largest = [
        max((v, k[5:]) for k, v in f["properties"].items() if k.startswith("frac_"))[1]
        for f in features
    ]
    assert largest.count("tree") > len(largest) / 2, largest
    dock.setFloating(True)
    dock.resize(520, 640)
    dock.show()
    save(dock, "qgis_search_dock.png")
    dock.setFloating(False)
    dock.clear()
