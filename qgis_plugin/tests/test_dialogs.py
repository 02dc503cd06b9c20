"""The plugin's windows driven as a GIS analyst does: toolbar click, fill, Run, close, reopen.

Real QGIS 3.22 (pytest-qgis iface, Xvfb in `make test`), the real engine. Each test asserts what
the user sees: the layers added, the legend's class names, the message in the dialog, no Python
error (pop-up or message log) and no file written beside the user's data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import COPC, SCENE, SCENE_EXTENT, flush_deletes, listing, wait_for, write_raster
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsPointCloudLayer,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.PyQt.QtCore import Qt

pytestmark = pytest.mark.timeout(420)
CLASSES = {"others", "ground", "tree", "building"}


@pytest.fixture()
def project(qgis_iface: Any, qgis_canvas: Any) -> Any:
    """An empty project in Lambert-93, showing the small part of the sample scene we segment."""
    QgsProject.instance().removeAllMapLayers()
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:2154"))
    x0, x1, y0, y1 = SCENE_EXTENT
    qgis_canvas.setExtent(QgsRectangle(x0, y0, x1, y1))
    yield QgsProject.instance()
    QgsProject.instance().removeAllMapLayers()


def add_scene(user_data: Path, qgis_iface: Any) -> QgsRasterLayer:
    """Layer > Add Raster Layer: the sample scene from the user's folder."""
    layer = QgsRasterLayer(str(user_data / SCENE.name), "scene")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    qgis_iface.setActiveLayer(layer)
    return layer


def run_dialog(dialog: Any, timeout: float = 400.0) -> None:
    dialog.run_button.click()
    assert dialog.job is not None, dialog.status.text()
    wait_for(lambda: dialog.job is None, timeout)


def legend(layer: Any) -> set[str]:
    renderer = layer.renderer()
    assert renderer.type() == "paletted", renderer.type()
    return {c.label for c in renderer.classes()}


@pytest.mark.parametrize("source", ["layer", "file", "catalog"])
def test_segment_sample_scene_with_ikdnet_and_its_lidar(
    plugin: Any,
    qgis_iface: Any,
    project: Any,
    ikdnet_checkpoint: Path,
    user_data: Path,
    qgis_errors: list[str],
    source: str,
) -> None:
    """Done-when of issue 15: the `make demo` model (IKD-Net) segments the sample scene with its
    LiDAR from a point cloud layer, the COPC file or the sample catalog, in QGIS alone, and the
    legend names the classes. Fails before: Segment had no LiDAR input at all."""
    before = listing(user_data)
    scene = add_scene(user_data, qgis_iface)
    cloud = QgsPointCloudLayer(str(user_data / "ept" / "ept.json"), "lidar", "ept")
    assert cloud.isValid()
    QgsProject.instance().addMapLayer(cloud)
    qgis_iface.setActiveLayer(scene)

    manager = plugin.model_manager()
    manager.import_file(str(ikdnet_checkpoint))
    manager.use()
    manager.close()

    dialog = plugin.segment_layer()
    assert dialog.layer.currentLayer() == scene
    assert dialog.model.checkpoint() == str(ikdnet_checkpoint)
    wait_for(lambda: dialog.model.needs_points() is not None)  # from the contract, or the engine
    assert dialog.model.needs_points() and dialog.lidar.isVisible()
    assert "ikdnet" in dialog.model.details.text() and "reads LiDAR" in dialog.model.details.text()
    if source == "layer":
        dialog.lidar.use_layer.setChecked(True)
        dialog.lidar.layer.setLayer(cloud)
    elif source == "file":
        dialog.lidar.use_file.setChecked(True)
        dialog.lidar.file.setFilePath(str(user_data / COPC.name))
    else:
        dialog.lidar.use_catalog.setChecked(True)
        dialog.lidar.catalog.setCurrentIndex(dialog.lidar.catalog.findData("sample"))
    dialog.within.setChecked(True)
    seen: list[int] = []
    dialog.progress.valueChanged.connect(seen.append)
    run_dialog(dialog)
    assert dialog.progress.value() == 100, dialog.status.text()
    assert any(0 < v < 100 for v in seen), seen  # the engine's real percentages, no busy bar
    assert "class map added to the map" in dialog.status.text()
    classes = [lyr for lyr in QgsProject.instance().mapLayers().values() if "classes" in lyr.name()]
    assert len(classes) == 1 and classes[0].isValid()
    assert legend(classes[0]) == CLASSES
    assert classes[0].crs().authid() == "EPSG:2154"
    dialog.close()
    QgsProject.instance().removeAllMapLayers()  # GDAL writes side files when datasets close
    flush_deletes()
    assert listing(user_data) == before  # nothing written beside the user's scene or LiDAR


