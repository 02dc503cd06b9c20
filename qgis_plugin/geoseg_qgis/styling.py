"""How geoseg results look in QGIS: named class legends and outline layers in native CRSs.

Class names and colours never come from a table in the plugin: a class map's STAC Item
(`<out>.json`, written by `geoseg predict` from the checkpoint's contract) carries them in
`classification:classes`, so a Vaihingen or DFC2018 model gets its own legend for free.

Tile outlines (search hits, build footprints) are drawn as what they are: squares in the tiles'
own projected CRS, outline only, so they neither hide the imagery nor look rotated and
overlapping as lon/lat boxes do in a projected map.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsFeature,
    QgsField,
    QgsFields,
    QgsFillSymbol,
    QgsGeometry,
    QgsPalettedRasterRenderer,
    QgsPalLayerSettings,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterLayer,
    QgsRectangle,
    QgsSingleSymbolRenderer,
    QgsVectorFileWriter,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor

HITS_COLOR = "#00e5ff"
FOOTPRINT_COLOR = "#ffd400"

# Post-processors QGIS still has to call. QGIS keeps only a C++ pointer to a Python
# post-processor; without a Python reference it is garbage-collected before the run ends and
# QGIS calls a bare base class (the legend stayed "Band 1 (Palette)", 0-255).
_PENDING: dict[str, QgsProcessingLayerPostProcessorInterface] = {}


def item_classes(item_path: str | Path) -> list[tuple[int, str, str]]:
    """(value, "#rrggbb", name) of a class map's STAC Item, nodata classes left out."""
    try:
        item = json.loads(Path(item_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    sources = [item.get("properties", {}), *item.get("assets", {}).values()]
    classes = next(
        (s["classification:classes"] for s in sources if "classification:classes" in s), []
    )
    return [
        (int(c["value"]), "#" + str(c["color_hint"]).lstrip("#"), str(c.get("name", c["value"])))
        for c in classes
        if not c.get("nodata") and "color_hint" in c
    ]


def style_classes(layer: QgsRasterLayer, item_path: str | Path) -> bool:
    """A paletted renderer with the class names and colours of the map's STAC Item."""
    entries = [
        QgsPalettedRasterRenderer.Class(value, QColor(color), name)
        for value, color, name in item_classes(item_path)
    ]
    if not entries or not layer.isValid():
        return False
    layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), 1, entries))
    layer.triggerRepaint()
    return True


def class_item(class_map: str | Path) -> Path:
    """The STAC Item `geoseg predict` writes beside a class map."""
    return Path(class_map).with_suffix(".json")


class _KeptPostProcessor(QgsProcessingLayerPostProcessorInterface):
    """A post-processor registered in `_PENDING` until QGIS has called it."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        _PENDING[key] = self

    def postProcessLayer(self, layer: Any, context: Any, feedback: Any) -> None:
        try:
            self.style(layer)
        finally:
            _PENDING.pop(self.key, None)

    def style(self, layer: Any) -> None:
        raise NotImplementedError


class ClassStyler(_KeptPostProcessor):
    """Names the palette entries of a class map loaded by Processing."""

    def __init__(self, class_map: str) -> None:
        super().__init__(class_map)
        self.item = class_item(class_map)

    def style(self, layer: Any) -> None:
        if isinstance(layer, QgsRasterLayer):
            style_classes(layer, self.item)


class OutlineStyler(_KeptPostProcessor):
    """Outline-only style (and an optional label field) for footprints loaded by Processing."""

    def __init__(self, key: str, color: str = FOOTPRINT_COLOR, label: str | None = None) -> None:
        super().__init__(key)
        self.color, self.label = color, label

    def style(self, layer: Any) -> None:
        if isinstance(layer, QgsVectorLayer):
            outline(layer, self.color, self.label)


def outline(layer: QgsVectorLayer, color: str, label: str | None = None) -> None:
    """Draw polygons as outlines (no fill) and label them with the `label` field."""
    symbol = QgsFillSymbol.createSimple(
        {"style": "no", "outline_color": color, "outline_width": "0.6", "outline_style": "solid"}
    )
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))
    if label:
        settings = QgsPalLayerSettings()
        settings.fieldName = label
        settings.placement = QgsPalLayerSettings.OverPoint
        text = settings.format()
        text.setColor(QColor(color))
        text.buffer().setEnabled(True)
        text.buffer().setColor(QColor("black"))
        text.setSize(11)
        settings.setFormat(text)
        layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
        layer.setLabelsEnabled(True)
    layer.triggerRepaint()


def write_outlines(
    rows: Iterable[dict[str, Any]],
    path: str | Path,
    fields: dict[str, QVariant.Type],
    prefix: str = "tiles",
) -> list[str]:
    """Squares in their own CRSs into a GeoPackage, one table per CRS; returns layer URIs.

    Each row: `crs` (authid or WKT), `bounds` (xmin, ymin, xmax, ymax in that CRS) and the
    `fields` values by name.
    """
    by_crs: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_crs.setdefault(str(row["crs"]), []).append(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    qfields = QgsFields()
    for name, kind in fields.items():
        qfields.append(QgsField(name, kind))
    uris = []
    for crs_text, group in by_crs.items():
        crs = QgsCoordinateReferenceSystem(crs_text)
        table = f"{prefix}_" + (crs.authid().replace(":", "_").lower() or f"crs{len(uris)}")
        options = QgsVectorFileWriter.SaveVectorOptions()
        options.driverName = "GPKG"
        options.layerName = table
        options.actionOnExistingFile = (
            QgsVectorFileWriter.CreateOrOverwriteLayer
            if uris
            else QgsVectorFileWriter.CreateOrOverwriteFile
        )
        writer = QgsVectorFileWriter.create(
            str(path), qfields, QgsWkbTypes.Polygon, crs, QgsCoordinateTransformContext(), options
        )
        for row in group:
            feature = QgsFeature(qfields)
            feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(*row["bounds"])))
            for name in fields:
                feature[name] = row.get(name)
            writer.addFeature(feature)
        del writer  # flushes and closes the table
        uris.append(f"{path}|layername={table}")
    return uris


def native_footprints(tiles: str | Path) -> list[str] | None:
    """The footprints file of a build as native-CRS squares beside it (footprints.gpkg).

    None when its features do not carry their native bounds (`epsg`, `xmin`..`ymax`): then the
    file itself is the layer.
    """
    layer = QgsVectorLayer(str(tiles), "tiles", "ogr")
    names = set(layer.fields().names()) if layer.isValid() else set()
    if not {"epsg", "xmin", "ymin", "xmax", "ymax"} <= names:
        return None
    keep = {"tile_id": QVariant.String, "split": QVariant.String}
    rows = [
        {
            "crs": f"EPSG:{int(f['epsg'])}",
            "bounds": (f["xmin"], f["ymin"], f["xmax"], f["ymax"]),
            **{k: f[k] for k in keep if k in names},
        }
        for f in layer.getFeatures()
    ]
    return write_outlines(rows, Path(tiles).with_name("footprints.gpkg"), keep)
