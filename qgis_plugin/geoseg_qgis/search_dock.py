"""Search tiles dock: query by text or tile id, ranked hits with thumbnails, zoom, add as layer.

The search itself is the `geoseg:search` algorithm run as a background task; the dock only shows
the hits GeoJSON it writes (or any hits file opened with "Open hits..."). Thumbnails are the
hits' tile images rendered by QGIS itself, found through the index's build folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsMapRendererSequentialJob,
    QgsMapSettings,
    QgsProcessingAlgRunnerTask,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsSettings,
    QgsVectorLayer,
)
from qgis.gui import QgsDockWidget, QgsFileWidget
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QIcon, QPixmap
from qgis.PyQt.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

THUMB = 96
INDEX_KEY = "geoseg/index"
WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")


def read_hits(path: str | Path, data: Path | None = None) -> list[dict[str, Any]]:
    """Hits of a GeoJSON file, best first: rank, label, score, tile image, lon/lat geometry.

    `data` is the build folder of the index (tile images live at data/<path>/image.tif).
    """
    features = json.loads(Path(path).read_text()).get("features", [])
    hits = []
    for order, feature in enumerate(features):
        props = feature.get("properties") or {}
        label = str(props.get("tile_id") or feature.get("id") or order)
        image = data / props.get("path", f"tiles/{label}") / "image.tif" if data else None
        hits.append(
            {
                "rank": int(props.get("rank", order + 1)),
                "label": label,
                "score": props.get("score"),
                "image": image if image and image.exists() else None,
                "classes": _class_shares(props),
                "geometry": feature.get("geometry"),
            }
        )
    return sorted(hits, key=lambda hit: hit["rank"])


def _class_shares(props: dict[str, Any]) -> str:
    """ "tree 62% · ground 30%": the two largest `frac_<class>` shares of a hit's tile."""
    shares = sorted(
        ((v, k[5:]) for k, v in props.items() if k.startswith("frac_") and isinstance(v, float)),
        reverse=True,
    )
    return " · ".join(f"{name} {value:.0%}" for value, name in shares[:2] if value > 0)


def index_data(index: str) -> Path | None:
    """The build folder an index was made from (the `data:` line of its index.yaml)."""
    try:
        lines = (Path(index) / "index.yaml").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("data:"):
            return Path(line.split(":", 1)[1].strip().strip("'\""))
    return None


def thumbnail(image: Path, size: int = THUMB) -> QIcon | None:
    """The tile image as QGIS renders it by default (RGB of bands 1-3, stretched)."""
    layer = QgsRasterLayer(str(image), "thumbnail")
    if not layer.isValid():
        return None
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(layer.crs())
    settings.setExtent(layer.extent())
    settings.setOutputSize(QSize(size, size))
    job = QgsMapRendererSequentialJob(settings)
    job.start()
    job.waitForFinished()
    return QIcon(QPixmap.fromImage(job.renderedImage()))