def test_segment_shows_lidar_inputs_only_for_point_models(
    plugin: Any,
    qgis_iface: Any,
    project: Any,
    ikdnet_checkpoint: Path,
    checkpoint: Path,
    user_data: Path,
    qgis_errors: list[str],
) -> None:
    """An image-only U-Net hides the LiDAR inputs; IKD-Net shows them (read from the contract)."""
    add_scene(user_data, qgis_iface)
    manager = plugin.model_manager()
    for path in (checkpoint, ikdnet_checkpoint):
        manager.import_file(str(path))
    manager.close()
    dialog = plugin.segment_layer()
    dialog.model.refresh(str(checkpoint))
    wait_for(lambda: dialog.model.needs_points() is not None)
    assert dialog.model.needs_points() is False and not dialog.lidar.isVisible()
    assert "image only" in dialog.model.details.text()
    dialog.model.refresh(str(ikdnet_checkpoint))
    wait_for(lambda: dialog.model.needs_points() is not None)
    assert dialog.lidar.isVisible()
    dialog.close()


FAKE_ENGINE = r"""
import json, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # the cancel arrives after the answer
req = json.loads(sys.stdin.readline())
out = req["args"]["out"]
shutil.copyfile(sys.argv[1], out)
shutil.copyfile(sys.argv[1][:-4] + ".json", out[:-4] + ".json")
def line(msg): return "@geoseg-protocol " + json.dumps(msg)
print(line({"v": 1, "type": "progress", "percent": 100.0, "stage": "predicting"}), flush=True)
print(line({"v": 1, "type": "result", "op": "predict", "summary": "predicted", "outputs": {}}),
      flush=True)
time.sleep(3)
"""


def class_map(folder: Path) -> Path:
    """A small class map with its STAC Item, as `geoseg predict` writes them."""
    path = write_raster(folder / "made.tif", 2154, (484780.0, 6632844.0), 16, 1, fill=3)
    classes = [{"value": 0, "name": "unlabeled", "color_hint": "000000", "nodata": True}] + [
        {"value": v, "name": n, "color_hint": c}
        for v, n, c in ((1, "others", "FFAA00"), (2, "ground", "C4A074"), (3, "tree", "228B22"),
                        (4, "building", "DC143C"))
    ]  # fmt: skip
    item = {"type": "Feature", "properties": {"classification:classes": classes}, "assets": {}}
    path.with_suffix(".json").write_text(json.dumps(item))
    return path


def test_cancel_as_the_prediction_finishes_keeps_the_class_map(
    plugin: Any,
    qgis_iface: Any,
    project: Any,
    ikdnet_checkpoint: Path,
    user_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    qgis_errors: list[str],
) -> None:
    """Cancel pressed as the engine answers: the finished class map is kept and added with its
    legend (fails before: "predicted ..." followed by "cancelled", nothing added)."""
    script = tmp_path / "engine.py"
    script.write_text(FAKE_ENGINE)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec /usr/bin/python3 {script} {class_map(tmp_path)}\n")
    python.chmod(0o755)
    add_scene(user_data, qgis_iface)
    dialog = plugin.segment_layer()
    dialog.model.refresh(str(ikdnet_checkpoint))
    wait_for(lambda: dialog.model.needs_points() is not None)  # asked the real engine
    monkeypatch.setenv("GEOSEG_ENGINE_PYTHON", str(python))
    dialog.lidar.use_catalog.setChecked(True)
    dialog.lidar.catalog.setCurrentIndex(dialog.lidar.catalog.findData("sample"))
    dialog.output.setFilePath(str(tmp_path / "classes.tif"))
    dialog.run_button.click()
    feedback = dialog.job.feedback
    # The user's Cancel lands right after the engine's last progress message (in the worker
    # thread, deterministically before the task ends; the answer is already on its way).
    feedback.progressChanged.connect(
        lambda value: value >= 100 and feedback.cancel(), Qt.ConnectionType.DirectConnection
    )
    wait_for(lambda: dialog.job is None, 60)
    assert "kept" in dialog.status.text() and "class map added" in dialog.status.text()
    added = [lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.name() == "classes"]
    assert len(added) == 1 and legend(added[0]) == CLASSES
    dialog.close()


def test_segment_bad_checkpoint_is_one_line_in_the_dialog(
    plugin: Any, qgis_iface: Any, project: Any, user_data: Path, tmp_path: Path
) -> None:
    """A non-model .ckpt: one short line with the fix, in the dialog, before any engine work."""
    add_scene(user_data, qgis_iface)
    fake = tmp_path / "notes.ckpt"
    fake.write_text("not a model")
    dialog = plugin.segment_layer()
    manager = plugin.model_manager()
    assert manager.import_file(str(fake)) is None
    assert "not a geoseg checkpoint" in manager.status.text()
    manager.close()
    dialog.model.combo.addItem("notes", str(fake))  # e.g. a file that changed since listing
    dialog.model.combo.setCurrentIndex(dialog.model.combo.count() - 1)
    dialog.run_button.click()
    text = dialog.status.text()
    assert dialog.job is None and text.count("\n") == 1 and "Fix:" in text
    assert "not a geoseg checkpoint (not a PyTorch archive, or truncated" in text
    dialog.close()


