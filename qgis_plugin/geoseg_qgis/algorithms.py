"""Processing algorithms: each checks its QGIS inputs, then runs engine requests.

They work the same from the Toolbox, the Model Builder, batch mode, `qgis_process` and the
plugin's own dialogs (which run these algorithms as background tasks). Work happens in the
engine subprocess (the session's warm engine, see `engine_client`), so the algorithms are safe in
Processing's background thread; Cancel reaches the engine through `feedback.isCanceled()`.

A checkpoint is checked in QGIS before any engine starts (`checkpoint_info`, no torch): a wrong
path or a file that is not a geoseg model fails at once with one line and its fix. Outputs default
to the outputs folder (`settings.output_folder`), not to temporary files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsPointCloudLayer,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputFile,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterPointCloudLayer,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingUtils,
    QgsRasterLayer,
)

from . import settings
from .checkpoint_info import FIX, CheckpointError, describe
from .engine_client import WARM, EngineError, run_engine
from .protocol import request
from .styling import ClassStyler, OutlineStyler, native_footprints

WGS84 = QgsCoordinateReferenceSystem("EPSG:4326")
CATALOGS = ("planetary-computer", "sample")
# Where a point model's LiDAR or a build's data comes from, besides a layer or a file.
SOURCES = ("none", "sample", "planetary-computer", "STAC API URL")
SPLITS = ("test", "val", "train")
POINT_FILES = "LAS/LAZ/COPC point clouds (*.las *.laz *.LAS *.LAZ)"
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

        feedback.pushDebugInfo(f"geoseg engine: {op} {json.dumps(args)}")
        run = WARM.run if settings.keep_engine() else run_engine
        try:
            reply = run(
                settings.engine_python(),
                request(op, args, settings.device(), positional),
                relay,
                feedback.isCanceled,
            )
        except EngineError as exc:
            raise QgsProcessingException(f"geoseg {op}: {exc}") from None
        feedback.pushInfo(reply.get("summary", ""))
        if feedback.isCanceled():
            feedback.pushInfo("it finished before the cancel took effect: the result is kept")
        return reply.get("outputs", {})

    def checkParameterValues(self, params: Params, context: QgsProcessingContext) -> Any:
        """Processing's checks, then the checkpoint's (no engine needed: one line at once)."""
        ok, problem = super().checkParameterValues(params, context)
        if ok and self.parameterDefinition("CHECKPOINT") is not None:
            try:
                describe(self.parameterAsFile(params, "CHECKPOINT", context))
            except CheckpointError as exc:
                return False, f"{exc}\nFix: {FIX}"
        return ok, problem


def _optional_int(alg: QgsProcessingAlgorithm, params: Params, name: str, ctx: Any) -> int | None:
    return alg.parameterAsInt(params, name, ctx) if params.get(name) not in (None, "") else None


def _optional_float(
    alg: QgsProcessingAlgorithm, params: Params, name: str, ctx: Any
) -> float | None:
    return alg.parameterAsDouble(params, name, ctx) if params.get(name) not in (None, "") else None


def _add_data_source(alg: QgsProcessingAlgorithm, optional: bool) -> None:
    """DATA (a build folder) or, when it is empty, a catalog to build one from first."""
    alg.addParameter(
        QgsProcessingParameterFile(
            "DATA",
            "Dataset folder (a geoseg build)" + (" [or build from a catalog]" if optional else ""),
            behavior=QgsProcessingParameterFile.Folder,
            optional=optional,
        )
    )
    if optional:
        alg.addParameter(
            QgsProcessingParameterEnum(
                "CATALOG", "...or build it first from", SOURCES, defaultValue=0
            )
        )
        alg.addParameter(
            QgsProcessingParameterString("STAC_URL", "STAC API URL [settings]", optional=True)
        )
        alg.addParameter(
            QgsProcessingParameterExtent("EXTENT", "Region to build (extent)", optional=True)
        )
        alg.addParameter(
            QgsProcessingParameterNumber("MAX_TILES", "At most N tiles", optional=True)
        )


def _source(alg: QgsProcessingAlgorithm, params: Params, context: Any) -> Params:
    """The catalog choice as engine args: {}, {"catalog": ...} or {"stac_url": ...}."""
    choice = SOURCES[alg.parameterAsEnum(params, "CATALOG", context)]
    if choice == "none":
        return {}
    if choice == "STAC API URL":
        url = alg.parameterAsString(params, "STAC_URL", context).strip() or settings.stac_url()
        return {"stac_url": url}
    return {"catalog": choice}


def _data(alg: GeosegAlgorithm, params: Params, context: Any, feedback: Any, out: str) -> str:
    """The build folder to train or evaluate on: DATA, or one built first into OUT/data."""
    data = alg.parameterAsFile(params, "DATA", context)
    if data:
        return data
    source = _source(alg, params, context)
    if not source:
        raise QgsProcessingException("pick a dataset folder, or a catalog to build one from")
    args: Params = {**source, "out": str(Path(out) / "data")}
    if source.get("catalog") != "sample":
        args["bbox"] = _bbox(alg, params, context)
    args["max_tiles"] = _optional_int(alg, params, "MAX_TILES", context)
    feedback.pushInfo(f"building the dataset first: {args['out']}")
    alg.engine("build-dataset", args, feedback)
    return args["out"]


def _bbox(alg: QgsProcessingAlgorithm, params: Params, context: Any) -> list[float]:
    """The EXTENT parameter as a lon/lat W S E N list (a non-empty one is required)."""
    extent = (
        alg.parameterAsExtent(params, "EXTENT", context, WGS84) if params.get("EXTENT") else None
    )
    if extent is None or extent.isNull() or extent.isEmpty():
        raise QgsProcessingException("the extent is empty: draw or pick a non-empty one")
    return [extent.xMinimum(), extent.yMinimum(), extent.xMaximum(), extent.yMaximum()]


class BuildDatasetAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "builddataset", "Build dataset"
    HELP = (
        "Builds NAIP + 3DEP LiDAR training tiles (image, label, DSM, points) for a region: an "
        "extent, polygons (selected features only if ticked), a county name or CA. The 'sample' "
        "catalog is the embedded offline region. Rerunning finishes an interrupted build. The "
        "tiles' footprints are added to the map as outlines in their own CRS."
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
        self.addParameter(
            QgsProcessingParameterFolderDestination(
                "OUTPUT", "Dataset folder", settings.output_path("data")
            )
        )
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
            args["bbox"] = _bbox(self, params, context)
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
        tiles = self.engine("build-dataset", args, feedback).get("tiles", "")
        if tiles:
            load_footprints(tiles, context)
        return {"OUTPUT": out, "TILES": tiles}

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


def load_footprints(tiles: str, context: QgsProcessingContext) -> list[str]:
    """Load a build's footprints when the run ends: native-CRS outlines where the footprints
    carry their native bounds, else the footprints file as it is (outlined either way)."""
    uris = native_footprints(tiles) or [tiles]
    for uri in uris:
        name = "geoseg tiles" + (f" ({uri.rsplit('_', 1)[-1]})" if len(uris) > 1 else "")
        details = QgsProcessingContext.LayerDetails(name, context.project(), "TILES")
        details.setPostProcessor(OutlineStyler(uri))
        context.addLayerToLoadOnCompletion(uri, details)
    return uris


class TrainAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "train", "Train model"
    HELP = (
        "Trains a model on a built dataset with a geoseg config YAML (IKD-Net reads the build's "
        "LiDAR itself). Without a dataset folder it first builds one from the chosen catalog "
        "(the embedded sample, Planetary Computer or a STAC API, within the extent). Rerunning "
        "with the same output folder resumes from its last checkpoint; Cancel keeps the "
        "checkpoints so far."
    )

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addParameter(QgsProcessingParameterFile("CONFIG", "Config YAML", extension="yaml"))
        _add_data_source(self, optional=True)
        self.addParameter(QgsProcessingParameterNumber("MAX_STEPS", "Max steps", optional=True))
        self.addParameter(
            QgsProcessingParameterFolderDestination(
                "OUTPUT", "Run folder", settings.output_path("run")
            )
        )
        self.addOutput(QgsProcessingOutputFile("CHECKPOINT", "Latest checkpoint"))

    def processAlgorithm(
        self, params: Params, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> Params:
        out = self.parameterAsString(params, "OUTPUT", context)
        args = {
            "config": self.parameterAsFile(params, "CONFIG", context),
            "data": _data(self, params, context, feedback, out),
            "max_steps": _optional_int(self, params, "MAX_STEPS", context),
            "out": out,
        }
        outputs = self.engine("train", args, feedback)
        return {"OUTPUT": out, "CHECKPOINT": outputs.get("checkpoint", "")}


def point_cloud_files(layer: QgsPointCloudLayer) -> list[str]:
    """The files behind a point cloud layer, for the engine (which reads LAS/LAZ/COPC).

    LAS/LAZ/COPC layers (PDAL and COPC providers) are their file. An EPT layer is its
    `ept-data/` LAZ files, or, for the `ept_<name>/` index QGIS's PDAL provider writes beside
    a LAS/LAZ file, that original file.
    """
    source = layer.source().split("|")[0]
    path = Path(source)
    if layer.providerType() != "ept":
        if not path.is_file():
            raise QgsProcessingException(f"{layer.name()} is not a local point cloud file")
        return [source]
    folder = path.parent
    if folder.name.startswith("ept_"):
        originals = [
            folder.parent / f"{folder.name[4:]}{ext}" for ext in (".laz", ".las", ".copc.laz")
        ]
        found = [str(p) for p in originals if p.is_file()]
        if found:
            return found[:1]
    nodes = sorted(str(p) for p in (folder / "ept-data").glob("*.laz"))
    if not nodes:
        raise QgsProcessingException(f"{layer.name()}: no LAZ files in {folder / 'ept-data'}")
    return nodes


class SegmentAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "segment", "Segment raster layer"
    HELP = (
        "Classifies a raster layer (file-backed, bands and pixel size as the checkpoint expects), "
        "optionally only within an extent. Models that read LiDAR (IKD-Net, RandLA-Net, early "
        "fusion) take the scene's points from a point cloud layer, a LAS/LAZ/COPC file or a STAC "
        "catalog (the embedded sample, Planetary Computer or a STAC API URL). Writes a class map "
        "GeoTIFF whose legend shows the model's class names and, if asked, class polygons."
    )

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addParameter(
            QgsProcessingParameterFile(
                "CHECKPOINT", "Checkpoint", extension="ckpt", defaultValue=_last("checkpoint")
            )
        )
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", "Raster layer"))
        self.addParameter(
            QgsProcessingParameterPointCloudLayer(
                "POINTS", "LiDAR: point cloud layer", optional=True
            )
        )
        self.addParameter(
            QgsProcessingParameterFile(
                "POINTS_FILE", "LiDAR: LAS/LAZ/COPC file", fileFilter=POINT_FILES, optional=True
            )
        )
        self.addParameter(
            QgsProcessingParameterEnum(
                "CATALOG", "LiDAR: from a STAC catalog", SOURCES, defaultValue=0
            )
        )
        self.addParameter(
            QgsProcessingParameterString("STAC_URL", "STAC API URL [settings]", optional=True)
        )
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
        self.addParameter(
            QgsProcessingParameterRasterDestination(
                "OUTPUT", "Class map", settings.output_path("classes.tif")
            )
        )
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
        checkpoint = self.parameterAsFile(params, "CHECKPOINT", context)
        model = describe(checkpoint)
        points = self._points(params, context)
        if model["needs_points"] and not points:
            raise QgsProcessingException(
                f"model {model['model']!r} reads LiDAR: pick its point cloud layer, a "
                "LAS/LAZ/COPC file or a STAC catalog for the scene's points"
            )
        if model["needs_points"] is False and points:
            feedback.pushWarning(f"model {model['model']!r} reads no LiDAR: the points are unused")
            points = {}
        if params.get("EXTENT"):
            source = self._clip(layer, source, params, context)
        out = self.parameterAsOutputLayer(params, "OUTPUT", context)
        vector = self.parameterAsOutputLayer(params, "OUTPUT_VECTOR", context) or None
        args = {
            "checkpoint": checkpoint,
            "image": source,
            **points,
            "overlap": self.parameterAsDouble(params, "OVERLAP", context),
            "vector": vector,
            "out": out,
        }
        self.engine("predict", args, feedback)
        settings.remember("checkpoint", checkpoint)
        if context.willLoadLayerOnCompletion(out):
            context.layerToLoadOnCompletionDetails(out).setPostProcessor(ClassStyler(out))
        return {"OUTPUT": out, "OUTPUT_VECTOR": vector or ""}

    def _points(self, params: Params, context: QgsProcessingContext) -> Params:
        """The scene's LiDAR as engine args (at most one source), {} when none is given."""
        found: list[Params] = []
        if params.get("POINTS"):
            layer = self.parameterAsPointCloudLayer(params, "POINTS", context)
            if layer is None or not layer.isValid():
                raise QgsProcessingException("POINTS is not a valid point cloud layer")
            found.append({"points": point_cloud_files(layer)})
        path = self.parameterAsFile(params, "POINTS_FILE", context)
        if path:
            if not os.path.isfile(path):
                raise QgsProcessingException(f"point cloud file not found: {path}")
            found.append({"points": [path]})
        catalog = _source(self, params, context)
        if catalog:
            found.append(catalog)
        if len(found) > 1:
            raise QgsProcessingException(
                "give the LiDAR once: a point cloud layer, a file or a catalog"
            )
        return found[0] if found else {}

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
    HELP = (
        "Per-class IoU/F1, mIoU, OA and kappa of a checkpoint on a split of a built dataset "
        "(point models read the build's LiDAR). Without a dataset folder it first builds one "
        "from the chosen catalog, within the extent."
    )

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addParameter(
            QgsProcessingParameterFile(
                "CHECKPOINT", "Checkpoint", extension="ckpt", defaultValue=_last("checkpoint")
            )
        )
        _add_data_source(self, optional=True)
        self.addParameter(QgsProcessingParameterEnum("SPLIT", "Split", SPLITS, defaultValue=0))
        self.addParameter(
            QgsProcessingParameterFolderDestination(
                "OUTPUT", "Output folder", settings.output_path("evaluation")
            )
        )
        self.addOutput(QgsProcessingOutputFile("METRICS", "metrics.json"))
        self.addOutput(QgsProcessingOutputNumber("MIOU", "mIoU"))

    def processAlgorithm(
        self, params: Params, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> Params:
        out = self.parameterAsString(params, "OUTPUT", context)
        args = {
            "checkpoint": self.parameterAsFile(params, "CHECKPOINT", context),
            "data": _data(self, params, context, feedback, out),
            "split": SPLITS[self.parameterAsEnum(params, "SPLIT", context)],
            "out": out,
        }
        metrics = self.engine("evaluate", args, feedback).get("metrics", "")
        miou = json.loads(Path(metrics).read_text())["pixels"]["miou"] if metrics else None
        settings.remember("checkpoint", args["checkpoint"])
        return {"OUTPUT": out, "METRICS": metrics, "MIOU": miou}


def _last(name: str) -> str | None:
    """A remembered path as a parameter default, if it still exists."""
    value = settings.remembered(name)
    return value if value and os.path.exists(value) else None


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
        self.addParameter(
            QgsProcessingParameterFolderDestination(
                "OUTPUT", "Index folder", settings.output_path("index")
            )
        )

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
        "metadata) as GeoJSON, with a PNG grid of thumbnails beside it unless unticked (the "
        "search dock draws its own: the grid is most of a warm search's time). Amounts and "
        "measures in a text query ('a few trees', 'no buildings', 'trees over 30 m', 'flat') "
        "rank the tiles whose LiDAR label facts meet them first, unless unticked."
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
            QgsProcessingParameterBoolean(
                "AMOUNTS", "Read amounts and measures in the query", defaultValue=True
            )
        )
        self.addParameter(
            QgsProcessingParameterBoolean(
                "THUMBNAILS", "Also write a PNG grid of thumbnails", defaultValue=True
            )
        )
        self.addParameter(
            QgsProcessingParameterFileDestination(
                "OUTPUT", "Hits", "GeoJSON (*.geojson)", settings.output_path("hits.geojson")
            )
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
            "no_thumbnails": not self.parameterAsBool(params, "THUMBNAILS", context),
            "no_amounts": not self.parameterAsBool(params, "AMOUNTS", context),
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


class DescribeAlgorithm(GeosegAlgorithm):
    NAME, LABEL = "describe", "Describe checkpoint"
    HELP = (
        "What a checkpoint is: model, bands, pixel size, tile size, classes, metrics and whether "
        "it reads LiDAR, from its run's model card or its contract (read without the engine; "
        "the engine is asked only whether it reads LiDAR when neither says)."
    )

    def initAlgorithm(self, config: Params | None = None) -> None:
        self.addParameter(QgsProcessingParameterFile("CHECKPOINT", "Checkpoint", extension="ckpt"))
        self.addOutput(QgsProcessingOutputString("REPORT", "Description (JSON)"))
        self.addOutput(QgsProcessingOutputNumber("NEEDS_POINTS", "Reads LiDAR (1/0)"))

    def processAlgorithm(
        self, params: Params, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> Params:
        checkpoint = self.parameterAsFile(params, "CHECKPOINT", context)
        info = describe(checkpoint)
        if info["needs_points"] is None:
            info = self.engine("describe", {"checkpoint": checkpoint}, feedback)
        return {"REPORT": json.dumps(info), "NEEDS_POINTS": int(bool(info["needs_points"]))}


ALGORITHMS = (
    BuildDatasetAlgorithm,
    TrainAlgorithm,
    SegmentAlgorithm,
    EvaluateAlgorithm,
    IndexAlgorithm,
    SearchAlgorithm,
    DiagnosticsAlgorithm,
    DescribeAlgorithm,
)