class SearchDock(QgsDockWidget):
    """The dock; `iface` gives the canvas to zoom and the message bar for errors."""

    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__("geoseg search", parent)
        self.setObjectName("GeosegSearchDock")
        self.iface = iface
        self.hits_path: str | None = None
        self.task: QgsProcessingAlgRunnerTask | None = None
        body = QWidget()
        layout = QVBoxLayout(body)
        self.index = QgsFileWidget()
        self.index.setStorageMode(QgsFileWidget.GetDirectory)
        self.index.setFilePath(QgsSettings().value(INDEX_KEY, "", type=str))
        self.index.setToolTip("Index folder made by `geoseg index`")
        layout.addWidget(self.index)
        row = QHBoxLayout()
        self.query = QLineEdit()
        self.query.setPlaceholderText("text (e.g. 'trees next to buildings') or a tile id")
        self.query.returnPressed.connect(self.search)
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.search)
        row.addWidget(self.query)
        row.addWidget(self.search_button)
        layout.addLayout(row)
        self.status = QLabel("")
        layout.addWidget(self.status)
        self.results = QListWidget()
        self.results.setIconSize(QSize(THUMB, THUMB))
        self.results.itemClicked.connect(self.zoom_to)
        layout.addWidget(self.results)
        buttons = QHBoxLayout()
        self.open_button = QPushButton("Open hits...")
        self.open_button.clicked.connect(self._pick_file)
        self.add_button = QPushButton("Add hits as layer")
        self.add_button.clicked.connect(self.add_layer)
        self.add_button.setEnabled(False)
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.add_button)
        layout.addLayout(buttons)
        self.setWidget(body)

    def search(self) -> None:
        """Run geoseg:search in the background; the hits show up when it finishes."""
        text, index = self.query.text().strip(), self.index.filePath()
        if not text or self.task is not None:
            return
        if not index:
            self.status.setText("pick an index folder (made by geoseg index) first")
            return
        QgsSettings().setValue(INDEX_KEY, index)
        algorithm = QgsApplication.processingRegistry().createAlgorithmById("geoseg:search")
        self.context, self.feedback = QgsProcessingContext(), QgsProcessingFeedback()
        params = {"QUERY": text, "INDEX": index, "K": 12, "OUTPUT": "TEMPORARY_OUTPUT"}
        self.task = QgsProcessingAlgRunnerTask(algorithm, params, self.context, self.feedback)
        self.task.executed.connect(self._searched)
        self.status.setText(f"searching '{text}' ...")
        self.search_button.setEnabled(False)
        QgsApplication.taskManager().addTask(self.task)

    def _searched(self, ok: bool, results: dict[str, Any]) -> None:
        self.task = None
        self.search_button.setEnabled(True)
        if ok:
            self.show_hits(results["OUTPUT"])
        else:
            lines = [x for x in self.feedback.textLog().splitlines() if x.strip()]
            self.status.setText(f"search failed: {lines[-1] if lines else 'see the log'}")

    def _pick_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Hits", "", "GeoJSON (*.geojson *.json)")
        if path:
            self.show_hits(path)

    def show_hits(self, path: str) -> None:
        """List the hits of a hits file, best first, with thumbnails where they exist."""
        hits = read_hits(path, index_data(self.index.filePath()))
        self.hits_path = path
        self.results.clear()
        for hit in hits:
            score = "" if hit["score"] is None else f"  score {float(hit['score']):.3f}"
            text = f"{hit['rank']}. {hit['label']}{score}"
            item = QListWidgetItem(f"{text}\n{hit['classes']}" if hit["classes"] else text)
            icon = thumbnail(hit["image"]) if hit["image"] else None
            if icon is not None:
                item.setIcon(icon)
            item.setData(Qt.ItemDataRole.UserRole, hit["geometry"])
            self.results.addItem(item)
        self.status.setText(f"{len(hits)} hits from {Path(path).name}")
        self.add_button.setEnabled(bool(hits))

    def zoom_to(self, item: QListWidgetItem) -> None:
        geometry = item.data(Qt.ItemDataRole.UserRole)
        if not geometry:
            return
        canvas = self.iface.mapCanvas()
        geom = QgsGeometry.fromWkt(_wkt(geometry))
        xform = QgsCoordinateTransform(
            WGS84, canvas.mapSettings().destinationCrs(), QgsProject.instance()
        )
        geom.transform(xform)
        canvas.setExtent(geom.boundingBox().buffered(geom.boundingBox().width() * 0.2))
        canvas.refresh()

    def add_layer(self) -> QgsVectorLayer | None:
        if not self.hits_path:
            return None
        layer = QgsVectorLayer(self.hits_path, f"geoseg hits: {self.query.text()}", "ogr")
        if layer.isValid():
            QgsProject.instance().addMapLayer(layer)
            return layer
        return None


def _wkt(geometry: dict[str, Any]) -> str:
    """WKT of a GeoJSON geometry through OGR (QgsGeometry has no GeoJSON reader in 3.22)."""
    from osgeo import ogr

    return ogr.CreateGeometryFromJson(json.dumps(geometry)).ExportToWkt()