def test_train_and_evaluate_take_the_same_catalog_choices(
    plugin: Any, qgis_iface: Any, project: Any, tmp_path: Path, qgis_errors: list[str]
) -> None:
    """Train builds its data from the sample catalog first; Evaluate picks the trained model
    (remembered) and the same catalog; its metrics come with kappa's chance level."""
    train = plugin.actions["train"]
    train.trigger()
    dialog = plugin.windows["train"]
    dialog.config.setFilePath(str(Path(__file__).parents[2] / "configs" / "ikdnet-tiny.yaml"))
    dialog.data.use_catalog.setChecked(True)
    dialog.data.catalog.setCurrentIndex(dialog.data.catalog.findData("sample"))
    dialog.data.max_tiles.setValue(16)
    dialog.steps.setValue(1)
    dialog.output.setFilePath(str(tmp_path / "run"))
    run_dialog(dialog)
    assert "trained:" in dialog.status.text(), dialog.status.text()
    assert (tmp_path / "run" / "data" / "index.parquet").exists()
    dialog.close()

    plugin.actions["evaluate"].trigger()
    evaluate = plugin.windows["evaluate"]
    evaluate.model.refresh()
    assert evaluate.model.checkpoint() == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    evaluate.data.use_folder.setChecked(True)
    evaluate.data.folder.setFilePath(str(tmp_path / "run" / "data"))
    evaluate.split.setCurrentText("train")  # 16 tiles: the only split sure to have some
    evaluate.output.setFilePath(str(tmp_path / "eval"))
    run_dialog(evaluate)
    text = evaluate.status.text()
    assert "mIoU" in text and "kappa" in text and "0 = chance" in text, text
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["model"] == "ikdnet"
    evaluate.close()


def test_model_manager_lists_runs_with_cards_and_remembers(
    plugin: Any, ikdnet_checkpoint: Path, tmp_path: Path, qgis_errors: list[str]
) -> None:
    """Runs with their card (or contract), import from a file, the last one used remembered,
    and the zoo-entry shape (name, URL, sha256, contract) listed without any download."""
    from geoseg_qgis import models, settings

    run = ikdnet_checkpoint.parents[1]
    card = {  # as geoseg/train/card.py writes it
        "format": "geoseg-model-card/1",
        "model": "ikdnet",
        "data": {"path": "/data/n3c", "catalog": "sample", "region": None},
        "splits": {"train": 20, "val": 2, "test": 2},
        "classes": [
            {"value": 0, "name": "unlabeled", "color": [0, 0, 0, 0]},
            {"value": 1, "name": "others", "color": [255, 170, 0, 255]},
        ],
        "bands": ["red", "green", "blue", "nir"],
        "gsd": 0.5,
        "tile_size": 64,
        "needs_points": True,
        "metrics": {
            "test": {
                "miou": 0.25,
                "oa": 0.5,
                "kappa": 0.1,
                "baseline": {"predicts": "ground", "miou": 0.1, "oa": 0.4, "kappa": 0.0},
            }
        },
        "intended_use": "demo",
        "limits": ["2 training steps.", "Needs the scene's LiDAR."],
    }
    (run / "model_card.json").write_text(json.dumps(card))
    try:
        manager = plugin.model_manager()
        manager.import_file(str(ikdnet_checkpoint))
        html = manager.details.toHtml()
        for text in ("sample", "miou 0.250", "always ground", "2 training steps", "0.5 m"):
            assert text in html, text
        assert manager.tree.currentItem().text(3) == "test mIoU 0.25 (baseline 0.10)"
        assert manager.tree.currentItem().text(2) == "others"  # unlabeled is no class
        manager.use()
        assert settings.remembered("checkpoint") == str(ikdnet_checkpoint.resolve())
        zoo = models.add_zoo_entry(
            "n3c-ikdnet", "https://example.invalid/ikdnet.ckpt", "0" * 64, {"model": "ikdnet"}
        )
        manager.refresh()
        tree = manager.tree
        labels = [tree.topLevelItem(i).text(0) for i in range(tree.topLevelItemCount())]
        assert "n3c-ikdnet" in labels and not zoo.available
        manager.close()
        flush_deletes()
        reopened = plugin.model_manager()  # reopen: same list, selection remembered
        assert reopened.selected().path == str(ikdnet_checkpoint.resolve())
        models.forget(zoo)
        reopened.close()
    finally:
        (run / "model_card.json").unlink()
