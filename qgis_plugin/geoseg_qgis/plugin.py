"""Toolbar, menu, the plugin's windows and the search dock.

Each button opens one window, kept while it exists and raised again on the next click (a window
Qt has already deleted is never touched: its wrapper is dropped). Build dataset opens the
Processing dialog, pre-filled from the map; Segment, Train and Evaluate open the plugin's own
dialogs, which run the same Processing algorithms in the background. Nothing here imports the
engine; the session's warm engine is stopped when the plugin unloads (QGIS quits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import QgsApplication, QgsRasterLayer, QgsVectorLayer, QgsWkbTypes
from qgis.PyQt import sip
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction, QWidget

from .dialogs import DiagnosticsDialog, EvaluateDialog, SegmentDialog, SettingsDialog, TrainDialog
from .engine_client import WARM
from .model_manager import ModelManagerDialog
from .provider import GeosegProvider
from .search_dock import SearchDock

MENU = "&geoseg"
ICONS = Path(__file__).with_name("icons")
# key, label, tooltip; the toolbar shows all but settings, each with its own icon and text.
ACTIONS = (
    ("build", "Build dataset", "Build NAIP + LiDAR training tiles for the map extent or polygons"),
    ("train", "Train", "Train a model (IKD-Net or a baseline) on a dataset"),
    ("evaluate", "Evaluate", "Measure a model on a split of a dataset"),
    ("segment", "Segment", "Classify a raster layer with a model (with its LiDAR if it reads it)"),
    ("search", "Search tiles", "Find tiles by text or by a tile like them"),
    ("models", "Models", "Your trained runs and checkpoints with their model cards"),
    ("diagnostics", "Diagnostics", "Engine, versions and the device it really uses"),
    ("settings", "Settings...", "Engine Python, device, STAC API, outputs folder"),
)


def icon(key: str) -> QIcon:
    return QIcon(str(ICONS / f"{key}.svg"))


class GeosegPlugin:
    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.provider: GeosegProvider | None = None
        self.actions: dict[str, QAction] = {}
        self.toolbar = None
        self.dock: SearchDock | None = None
        self.windows: dict[str, QWidget] = {}

    def initProcessing(self) -> None:
        if self.provider is None:
            self.provider = GeosegProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:
        self.initProcessing()
        self.toolbar = self.iface.addToolBar("geoseg")
        self.toolbar.setObjectName("GeosegToolbar")
        self.toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        slots = {
            "build": self.build_dataset,
            "train": lambda: self.show("train", lambda: TrainDialog(self.iface, self._main())),
            "evaluate": lambda: self.show("evaluate", lambda: self._with_models(EvaluateDialog)),
            "segment": self.segment_layer,
            "search": self.toggle_search,
            "models": self.model_manager,
            "diagnostics": self.diagnostics,
            "settings": lambda: self.show("settings", lambda: SettingsDialog(self._main())),
        }
        for key, label, tip in ACTIONS:
            action = QAction(icon(key), label, self._main())
            action.setObjectName(f"geoseg_{key}")
            action.setToolTip(tip)
            action.triggered.connect(slots[key])
            self.iface.addPluginToMenu(MENU, action)
            if key != "settings":
                self.toolbar.addAction(action)
            self.actions[key] = action
        self.dock = SearchDock(self.iface, self._main())
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        self.dock.hide()

    def _main(self) -> QWidget:
        return self.iface.mainWindow()

    def unload(self) -> None:
        for action in self.actions.values():
            self.iface.removePluginMenu(MENU, action)
            action.deleteLater()
        self.actions.clear()
        for window in self._live().values():
            window.close()
            window.deleteLater()
        self.windows.clear()
        if self.dock is not None:
            self.dock.clear_highlight()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.toolbar is not None:
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        WARM.close()

    def _live(self) -> dict[str, QWidget]:
        """The windows Qt has not deleted (a closed Processing dialog deletes itself)."""
        self.windows = {k: w for k, w in self.windows.items() if not sip.isdeleted(w)}
        return self.windows

    def show(self, key: str, create: Any) -> QWidget:
        """The window `key` (created by `create()` unless it still exists), shown and raised."""
        window = self._live().get(key)
        if window is None:
            window = self.windows[key] = create()
        window.show()
        window.raise_()
        window.activateWindow()
        return window

    def _with_models(self, kind: type) -> QWidget:
        """A dialog with a model picker whose Models... button opens the model manager."""
        dialog = kind(self.iface, self._main())
        dialog.model.manage.connect(self.model_manager)
        return dialog

    def open_algorithm(
        self, name: str, params: dict[str, Any] | None = None, key: str | None = None
    ) -> QWidget:
        """A fresh Processing dialog of `geoseg:<name>` (non-modal), pre-filled with `params`,
        kept as window `key` (default: `name`)."""
        import processing

        key = key or name
        old = self._live().pop(key, None)
        if old is not None:
            old.close()
        dialog = processing.createAlgorithmDialog(f"geoseg:{name}", params or {})
        return self.show(key, lambda: dialog)

    def build_dataset(self) -> QWidget:
        """Region: selected polygons of the active layer if any, else the canvas extent."""
        layer = self.iface.activeLayer()
        if (
            isinstance(layer, QgsVectorLayer)
            and layer.geometryType() == QgsWkbTypes.PolygonGeometry
            and layer.selectedFeatureCount()
        ):
            params: dict[str, Any] = {"AOI": layer}
        else:
            canvas = self.iface.mapCanvas()
            crs = canvas.mapSettings().destinationCrs().authid()
            extent = canvas.extent()
            params = {
                "EXTENT": f"{extent.xMinimum()},{extent.xMaximum()},{extent.yMinimum()},"
                f"{extent.yMaximum()} [{crs}]"
            }
        return self.open_algorithm("builddataset", params, key="build")

    def segment_layer(self) -> QWidget:
        """The Segment dialog, on the active raster layer when there is one."""
        window = self.show("segment", lambda: self._with_models(SegmentDialog))
        active = self.iface.activeLayer()
        if isinstance(active, QgsRasterLayer):
            window.layer.setLayer(active)
        return window

    def model_manager(self) -> QWidget:
        window = self.show("models", lambda: ModelManagerDialog(self._main()))
        if not getattr(window, "_wired", False):
            window.chosen.connect(self._model_chosen)
            window._wired = True
        else:
            window.refresh()
        return window

    def _model_chosen(self, path: str) -> None:
        for key in ("segment", "evaluate"):
            window = self._live().get(key)
            if window is not None:
                window.model.refresh(path)

    def toggle_search(self) -> None:
        if self.dock is not None:
            self.dock.setVisible(self.dock.isHidden())

    def diagnostics(self) -> QWidget:
        """A fresh report each time (the engine may have changed)."""
        old = self._live().pop("diagnostics", None)
        if old is not None:
            old.close()
            old.deleteLater()
        return self.show("diagnostics", lambda: DiagnosticsDialog(self._main()))
