"""The plugin's dialogs: Segment, Train, Evaluate (each a form over one Processing algorithm,
run in the background), Settings and Diagnostics.

A job dialog shows only what its model needs (Segment asks for LiDAR only when the checkpoint
reads it), a real percentage and the engine's stage, and one message per error with its cause
and fix, in the dialog itself rather than a pop-up. Closing a dialog does not stop its job;
reopening it shows the job again. Results finished before a Cancel took effect are kept and
added to the map.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qgis.core import QgsMapLayerProxyModel, QgsProject, QgsRasterLayer, QgsVectorLayer
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from . import settings
from .algorithms import SPLITS
from .engine_client import WARM
from .styling import class_item, style_classes
from .tasks import AlgorithmRun, Outcome
from .widgets import DataSource, LidarSource, ModelPicker

Params = dict[str, Any]


class JobDialog(QDialog):
    """Form + progress + status + Run/Cancel/Close over the algorithm `geoseg:<NAME>`."""

    NAME = ""
    TITLE = ""

    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.iface = iface
        self.setWindowTitle(self.TITLE)
        self.setMinimumWidth(620)
        outer = QVBoxLayout(self)
        self.form = QFormLayout()
        outer.addLayout(self.form)
        self.progress = QProgressBar(self)
        self.progress.setRange(0, 100)
        self.progress.setValue(0)
        self.progress.setFormat("%p%")
        self.stage = QLabel(self)
        self.status = QLabel(self)
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        outer.addStretch(1)
        outer.addWidget(self.progress)
        outer.addWidget(self.stage)
        outer.addWidget(self.status)
        row = QHBoxLayout()
        self.run_button = QPushButton("Run", self)
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        close = QPushButton("Close", self)
        close.clicked.connect(self.close)
        row.addStretch(1)
        for button in (self.run_button, self.cancel_button, close):
            row.addWidget(button)
        outer.addLayout(row)
        self.job: AlgorithmRun | None = None

    def parameters(self) -> Params:
        """The algorithm's parameters from the form; ValueError(message) for a form problem."""
        raise NotImplementedError

    def default_outputs(self) -> None:
        """Point the output widgets at new paths in the outputs folder."""

    def showEvent(self, event: Any) -> None:
        """Fresh default outputs each time the dialog is shown (the project may have moved)."""
        if self.job is None:
            self.default_outputs()
        super().showEvent(event)

    def finished(self, results: Params, kept: bool) -> str:
        """Use the results (add layers...); returns the status line."""
        raise NotImplementedError

    def start(self) -> None:
        if self.job is not None:
            return
        try:
            params = self.parameters()
        except ValueError as exc:
            self.status.setText(str(exc))
            return
        job = AlgorithmRun(
            self.NAME,
            params,
            self._done,
            lambda value: self.progress.setValue(int(value)),
            self.stage.setText,
        )
        problem = job.check()
        if problem:
            self.status.setText(problem)
            return
        self.job = job
        self.progress.setValue(0)
        self.stage.setText("starting the geoseg engine...")
        self.status.setText("")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        job.start()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status.setText("cancelling...")

    def _done(self, outcome: Outcome) -> None:
        self.job = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if not outcome.ok:
            self.stage.setText("")
            self.status.setText(outcome.error)
            return
        self.progress.setValue(100)
        self.stage.setText("done")
        self.status.setText(self.finished(outcome.results, outcome.cancelled))

    def extent_text(self) -> str:
        """The map canvas extent as a Processing extent string (with its CRS)."""
        canvas = self.iface.mapCanvas()
        e, crs = canvas.extent(), canvas.mapSettings().destinationCrs().authid()
        return f"{e.xMinimum()},{e.xMaximum()},{e.yMinimum()},{e.yMaximum()} [{crs}]"


def _kept(kept: bool) -> str:
    return " (it finished before the cancel took effect, so it is kept)" if kept else ""


