"""Toolbar, menu, settings dialog, diagnostics and the search dock.

The buttons are thin: each opens the matching Processing algorithm's dialog, pre-filled from the
map (canvas extent, selected polygons, active raster layer), so the run gets Processing's
background task, progress bar, log and Cancel for free. Nothing here imports the engine.
"""

from __future__ import annotations

import json
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsMapLayerType,
    QgsProcessingAlgRunnerTask,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsRasterLayer,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import (
    QAction,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLineEdit,
    QMessageBox,
    QWidget,
)

from . import settings
from .provider import ICON, GeosegProvider
from .search_dock import SearchDock

MENU = "&geoseg"


class SettingsDialog(QDialog):
    """Engine Python, device and default STAC URL."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("geoseg settings")
        form = QFormLayout(self)
        self.engine = QLineEdit(settings.engine_python())
        self.engine.setPlaceholderText("/path/to/geoseg-env/bin/python")
        self.device = QComboBox()
        self.device.addItems(settings.DEVICES)
        self.device.setCurrentText(settings.device())
        self.stac = QLineEdit(settings.stac_url())
        form.addRow("Engine Python", self.engine)
        form.addRow("Device", self.device)
        form.addRow("Default STAC API", self.stac)
        buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel
        )
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def accept(self) -> None:
        settings.save(self.engine.text(), self.device.currentText(), self.stac.text())
        super().accept()


class GeosegPlugin:
    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.provider: GeosegProvider | None = None
        self.actions: dict[str, QAction] = {}
        self.toolbar = None
        self.dock: SearchDock | None = None
        self.dialogs: list[QWidget] = []
        self.task: QgsProcessingAlgRunnerTask | None = None

    def initProcessing(self) -> None:
        if self.provider is None:
            self.provider = GeosegProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.initProcessing()
        self.toolbar = self.iface.addToolBar("geoseg")
        self.toolbar.setObjectName("GeosegToolbar")
        for key, label, slot in (
            ("build", "Build dataset", self.build_dataset),
            ("train", "Train", lambda: self.open_algorithm("train")),
            ("segment", "Segment layer", self.segment_layer),
            ("search", "Search tiles", self.toggle_search),
            ("settings", "Settings...", self.show_settings),
            ("diagnostics", "Diagnostics", self.diagnostics),
        ):
            action = QAction(QIcon(str(ICON)), label, self.iface.mainWindow())
            action.setObjectName(f"geoseg_{key}")
            action.triggered.connect(slot)
            self.iface.addPluginToMenu(MENU, action)
            if key != "settings":
                self.toolbar.addAction(action)
            self.actions[key] = action
        self.dock = SearchDock(self.iface, self.iface.mainWindow())
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.hide()

    def unload(self) -> None:
        for action in self.actions.values():
            self.iface.removePluginMenu(MENU, action)
            action.deleteLater()
        self.actions.clear()
        for dialog in self.dialogs:
            dialog.close()
        self.dialogs.clear()
        if self.dock is not None:
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.toolbar is not None:
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    def open_algorithm(self, name: str, params: dict[str, Any] | None = None) -> QWidget:
        """Show the algorithm's Processing dialog (non-modal), pre-filled with `params`."""
        import processing

        dialog = processing.createAlgorithmDialog(f"geoseg:{name}", params or {})
        dialog.show()
        self.dialogs = [d for d in self.dialogs if d.isVisible()] + [dialog]
        return dialog

    def build_dataset(self) -> QWidget:
        """Region: selected polygons of the active layer if any, else the canvas extent."""
        layer = self.iface.activeLayer()
        if (
            isinstance(layer, QgsVectorLayer)
            and layer.geometryType() == QgsWkbTypes.PolygonGeometry
            and layer.selectedFeatureCount()
        ):
            params = {"AOI": layer}
        else:
            canvas = self.iface.mapCanvas()
            crs = canvas.mapSettings().destinationCrs().authid()
            extent = canvas.extent()
            params = {
                "EXTENT": f"{extent.xMinimum()},{extent.xMaximum()},{extent.yMinimum()},"
                f"{extent.yMaximum()} [{crs}]"
            }
        return self.open_algorithm("builddataset", params)

    def segment_layer(self) -> QWidget:
        layer = self.iface.activeLayer()
        params = {"INPUT": layer} if isinstance(layer, QgsRasterLayer) else {}
        if layer is not None and layer.type() != QgsMapLayerType.RasterLayer:
            self.iface.messageBar().pushWarning("geoseg", "pick a raster layer to segment")
        return self.open_algorithm("segment", params)

    def toggle_search(self) -> None:
        if self.dock is not None:
            self.dock.setVisible(self.dock.isHidden())

    def show_settings(self) -> QDialog:
        dialog = SettingsDialog(self.iface.mainWindow())
        dialog.show()
        self.dialogs.append(dialog)
        return dialog

    def diagnostics(self) -> None:
        """Run geoseg:diagnostics in the background and show its report when it is done."""
        if self.task is not None:
            return
        algorithm = QgsApplication.processingRegistry().createAlgorithmById("geoseg:diagnostics")
        self.context, self.feedback = QgsProcessingContext(), QgsProcessingFeedback()
        self.task = QgsProcessingAlgRunnerTask(algorithm, {}, self.context, self.feedback)
        self.task.executed.connect(self._diagnosed)
        QgsApplication.taskManager().addTask(self.task)

    def _diagnosed(self, ok: bool, results: dict[str, Any]) -> None:
        self.task = None
        if ok:
            text = json.dumps(json.loads(results["REPORT"]), indent=2)
        else:
            text = f"The geoseg engine did not answer.\n\n{self.feedback.textLog()[-2000:]}"
        box = QMessageBox(QMessageBox.Icon.Information, "geoseg diagnostics", text)
        box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        box.show()
        self.dialogs.append(box)
