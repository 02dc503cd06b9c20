"""Form parts shared by the Segment, Train and Evaluate dialogs.

`ModelPicker` chooses a model from the model manager's list and says what it needs;
`LidarSource` takes a point model's LiDAR from a point cloud layer, a file or a STAC catalog;
`DataSource` takes a build folder or a catalog to build one from. The same catalog choices
(the embedded sample, Planetary Computer, a STAC API URL) appear wherever data is fetched.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from qgis.core import QgsMapLayerProxyModel
from qgis.gui import QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt import sip
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from . import models, settings
from .algorithms import POINT_FILES, SOURCES
from .tasks import AlgorithmRun, Outcome

Params = dict[str, Any]
CATALOGS = (
    ("the embedded sample (offline)", "sample"),
    ("Planetary Computer", "planetary-computer"),
    ("a STAC API (URL)", "STAC API URL"),
)


def describe_text(info: dict[str, Any] | None) -> str:
    """One readable paragraph about a model (model card or contract), HTML."""
    if not info:
        return ""
    names = ", ".join(escape(c["name"]) for c in info.get("classes", []))
    parts = [
        f"<b>{escape(str(info.get('model')))}</b>",
        "bands " + escape(", ".join(info.get("bands", []))),
        f"{info.get('gsd')} m pixels" if info.get("gsd") else "",
        f"{len(info.get('classes', []))} classes: {names}",
    ]
    miou = _miou(info.get("metrics") or {})
    if miou:
        parts.append(miou)
    needs = info.get("needs_points")
    parts.append(
        "reads LiDAR" if needs else ("image only" if needs is False else "LiDAR: asking the engine")
    )
    return " · ".join(p for p in parts if p)


def _miou(metrics: dict[str, Any]) -> str:
    """ "test mIoU 0.41 (baseline 0.12)" from a model card's metrics (by split), if any; the
    baseline is the card's majority-class map."""
    for split in ("test", "val"):
        scores = metrics.get(split) or {}
        value = scores.get("miou")
        if isinstance(value, int | float):
            base = (scores.get("baseline") or {}).get("miou")
            chance = f" (baseline {base:.2f})" if isinstance(base, int | float) else ""
            return f"{split} mIoU {value:.2f}{chance}"
    return ""


def _catalog_row(parent: QWidget) -> tuple[QComboBox, QLineEdit, QWidget]:
    """The catalog choice and the URL it needs for a STAC API."""
    combo = QComboBox(parent)
    for label, value in CATALOGS:
        combo.addItem(label, value)
    url = QLineEdit(settings.stac_url(), parent)
    url.setPlaceholderText("https://.../stac/v1")
    combo.currentIndexChanged.connect(
        lambda _: url.setVisible(combo.currentData() == "STAC API URL")
    )
    url.setVisible(False)
    row = QWidget(parent)
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(combo)
    layout.addWidget(url, 1)
    return combo, url, row


def _catalog_params(combo: QComboBox, url: QLineEdit) -> Params:
    choice = combo.currentData()
    params: Params = {"CATALOG": SOURCES.index(choice)}
    if choice == "STAC API URL":
        if not url.text().strip():
            raise ValueError("type the STAC API URL")
        params["STAC_URL"] = url.text().strip()
    return params


class ModelPicker(QWidget):
    """A model from the model manager's list, with what it is and what it needs."""

    changed = pyqtSignal()
    manage = pyqtSignal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QComboBox(self)
        self.combo.setMinimumContentsLength(30)
        self.combo.currentIndexChanged.connect(self._changed)
        button = QPushButton("Models...", self)
        button.setToolTip("The model manager: your runs, their model cards, import a checkpoint")
        button.clicked.connect(lambda: self.manage.emit())
        self.details = QLabel(self)
        self.details.setWordWrap(True)
        layout = QGridLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 0, 0)
        layout.addWidget(button, 0, 1)
        layout.addWidget(self.details, 1, 0, 1, 2)
        self._info: dict[str, dict[str, Any]] = {}
        self._asking: AlgorithmRun | None = None
        self.refresh(settings.remembered("checkpoint"))

    def refresh(self, select: str | None = None) -> None:
        """Reload the model list; select `select` (a checkpoint path) or keep the current one."""
        select = select or self.checkpoint()
        self.combo.blockSignals(True)
        self.combo.clear()
        for entry in models.list_models():
            if entry.available:
                self._info[entry.path] = entry.info or {}
                self.combo.addItem(entry.label(), entry.path)
        index = self.combo.findData(select) if select else -1
        self.combo.setCurrentIndex(index if index >= 0 else 0)
        self.combo.blockSignals(False)
        self._changed()

    def checkpoint(self) -> str:
        return self.combo.currentData() or ""

    def info(self) -> dict[str, Any] | None:
        return self._info.get(self.checkpoint())

    def needs_points(self) -> bool | None:
        return (self.info() or {}).get("needs_points")

    def _changed(self, *_: Any) -> None:
        info = self.info()
        if not info:
            self.details.setText("no model yet: train one, or import a checkpoint in Models...")
        else:
            self.details.setText(describe_text(info))
            if info.get("needs_points") is None:
                self._ask_engine(self.checkpoint())
        self.changed.emit()

    def _ask_engine(self, checkpoint: str) -> None:
        """Neither card nor contract says whether it reads LiDAR: the engine knows."""

        def answered(outcome: Outcome) -> None:
            if sip.isdeleted(self):  # the dialog was closed and deleted meanwhile
                return
            self._asking = None
            if outcome.ok:
                self._info[checkpoint] = json.loads(outcome.results["REPORT"])
                if checkpoint == self.checkpoint():
                    self._changed()

        if self._asking is None:
            self._asking = AlgorithmRun("describe", {"CHECKPOINT": checkpoint}, answered)
            self._asking.start()


