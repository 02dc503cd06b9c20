"""Search tiles dock: query by text or tile id, ranked hits with thumbnails, zoom, add as layer.

The search itself is the `geoseg:search` algorithm run as a background task; the dock only shows
the hits GeoJSON it writes (or any hits file opened with "Open hits..."). Thumbnails are the
hits' tile images rendered by QGIS itself, found through the index's build folder, from
in-memory copies so no `.aux.xml` is ever written beside the user's tiles. Hits are drawn as what
they are: squares in their tiles' own CRS (from the tile images), outline only, labelled with
their rank; the clicked hit is highlighted on the map and selected in the hits layer.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsMapRendererSequentialJob,
    QgsMapSettings,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsSettings,
    QgsVectorLayer,
)
from qgis.gui import QgsDockWidget, QgsFileWidget, QgsRubberBand
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QSize, Qt, QVariant
from qgis.PyQt.QtGui import QColor, QIcon, QPixmap
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

from . import settings
from .styling import HITS_COLOR, outline, write_outlines
from .tasks import AlgorithmRun, Outcome

THUMB = 96
INDEX_KEY = "geoseg/index"
WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")
_VSIMEM = itertools.count()


@contextlib.contextmanager
def _no_pam() -> Iterator[Any]:
    """GDAL without .aux.xml side files (PAM) for this thread, for reading user data."""
    from osgeo import gdal

    gdal.SetThreadLocalConfigOption("GDAL_PAM_ENABLED", "NO")
    try:
        yield gdal
    finally:
        gdal.SetThreadLocalConfigOption("GDAL_PAM_ENABLED", None)


def native_box(image: Path) -> tuple[str, tuple[float, float, float, float]] | None:
    """(CRS WKT, (xmin, ymin, xmax, ymax)) of a north-up tile image, read without side files."""
    with _no_pam() as gdal:
        ds = gdal.Open(str(image))
        if ds is None:
            return None
        x0, dx, _, y0, _, dy = ds.GetGeoTransform()
        wkt, width, height = ds.GetProjection(), ds.RasterXSize, ds.RasterYSize
        ds = None
    if not wkt:
        return None
    xs, ys = (x0, x0 + dx * width), (y0, y0 + dy * height)
    return wkt, (min(xs), min(ys), max(xs), max(ys))


def read_hits(path: str | Path, data: Path | None = None) -> list[dict[str, Any]]:
    """Hits of a GeoJSON file, best first: rank, label, score, tile image, lon/lat geometry and
    the native (CRS, bounds) of the tile image when it is found.

    `data` is the build folder of the index (tile images live at data/<path>/image.tif).
    """
    features = json.loads(Path(path).read_text()).get("features", [])
    hits = []
    for order, feature in enumerate(features):
        props = feature.get("properties") or {}
        label = str(props.get("tile_id") or feature.get("id") or order)
        image = data / props.get("path", f"tiles/{label}") / "image.tif" if data else None
        found = image if image and image.exists() else None
        hits.append(
            {
                "rank": int(props.get("rank", order + 1)),
                "label": label,
                "score": props.get("score"),
                "image": found,
                "native": native_box(found) if found else None,
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
    """The tile image as QGIS renders it by default (RGB of bands 1-3, stretched).

    Rendered from an in-memory copy: QGIS's statistics for the stretch would otherwise be saved
    as `image.tif.aux.xml` beside the user's tile.
    """
    memory = f"/vsimem/geoseg_thumbnail_{next(_VSIMEM)}.tif"
    with _no_pam() as gdal:
        if gdal.Translate(memory, str(image)) is None:
            return None
    try:
        layer = QgsRasterLayer(memory, "thumbnail")
        if not layer.isValid():
            return None
        map_settings = QgsMapSettings()
        map_settings.setLayers([layer])
        map_settings.setDestinationCrs(layer.crs())
        map_settings.setExtent(layer.extent())
        map_settings.setOutputSize(QSize(size, size))
        job = QgsMapRendererSequentialJob(map_settings)
        job.start()
        job.waitForFinished()
        return QIcon(QPixmap.fromImage(job.renderedImage()))
    finally:
        layer = None
        for name in (memory, memory + ".aux.xml"):
            if gdal.VSIStatL(name) is not None:
                gdal.Unlink(name)


def hit_geometry(hit: dict[str, Any]) -> tuple[QgsGeometry, QgsCoordinateReferenceSystem]:
    """The hit's square in its own CRS (its lon/lat outline when the tile image is missing)."""
    if hit["native"]:
        wkt, bounds = hit["native"]
        return QgsGeometry.fromRect(QgsRectangle(*bounds)), QgsCoordinateReferenceSystem(wkt)
    return QgsGeometry.fromWkt(_wkt(hit["geometry"])), WGS84


