"""Processing algorithms: each checks its QGIS inputs, then runs one engine request.

They work the same from the Toolbox, the Model Builder, batch mode, `qgis_process` and the
plugin's toolbar buttons (which only open these algorithms' dialogs). Work happens in the engine
subprocess, so the algorithms are safe in Processing's background thread; Cancel reaches the
engine through `feedback.isCanceled()`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsPalettedRasterRenderer,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingOutputFile,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingUtils,
    QgsRasterLayer,
)
from qgis.PyQt.QtGui import QColor

from . import settings
from .engine_client import EngineError, run_engine
from .protocol import request

WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")
CATALOGS = ("planetary-computer", "sample")
SPLITS = ("test", "val", "train")
Params = dict[str, Any]


class GeosegAlgorithm(QgsProcessingAlgorithm):
    """Shared plumbing: names, help, and `engine()` that maps messages onto the feedback."""

    NAME = ""
    LABEL = ""
    HELP = ""

    def name(self) -> str:
        return self.NAME

    def displayName(self) -> str:
        return self.LABEL

    def shortHelpString(self) -> str:
        return self.HELP

    def createInstance(self) -> QgsProcessingAlgorithm:
        return type(self)()

    def engine(
        self,
        op: str,
        args: Params,
        feedback: QgsProcessingFeedback,
        positional: list[str] | None = None,
    ) -> Params:
        """Run `op` in the engine; its outputs, or QgsProcessingException with the fix."""

        def relay(msg: Params) -> None:
            if msg["type"] == "progress":
                if msg.get("percent") is not None:
                    feedback.setProgress(float(msg["percent"]))
                feedback.setProgressText(str(msg.get("stage", "")))
            elif msg["type"] == "log":
                feedback.pushConsoleInfo(str(msg.get("message", "")))

        feedback.pushInfo(f"geoseg engine: {op} {json.dumps(args)}")
        try:
            reply = run_engine(
                settings.engine_python(),
                request(op, args, settings.device(), positional),
                relay,
                feedback.isCanceled,
            )
        except EngineError as exc:
            raise QgsProcessingException(f"geoseg {op}: {exc}") from None
        feedback.pushInfo(reply.get("summary", ""))
        return reply.get("outputs", {})


def _optional_int(alg: QgsProcessingAlgorithm, params: Params, name: str, ctx: Any) -> int | None:
    return alg.parameterAsInt(params, name, ctx) if params.get(name) not in (None, "") else None


def _optional_float(
    alg: QgsProcessingAlgorithm, params: Params, name: str, ctx: Any
) -> float | None:
    return alg.parameterAsDouble(params, name, ctx) if params.get(name) not in (None, "") else None


class BuildDatasetAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "builddataset", "Build dataset"
    HELP = (
        "Builds NAIP + 3DEP LiDAR training tiles (image, label, DSM, points) for a region: an "
        "extent, polygons (selected features only if ticked), a county name or CA. The 'sample' "
        "catalog is the embedded offline region. Rerunning finishes an interrupted build."
    )

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Extent", optional=True))
        self.addParameter(
            QgsProcessingParameterFeatureSource(
                "AOI", "Area of interest polygons", [QgsProcessing.TypeVectorPolygon], optional=True
            )
        )
        self.addParameter(
            QgsProcessingParameterString("REGION", "County name or CA", optional=True)
        )
        self.addParameter(
            QgsProcessingParameterEnum("CATALOG", "Catalog", CATALOGS, defaultValue=0)
        )
        self.addParameter(
            QgsProcessingParameterString("STAC_URL", "STAC API URL [settings]", optional=True)
        )
        self.addParameter(QgsProcessingParameterNumber("YEAR", "NAIP year", optional=True))
        self.addParameter(
            QgsProcessingParameterNumber(
                "GSD", "Pixel size (m)", QgsProcessingParameterNumber.Double, optional=True
            )
        )
        for name, label in (("TILE_SIZE", "Tile size (px)"), ("MAX_TILES", "At most N tiles")):
            self.addParameter(QgsProcessingParameterNumber(name, label, optional=True))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", "Dataset folder"))
        self.addOutput(QgsProcessingOutputVectorLayer("TILES", "Tiles"))

    def processAlgorithm(
        self, params: Params, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> Params:
        out = self.parameterAsString(params, "OUTPUT", context)
        catalog = CATALOGS[self.parameterAsEnum(params, "CATALOG", context)]
        args: Params = {"catalog": catalog, "out": out}
        region = self.parameterAsString(params, "REGION", context).strip()
        if region:
            args["region"] = region
        if params.get("EXTENT"):
            extent = self.parameterAsExtent(params, "EXTENT", context, WGS84)
            if extent.isNull() or extent.isEmpty():
                raise QgsProcessingException("the extent is empty: draw or pick a non-empty one")
            args["bbox"] = [
                extent.xMinimum(),
                extent.yMinimum(),
                extent.xMaximum(),
                extent.yMaximum(),
            ]
        if params.get("AOI"):
            args["aoi"] = self._aoi_file(params, context)
        stac = self.parameterAsString(params, "STAC_URL", context).strip()
        if catalog == "planetary-computer":
            args["stac_url"] = stac or settings.stac_url()
        for key, name in (("year", "YEAR"), ("tile_size", "TILE_SIZE"), ("max_tiles", "MAX_TILES")):
            args[key] = _optional_int(self, params, name, context)
        args["gsd"] = _optional_float(self, params, "GSD", context)
        if sum(k in args for k in ("region", "bbox", "aoi")) > 1:
            raise QgsProcessingException("give only one of extent, polygons or county/CA")
        outputs = self.engine("build-dataset", args, feedback)
        return {"OUTPUT": out, "TILES": outputs.get("tiles", "")}

    def _aoi_file(self, params: Params, context: QgsProcessingContext) -> str:
        """The AOI polygons as lon/lat GeoJSON in Processing's temp folder."""
        source = self.parameterAsSource(params, "AOI", context)
        xform = QgsCoordinateTransform(source.sourceCrs(), WGS84, context.transformContext())
        features = []
        for feature in source.getFeatures():
            geometry = feature.geometry()
            if geometry.isEmpty():
                continue
            geometry.transform(xform)
            features.append(
                {"type": "Feature", "properties": {}, "geometry": json.loads(geometry.asJson())}
            )
        if not features:
            raise QgsProcessingException("the AOI layer has no polygons (or none selected)")
        path = Path(QgsProcessingUtils.generateTempFilename("aoi.geojson"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        return str(path)


class TrainAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "train", "Train model"
    HELP = (
        "Trains a model on a built dataset with a geoseg config YAML. Rerunning with the same "
        "output folder resumes from its last checkpoint; Cancel keeps the checkpoints so far."
    )

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addParameter(QgsProcessingParameterFile("CONFIG", "Config YAML", extension="yaml"))
        self.addParameter(
            QgsProcessingParameterFile(
                "DATA", "Dataset folder", behavior=QgsProcessingParameterFile.Folder
            )
        )
        self.addParameter(QgsProcessingParameterNumber("MAX_STEPS", "Max steps", optional=True))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", "Run folder"))
        self.addOutput(QgsProcessingOutputFile("CHECKPOINT", "Latest checkpoint"))

    def processAlgorithm(
        self, params: Params, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> Params:
        out = self.parameterAsString(params, "OUTPUT", context)
        args = {
            "config": self.parameterAsFile(params, "CONFIG", context),
            "data": self.parameterAsFile(params, "DATA", context),
            "max_steps": _optional_int(self, params, "MAX_STEPS", context),
            "out": out,
        }
        outputs = self.engine("train", args, feedback)
        return {"OUTPUT": out, "CHECKPOINT": outputs.get("checkpoint", "")}


class ClassStyler(QgsProcessingLayerPostProcessorInterface):
    """Names the palette entries of a segmented layer from the class map's STAC Item."""

    def __init__(self, item_path: str) -> None:
        super().__init__()
        self.item_path = item_path

    def postProcessLayer(self, layer: Any, context: Any, feedback: Any) -> None:
        if isinstance(layer, QgsRasterLayer):
            style_classes(layer, self.item_path)


def style_classes(layer: QgsRasterLayer, item_path: str) -> None:
    """Paletted renderer with class names and colours (the COG's palette has colours only)."""
    try:
        item = json.loads(Path(item_path).read_text())
    except (OSError, ValueError):
        return
    sources = [item.get("properties", {}), *item.get("assets", {}).values()]
    classes = next(
        (s["classification:classes"] for s in sources if "classification:classes" in s), []
    )
    entries = [
        QgsPalettedRasterRenderer.Class(int(c["value"]), QColor("#" + c["color_hint"]), c["name"])
        for c in classes
        if not c.get("nodata") and "color_hint" in c
    ]
    if entries:
        layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), 1, entries))
        layer.triggerRepaint()


class SegmentAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "segment", "Segment raster layer"
    HELP = (
        "Classifies a raster layer (file-backed, bands and pixel size as the checkpoint expects) "
        "with an image-only checkpoint, optionally only within an extent. Writes a class map "
        "GeoTIFF (styled with class names) and, if asked, class polygons."
    )

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addParameter(QgsProcessingParameterFile("CHECKPOINT", "Checkpoint", extension="ckpt"))
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Raster layer"))
        self.addParameter(QgsProcessingParameterExtent("EXTENT", "Only within", optional=True))
        self.addParameter(
            QgsProcessingParameterNumber(
                "OVERLAP",
                "Window overlap",
                QgsProcessingParameterNumber.Double,
                0.25,
                False,
                0,
                0.9,
            )
        )
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT", "Class map"))
        self.addParameter(
            QgsProcessingParameterVectorDestination(
                "OUTPUT_VECTOR", "Class polygons", optional=True, createByDefault=False
            )
        )

    def processAlgorithm(
        self, params: Params, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> Params:
        layer = self.parameterAsRasterLayer(params, "INPUT", context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException("INPUT is not a valid raster layer")
        if not layer.crs().isValid():
            raise QgsProcessingException(f"{layer.name()} has no CRS: set one (Layer > Set CRS)")
        source = layer.source().split("|")[0]
        if layer.providerType() != "gdal" or not os.path.isfile(source):
            raise QgsProcessingException(f"{layer.name()} is not a local raster file")
        if params.get("EXTENT"):
            source = self._clip(layer, source, params, context)
        out = self.parameterAsOutputLayer(params, "OUTPUT", context)
        vector = self.parameterAsOutputLayer(params, "OUTPUT_VECTOR", context) or None
        args = {
            "checkpoint": self.parameterAsFile(params, "CHECKPOINT", context),
            "image": source,
            "overlap": self.parameterAsDouble(params, "OVERLAP", context),
            "vector": vector,
            "out": out,
        }
        self.engine("predict", args, feedback)
        item = str(Path(out).with_suffix(".json"))
        if context.willLoadLayerOnCompletion(out):
            context.layerToLoadOnCompletionDetails(out).setPostProcessor(ClassStyler(item))
        return {"OUTPUT": out, "OUTPUT_VECTOR": vector or ""}

    def _clip(self, layer: QgsRasterLayer, source: str, params: Params, ctx: Any) -> str:
        from osgeo import gdal  # QGIS's own GDAL bindings, no engine code

        extent = self.parameterAsExtent(params, "EXTENT", ctx, layer.crs()).intersect(
            layer.extent()
        )
        if extent.isNull() or extent.isEmpty():
            raise QgsProcessingException("the extent does not overlap the layer")
        clipped = QgsProcessingUtils.generateTempFilename("scene.tif")
        window = [extent.xMinimum(), extent.yMaximum(), extent.xMaximum(), extent.yMinimum()]
        if gdal.Translate(clipped, source, projWin=window) is None:
            raise QgsProcessingException(f"could not clip {layer.name()} to the extent")
        return clipped


class EvaluateAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "evaluate", "Evaluate checkpoint"
    HELP = "Per-class IoU/F1, mIoU, OA and kappa of a checkpoint on a split of a built dataset."

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addParameter(QgsProcessingParameterFile("CHECKPOINT", "Checkpoint", extension="ckpt"))
        self.addParameter(
            QgsProcessingParameterFile(
                "DATA", "Dataset folder", behavior=QgsProcessingParameterFile.Folder
            )
        )
        self.addParameter(QgsProcessingParameterEnum("SPLIT", "Split", SPLITS, defaultValue=0))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", "Output folder"))
        self.addOutput(QgsProcessingOutputFile("METRICS", "metrics.json"))
        self.addOutput(QgsProcessingOutputNumber("MIOU", "mIoU"))

    def processAlgorithm(
        self, params: Params, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> Params:
        out = self.parameterAsString(params, "OUTPUT", context)
        args = {
            "checkpoint": self.parameterAsFile(params, "CHECKPOINT", context),
            "data": self.parameterAsFile(params, "DATA", context),
            "split": SPLITS[self.parameterAsEnum(params, "SPLIT", context)],
            "out": out,
        }
        metrics = self.engine("evaluate", args, feedback).get("metrics", "")
        miou = json.loads(Path(metrics).read_text())["pixels"]["miou"] if metrics else None
        return {"OUTPUT": out, "METRICS": metrics, "MIOU": miou}


class IndexAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "index", "Build search index"
    HELP = (
        "Embeds every tile of a built dataset with a retrieval model (a `geoseg train-retrieval` "
        "run, an embedder folder or a Hugging Face id) into an index folder for Search tiles. "
        "Rerunning with the same output folder resumes; Cancel keeps the finished shards."
    )

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addParameter(
            QgsProcessingParameterFile(
                "DATA", "Dataset folder", behavior=QgsProcessingParameterFile.Folder
            )
        )
        self.addParameter(QgsProcessingParameterString("MODEL", "Retrieval model (folder or id)"))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", "Index folder"))

    def processAlgorithm(
        self, params: Params, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> Params:
        out = self.parameterAsString(params, "OUTPUT", context)
        args = {
            "data": self.parameterAsFile(params, "DATA", context),
            "model": self.parameterAsString(params, "MODEL", context),
            "out": out,
        }
        self.engine("index", args, feedback)
        return {"OUTPUT": out}


class SearchAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "search", "Search tiles"
    HELP = (
        "Ranks the tiles of a retrieval index (made by `geoseg index`) against a text query or "
        "a tile id (tiles like it) and writes the hits (rank, score, lon/lat tile outline, tile "
        "metadata) as GeoJSON, with a PNG grid of thumbnails beside it."
    )

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addParameter(QgsProcessingParameterString("QUERY", "Text, or a tile id"))
        self.addParameter(
            QgsProcessingParameterFile(
                "INDEX", "Index folder", behavior=QgsProcessingParameterFile.Folder
            )
        )
        self.addParameter(QgsProcessingParameterNumber("K", "Hits", defaultValue=12, minValue=1))
        self.addParameter(
            QgsProcessingParameterFileDestination("OUTPUT", "Hits", "GeoJSON (*.geojson)")
        )

    def processAlgorithm(
        self, params: Params, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> Params:
        out = self.parameterAsFileOutput(params, "OUTPUT", context)
        query = self.parameterAsString(params, "QUERY", context).strip()
        if not query:
            raise QgsProcessingException("type a text query or a tile id")
        args: Params = {
            "index": self.parameterAsFile(params, "INDEX", context),
            "k": self.parameterAsInt(params, "K", context),
            "out": out,
        }
        positional = [query]
        if is_tile_id(query):
            args["like"], positional = query, []
        self.engine("search", args, feedback, positional)
        return {"OUTPUT": out}


def is_tile_id(text: str) -> bool:
    """Tile ids look like 2154_50cm64_15145_207280 (EPSG, pixel size + tile size, column, row)."""
    parts = text.split("_")
    return len(parts) == 4 and parts[0].isdigit() and parts[2].isdigit() and parts[3].isdigit()


class DiagnosticsAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "diagnostics", "Engine diagnostics"
    HELP = "Engine Python, versions, the torch device it really uses and its last error."

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addOutput(QgsProcessingOutputString("REPORT", "Report (JSON)"))
        self.addOutput(QgsProcessingOutputString("DEVICE", "Device used"))

    def processAlgorithm(
        self, params: Params, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> Params:
        report = self.engine("diagnostics", {}, feedback)
        report["engine_python"] = settings.engine_python()
        feedback.pushInfo(json.dumps(report, indent=2))
        return {"REPORT": json.dumps(report), "DEVICE": report.get("device", "")}


ALGORITHMS = (
    BuildDatasetAlgorithm,
    TrainAlgorithm,
    SegmentAlgorithm,
    EvaluateAlgorithm,
    IndexAlgorithm,
    SearchAlgorithm,
    DiagnosticsAlgorithm,
)
