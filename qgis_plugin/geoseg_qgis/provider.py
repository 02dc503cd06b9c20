"""The `geoseg` Processing provider (Toolbox, Model Builder, batch, qgis_process)."""

from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms import ALGORITHMS

ICON = Path(__file__).with_name("icon.png")


class GeosegProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "geoseg"

    def name(self) -> str:
        return "geoseg"

    def icon(self) -> QIcon:
        return QIcon(str(ICON))

    def loadAlgorithms(self) -> None:
        for algorithm in ALGORITHMS:
            self.addAlgorithm(algorithm())