class SearchDock(QgsDockWidget):
    """The dock; `iface` gives the canvas to zoom and highlight on."""

    def __init__(self, iface: Any, parent: QWidget | None = None) -> None:
        super().__init__("geoseg search", parent)
        self.setObjectName("GeosegSearchDock")
        self.iface = iface
        self.hits_path: str | None = None
        self.hits: list[dict[str, Any]] = []
        self.layer: QgsVectorLayer | None = None
        self.highlight: QgsRubberBand | None = None
        self.job: AlgorithmRun | None = None
        body = QWidget()
        layout = QVBoxLayout(body)
        self.index = QgsFileWidget()
        self.index.setStorageMode(QgsFileWidget.GetDirectory)
        self.index.setFilePath(QgsSettings().value(INDEX_KEY, "", type=str))
        self.index.setToolTip("Index folder made by `geoseg index` (or Build search index)")
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
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
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
        if not text or self.job is not None:
            return
        if not index:
            self.status.setText("pick an index folder (made by geoseg index) first")
            return
        QgsSettings().setValue(INDEX_KEY, index)
        params = {"QUERY": text, "INDEX": index, "K": 12, "THUMBNAILS": False}  # drawn here
        params["OUTPUT"] = settings.output_path("hits.geojson")
        Path(params["OUTPUT"]).parent.mkdir(parents=True, exist_ok=True)
        self.job = AlgorithmRun("search", params, self._searched)
        self.status.setText(f"searching '{text}' ...")
        self.search_button.setEnabled(False)
        self.job.start()

    def _searched(self, outcome: Outcome) -> None:
        self.job = None
        self.search_button.setEnabled(True)
        if outcome.ok:
            self.show_hits(outcome.results["OUTPUT"])
        else:  # no stale hits under a failed search
            self.clear()
            self.status.setText(f"search failed: {outcome.error}")

    def clear(self) -> None:
        self.results.clear()
        self.hits, self.hits_path = [], None
        self.add_button.setEnabled(False)
        self.clear_highlight()

    def _pick_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Hits", "", "GeoJSON (*.geojson *.json)")
        if path:
            self.show_hits(path)

    def show_hits(self, path: str) -> None:
        """List the hits of a hits file, best first, with thumbnails where they exist."""
        self.clear()
        self.hits = read_hits(path, index_data(self.index.filePath()))
        self.hits_path = path
        for order, hit in enumerate(self.hits):
            score = "" if hit["score"] is None else f"  score {float(hit['score']):.3f}"
            text = f"{hit['rank']}. {hit['label']}{score}"
            item = QListWidgetItem(f"{text}\n{hit['classes']}" if hit["classes"] else text)
            icon = thumbnail(hit["image"]) if hit["image"] else None
            if icon is not None:
                item.setIcon(icon)
            item.setData(Qt.ItemDataRole.UserRole, order)
            self.results.addItem(item)
        self.status.setText(f"{len(self.hits)} hits from {Path(path).name}")
        self.add_button.setEnabled(bool(self.hits))

    def zoom_to(self, item: QListWidgetItem) -> None:
        """Zoom to the clicked hit, outline it on the map and select it in the hits layer."""
        order = item.data(Qt.ItemDataRole.UserRole)
        if order is None or not 0 <= order < len(self.hits):
            return
        hit = self.hits[order]
        canvas = self.iface.mapCanvas()
        geom, crs = hit_geometry(hit)
        geom.transform(
            QgsCoordinateTransform(
                crs, canvas.mapSettings().destinationCrs(), QgsProject.instance()
            )
        )
        self.clear_highlight()
        self.highlight = QgsRubberBand(canvas, geom.type())
        self.highlight.setToGeometry(geom, None)
        self.highlight.setStrokeColor(QColor("#ff00ff"))
        self.highlight.setFillColor(QColor(0, 0, 0, 0))
        self.highlight.setWidth(3)
        canvas.setExtent(geom.boundingBox().buffered(geom.boundingBox().width() * 0.2))
        canvas.refresh()
        if self.layer is not None and not sip.isdeleted(self.layer):
            ids = [f.id() for f in self.layer.getFeatures() if f["rank"] == hit["rank"]]
            self.layer.selectByIds(ids)

    def clear_highlight(self) -> None:
        if self.highlight is not None:
            self.iface.mapCanvas().scene().removeItem(self.highlight)
            self.highlight = None

    def add_layer(self) -> QgsVectorLayer | None:
        """The hits as squares in their tiles' CRS (a GeoPackage beside the hits file),
        outlined and labelled with their rank."""
        if not self.hits_path or not self.hits:
            return None
        fields = {"rank": QVariant.Int, "tile_id": QVariant.String, "score": QVariant.Double}
        rows = []
        for hit in self.hits:
            geom, crs = hit_geometry(hit)
            bounds = geom.boundingBox()
            rows.append(
                {
                    "crs": crs.toWkt(),
                    "bounds": (
                        bounds.xMinimum(),
                        bounds.yMinimum(),
                        bounds.xMaximum(),
                        bounds.yMaximum(),
                    ),
                    "rank": hit["rank"],
                    "tile_id": hit["label"],
                    "score": hit["score"],
                }
            )
        uris = write_outlines(rows, Path(self.hits_path).with_suffix(".gpkg"), fields, "hits")
        name = f"geoseg hits: {self.query.text() or Path(self.hits_path).stem}"
        layers = []
        for uri in uris:
            layer = QgsVectorLayer(uri, name, "ogr")
            if layer.isValid():
                outline(layer, HITS_COLOR, "rank")
                QgsProject.instance().addMapLayer(layer)
                layers.append(layer)
        self.layer = layers[0] if layers else None
        return self.layer


def _wkt(geometry: dict[str, Any]) -> str:
    """WKT of a GeoJSON geometry through OGR (QgsGeometry has no GeoJSON reader in 3.22)."""
    from osgeo import ogr

    return ogr.CreateGeometryFromJson(json.dumps(geometry)).ExportToWkt()