class SegmentDialog(JobDialog):
    NAME, TITLE = "segment", "geoseg: segment a raster layer"

    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__(iface, parent)
        self.model = ModelPicker(self)
        self.layer = QgsMapLayerComboBox(self)
        self.layer.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.lidar = LidarSource(self)
        self.within = QCheckBox("only the visible map extent", self)
        self.output = QgsFileWidget(self)
        self.output.setStorageMode(QgsFileWidget.SaveFile)
        self.output.setFilter("GeoTIFF (*.tif)")
        self.polygons = QCheckBox("also write class polygons (GeoPackage)", self)
        self.form.addRow("Model", self.model)
        self.form.addRow("Raster layer", self.layer)
        self.form.addRow(self.lidar)
        self.form.addRow("", self.within)
        self.form.addRow("Class map", self.output)
        self.form.addRow("", self.polygons)
        self.model.changed.connect(self._model_changed)
        self.layer.layerChanged.connect(self.default_outputs)
        self._model_changed()
        self.default_outputs()

    def _model_changed(self) -> None:
        """Show the LiDAR inputs only for a model that reads LiDAR (or may: not known yet)."""
        self.lidar.setVisible(self.model.needs_points() is not False)
        self.run_button.setEnabled(self.job is None and bool(self.model.checkpoint()))

    def default_outputs(self, *_: Any) -> None:
        layer = self.layer.currentLayer()
        name = f"{layer.name()}_classes.tif" if layer is not None else "classes.tif"
        self.output.setFilePath(settings.output_path(name.replace(" ", "_")))

    def parameters(self) -> Params:
        checkpoint, layer = self.model.checkpoint(), self.layer.currentLayer()
        if not checkpoint:
            raise ValueError("no model: train one, or import a checkpoint in Models...")
        if layer is None:
            raise ValueError("add the raster layer to segment to the map, then pick it")
        out = self.output.filePath().strip()
        if not out:
            raise ValueError("pick where to write the class map")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        params: Params = {"CHECKPOINT": checkpoint, "INPUT": layer.id(), "OUTPUT": out}
        if self.model.needs_points() is not False:
            params.update(self.lidar.params())
        if self.within.isChecked():
            params["EXTENT"] = self.extent_text()
        if self.polygons.isChecked():
            params["OUTPUT_VECTOR"] = str(Path(out).with_suffix(".gpkg"))
        return params

    def finished(self, results: Params, kept: bool) -> str:
        out = results["OUTPUT"]
        layer = QgsRasterLayer(out, Path(out).stem)
        style_classes(layer, class_item(out))
        QgsProject.instance().addMapLayer(layer)
        vector = results.get("OUTPUT_VECTOR")
        if vector:
            QgsProject.instance().addMapLayer(QgsVectorLayer(vector, Path(vector).stem, "ogr"))
        self.default_outputs()  # the next run writes a new file
        return f"class map added to the map: {out}{_kept(kept)}"


class TrainDialog(JobDialog):
    NAME, TITLE = "train", "geoseg: train a model"

    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__(iface, parent)
        self.config = QgsFileWidget(self)
        self.config.setFilter("geoseg config (*.yaml *.yml)")
        self.config.setFilePath(settings.remembered("config"))
        self.data = DataSource(self)
        self.steps = QSpinBox(self)
        self.steps.setRange(0, 10_000_000)
        self.steps.setSpecialValueText("as in the config")
        self.output = QgsFileWidget(self)
        self.output.setStorageMode(QgsFileWidget.GetDirectory)
        self.form.addRow("Config (model)", self.config)
        self.form.addRow(self.data)
        self.form.addRow("Max steps", self.steps)
        self.form.addRow("Run folder", self.output)

    def default_outputs(self) -> None:
        self.output.setFilePath(settings.output_path("run"))

    def parameters(self) -> Params:
        config = self.config.filePath().strip()
        if not config:
            raise ValueError("pick a config YAML (configs/ikdnet-tiny.yaml trains IKD-Net)")
        settings.remember("config", config)
        params: Params = {
            "CONFIG": config,
            "OUTPUT": self.output.filePath().strip() or settings.output_path("run"),
            **self.data.params(self.extent_text()),
        }
        if self.steps.value():
            params["MAX_STEPS"] = self.steps.value()
        return params

    def finished(self, results: Params, kept: bool) -> str:
        checkpoint = results.get("CHECKPOINT", "")
        if checkpoint:
            settings.remember("checkpoint", checkpoint)
        self.default_outputs()
        return f"trained: {checkpoint} (now in Models){_kept(kept)}"