class LidarSource(QGroupBox):
    """The scene's LiDAR: a point cloud layer, a LAS/LAZ/COPC file or a STAC catalog."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("LiDAR of the scene (the model reads points)", parent)
        self.group = QButtonGroup(self)
        self.use_layer = QRadioButton("Point cloud layer", self)
        self.use_file = QRadioButton("LAS / LAZ / COPC file", self)
        self.use_catalog = QRadioButton("STAC catalog", self)
        self.layer = QgsMapLayerComboBox(self)
        self.layer.setFilters(QgsMapLayerProxyModel.PointCloudLayer)
        self.layer.setAllowEmptyLayer(True)
        self.file = QgsFileWidget(self)
        self.file.setFilter(POINT_FILES)
        self.file.setFilePath(settings.remembered("points_file"))
        self.catalog, self.url, catalog_row = _catalog_row(self)
        layout = QGridLayout(self)
        for row, (radio, widget) in enumerate(
            (
                (self.use_layer, self.layer),
                (self.use_file, self.file),
                (self.use_catalog, catalog_row),
            )
        ):
            self.group.addButton(radio, row)
            layout.addWidget(radio, row, 0)
            layout.addWidget(widget, row, 1)
        (self.use_layer if self.layer.currentLayer() else self.use_catalog).setChecked(True)

    def params(self) -> Params:
        if self.use_layer.isChecked():
            layer = self.layer.currentLayer()
            if layer is None:
                raise ValueError(
                    "pick the point cloud layer of the scene (or a file, or a catalog)"
                )
            return {"POINTS": layer.id()}
        if self.use_file.isChecked():
            path = self.file.filePath().strip()
            if not path:
                raise ValueError("pick the LAS/LAZ/COPC file of the scene")
            settings.remember("points_file", path)
            return {"POINTS_FILE": path}
        return _catalog_params(self.catalog, self.url)


class DataSource(QGroupBox):
    """A build folder, or a catalog to build one from first (within the map's extent)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Data", parent)
        self.use_folder = QRadioButton("Dataset folder (a geoseg build)", self)
        self.use_catalog = QRadioButton("Build it first from", self)
        self.folder = QgsFileWidget(self)
        self.folder.setStorageMode(QgsFileWidget.GetDirectory)
        self.folder.setFilePath(settings.remembered("data"))
        self.catalog, self.url, catalog_row = _catalog_row(self)
        self.max_tiles = QSpinBox(self)
        self.max_tiles.setRange(0, 10_000_000)
        self.max_tiles.setSpecialValueText("all tiles")
        self.max_tiles.setPrefix("at most ")
        note = QLabel("(Planetary Computer and STAC APIs: within the current map extent)", self)
        layout = QVBoxLayout(self)
        for radio, widget in ((self.use_folder, self.folder), (self.use_catalog, catalog_row)):
            row = QHBoxLayout()
            row.addWidget(radio)
            row.addWidget(widget, 1)
            layout.addLayout(row)
        layout.addWidget(self.max_tiles)
        layout.addWidget(note)
        (self.use_folder if self.folder.filePath() else self.use_catalog).setChecked(True)

    def params(self, extent: str) -> Params:
        """DATA, or CATALOG (+ STAC_URL) and the map `extent` for a remote catalog."""
        if self.use_folder.isChecked():
            path = self.folder.filePath().strip()
            if not path:
                raise ValueError("pick a dataset folder (made by Build dataset)")
            settings.remember("data", path)
            return {"DATA": path}
        params = _catalog_params(self.catalog, self.url)
        if self.catalog.currentData() != "sample":
            params["EXTENT"] = extent
        if self.max_tiles.value():
            params["MAX_TILES"] = self.max_tiles.value()
        return params