class EvaluateDialog(JobDialog):
    NAME, TITLE = "evaluate", "geoseg: evaluate a model"

    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__(iface, parent)
        self.model = ModelPicker(self)
        self.data = DataSource(self)
        self.split = QComboBox(self)
        self.split.addItems(SPLITS)
        self.output = QgsFileWidget(self)
        self.output.setStorageMode(QgsFileWidget.GetDirectory)
        self.form.addRow("Model", self.model)
        self.form.addRow(self.data)
        self.form.addRow("Split", self.split)
        self.form.addRow("Output folder", self.output)

    def default_outputs(self) -> None:
        self.output.setFilePath(settings.output_path("evaluation"))

    def parameters(self) -> Params:
        if not self.model.checkpoint():
            raise ValueError("no model: train one, or import a checkpoint in Models...")
        return {
            "CHECKPOINT": self.model.checkpoint(),
            "SPLIT": self.split.currentIndex(),
            "OUTPUT": self.output.filePath().strip() or settings.output_path("evaluation"),
            **self.data.params(self.extent_text()),
        }

    def finished(self, results: Params, kept: bool) -> str:
        metrics = json.loads(Path(results["METRICS"]).read_text())
        pixels = metrics["pixels"]
        ious = ", ".join(
            f"{k[4:]} {v:.2f}" for k, v in pixels.items() if k.startswith("iou/") and v is not None
        )
        self.default_outputs()

        def fmt(key: str) -> str:
            return "n/a" if pixels.get(key) is None else f"{pixels[key]:.3f}"

        return (
            f"{metrics['split']} ({metrics['tiles']} tiles): mIoU {fmt('miou')}, "
            f"OA {fmt('oa')}, kappa {fmt('kappa')} (0 = chance); IoU {ious}. "
            f"{results['METRICS']}{_kept(kept)}"
        )


class SettingsDialog(QDialog):
    """Engine Python, device, default STAC API, outputs folder, warm engine."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("geoseg settings")
        self.setMinimumWidth(640)
        form = QFormLayout(self)
        self.engine = QgsFileWidget(self)
        self.engine.setFilePath(settings.engine_python())
        self.engine.lineEdit().setPlaceholderText("/path/to/geoseg-env/bin/python")
        self.device = QComboBox(self)
        self.device.addItems(settings.DEVICES)
        self.device.setCurrentText(settings.device())
        self.stac = QLineEdit(settings.stac_url(), self)
        self.outputs = QgsFileWidget(self)
        self.outputs.setStorageMode(QgsFileWidget.GetDirectory)
        self.outputs.setFilePath(settings.output_setting())
        self.outputs.lineEdit().setPlaceholderText(f"default: {settings.output_folder()}")
        self.keep = QCheckBox("keep the engine running between jobs (fast second runs)", self)
        self.keep.setChecked(settings.keep_engine())
        form.addRow("Engine Python", self.engine)
        form.addRow("Device", self.device)
        form.addRow("Default STAC API", self.stac)
        form.addRow("Outputs folder", self.outputs)
        form.addRow("", self.keep)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def accept(self) -> None:
        settings.save(
            self.engine.filePath(),
            self.device.currentText(),
            self.stac.text(),
            self.outputs.filePath(),
            self.keep.isChecked(),
        )
        if not self.keep.isChecked():
            WARM.close()
        super().accept()


class DiagnosticsDialog(QDialog):
    """The engine's report as a readable form, with a button to copy it for an issue."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("geoseg diagnostics")
        self.setMinimumWidth(640)
        self.report: Params = {}
        self.form = QFormLayout()
        self.status = QLabel("asking the engine...", self)
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        copy = QPushButton("Copy report", self)
        copy.clicked.connect(self.copy)
        close = QPushButton("Close", self)
        close.clicked.connect(self.close)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(copy)
        row.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addLayout(self.form)
        layout.addWidget(self.status)
        layout.addLayout(row)
        self.job: AlgorithmRun | None = AlgorithmRun("diagnostics", {}, self._answered)
        self.job.start()

    def _answered(self, outcome: Outcome) -> None:
        self.job = None
        if not outcome.ok:
            self.status.setText(f"The geoseg engine did not answer: {outcome.error}")
            return
        self.report = json.loads(outcome.results["REPORT"])
        self.status.setText("")
        self.show_report(self.report)

    def show_report(self, report: Params) -> None:
        versions = report.get("versions") or {}
        last = report.get("last_error") or {}
        rows = [
            ("Engine Python", report.get("engine_python") or report.get("executable")),
            ("Python", report.get("python")),
            ("geoseg", versions.get("geoseg")),
            ("torch", versions.get("torch")),
            ("Other packages", ", ".join(f"{k} {v}" for k, v in versions.items() if v)),
            ("Device used", report.get("device") or "none"),
            ("GPU", report.get("gpu") or "none"),
            ("Device problem", report.get("device_error") or "none"),
            ("Warm engine", f"running (pid {WARM.pid})" if WARM.pid else "not running"),
            ("Protocol", report.get("protocol")),
            (
                "Last engine error",
                f"{last.get('op')}: {last.get('message')}" if last else "none",
            ),
        ]
        for name, value in rows:
            label = QLabel(str(value), self)
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.form.addRow(f"<b>{name}</b>", label)

    def copy(self) -> None:
        QApplication.clipboard().setText(json.dumps(self.report, indent=2))
