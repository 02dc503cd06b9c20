"""Each geoseg Processing algorithm in real QGIS, through the real engine subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ENGINE, ROOT, run_alg, wait_for
from qgis.core import (
    QgsProcessingException,
    QgsProcessingFeatureSourceDefinition,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)

pytestmark = pytest.mark.timeout(300)


def test_protocol_copy_is_identical() -> None:
    """The plugin ships geoseg/protocol.py verbatim (the installer refreshes it)."""
    shipped = ROOT / "qgis_plugin" / "geoseg_qgis" / "protocol.py"
    assert shipped.read_bytes() == (ROOT / "geoseg" / "protocol.py").read_bytes()


def test_no_engine_imports_in_qgis(provider: Any) -> None:
    """Loading the plugin must not drag torch or geoseg into QGIS's Python."""
    assert not {"torch", "geoseg", "torchvision", "rasterio"} & set(sys.modules)


def test_build_dataset_tiles_layer(sample_data: Path) -> None:
    """The footprints come back as outlines in each tile's own CRS (squares), one table per
    CRS, styled without fill when Processing loads them."""
    tiles = QgsVectorLayer(str(sample_data / "tiles.vrt"), "tiles", "ogr")
    assert tiles.isValid() and 0 < tiles.featureCount() <= 24
    assert (sample_data / "report.md").exists()
    gpkg = sample_data / "footprints.gpkg"
    from osgeo import ogr

    source = ogr.Open(str(gpkg))
    tables = [source.GetLayer(i).GetName() for i in range(source.GetLayerCount())]
    source = None
    total = 0
    for table in tables:
        layer = QgsVectorLayer(f"{gpkg}|layername={table}", table, "ogr")
        assert layer.isValid() and not layer.crs().isGeographic()
        assert table == "tiles_" + layer.crs().authid().replace(":", "_").lower()
        for feature in layer.getFeatures():
            box = feature.geometry().boundingBox()
            assert feature.geometry().area() == pytest.approx(box.width() * box.height())
        total += layer.featureCount()
    assert total == tiles.featureCount()


def test_build_dataset_from_selected_polygon(
    provider: Any, sample_data: Path, tmp_path: Path
) -> None:
    """Only the selected polygon is the AOI: the build covers that tile's neighbourhood. Run
    and loaded as the Processing dialog does: the footprints are added in their own CRS,
    outline only."""
    import processing
    from qgis.PyQt.QtCore import Qt

    tiles = QgsVectorLayer(str(sample_data / "tiles.vrt"), "tiles", "ogr")
    QgsProject.instance().addMapLayer(tiles)
    first = next(tiles.getFeatures())
    tiles.selectByIds([first.id()])
    aoi = QgsProcessingFeatureSourceDefinition(tiles.id(), selectedFeaturesOnly=True)
    try:
        params = {"AOI": aoi, "CATALOG": 1, "MAX_TILES": 4, "OUTPUT": str(tmp_path)}
        result = processing.runAndLoadResults("geoseg:builddataset", params)
        loaded = [
            lyr
            for lyr in QgsProject.instance().mapLayers().values()
            if lyr.name().startswith("geoseg tiles")
        ]
        assert loaded and all(not lyr.crs().isGeographic() for lyr in loaded)
        for layer in loaded:
            assert layer.renderer().symbol().symbolLayer(0).brushStyle() == Qt.BrushStyle.NoBrush
    finally:
        QgsProject.instance().removeAllMapLayers()
    built = QgsVectorLayer(result["TILES"], "built", "ogr")
    assert built.isValid() and 1 <= built.featureCount() <= 4  # the tile and its neighbours
    polygon = first.geometry()
    assert all(f.geometry().intersects(polygon) for f in built.getFeatures())


def test_empty_extent_is_an_error(provider: Any, tmp_path: Path) -> None:
    with pytest.raises(QgsProcessingException, match="extent is empty"):
        run_alg(
            "builddataset",
            {
                "EXTENT": "-121.9,-121.9,37.3,37.3 [EPSG:4326]",
                "CATALOG": 1,
                "OUTPUT": str(tmp_path),
            },
        )


def test_engine_error_is_reported(provider: Any, sample_data: Path, tmp_path: Path) -> None:
    """A config the engine refuses comes back as the CLI's one-line message."""
    config = tmp_path / "bad.yaml"
    config.write_text("model: {name: no-such-model}\n")
    params = {"CONFIG": str(config), "DATA": str(sample_data), "OUTPUT": str(tmp_path / "run")}
    with pytest.raises(QgsProcessingException, match="no-such-model"):
        run_alg("train", params)


def test_train_writes_checkpoint(checkpoint: Path) -> None:
    assert checkpoint.name == "last.ckpt" and checkpoint.stat().st_size > 0
    assert (checkpoint.parents[1] / "config.yaml").exists()


def test_segment_layer_loads_with_named_legend(
    provider: Any, checkpoint: Path, scene: Path, tmp_path: Path
) -> None:
    """Run and load as the Processing dialog does (the outputs' post-processors are called after
    the run): the legend shows class names, not 0-255. Fails before: the post-processor was
    garbage-collected before QGIS called it, which then ran a bare base class."""
    import processing

    out, vector = tmp_path / "classes.tif", tmp_path / "classes.gpkg"
    layer = QgsRasterLayer(str(scene), "scene")
    params = {
        "CHECKPOINT": str(checkpoint),
        "INPUT": str(scene),
        "OUTPUT": str(out),
        "OUTPUT_VECTOR": str(vector),
    }
    result = processing.runAndLoadResults("geoseg:segment", params)
    try:
        loaded = {
            lyr.source().split("|")[0]: lyr for lyr in QgsProject.instance().mapLayers().values()
        }
        classes = loaded[str(out)]
        assert classes.isValid() and classes.bandCount() == 1
        assert classes.width() == layer.width() and classes.crs() == layer.crs()
        assert classes.renderer().type() == "paletted"
        labels = {c.label for c in classes.renderer().classes()}
        assert labels == {"others", "ground", "tree", "building"}
        assert loaded[result["OUTPUT_VECTOR"]].isValid()
    finally:
        QgsProject.instance().removeAllMapLayers()


def test_segment_within_extent(
    provider: Any, checkpoint: Path, scene: Path, tmp_path: Path
) -> None:
    layer = QgsRasterLayer(str(scene), "scene")
    e = layer.extent()
    half = f"{e.xMinimum()},{e.center().x()},{e.yMinimum()},{e.yMaximum()} [{layer.crs().authid()}]"
    result = run_alg(
        "segment",
        {
            "CHECKPOINT": str(checkpoint),
            "INPUT": str(scene),
            "EXTENT": half,
            "OUTPUT": str(tmp_path / "c.tif"),
        },
    )
    clipped = QgsRasterLayer(result["OUTPUT"], "c")
    assert clipped.isValid() and clipped.width() == pytest.approx(layer.width() / 2, abs=1)


def test_segment_rejects_vector_layer(provider: Any, checkpoint: Path, sample_data: Path) -> None:
    with pytest.raises(QgsProcessingException):
        run_alg(
            "segment",
            {
                "CHECKPOINT": str(checkpoint),
                "INPUT": str(sample_data / "tiles.vrt"),
                "OUTPUT": "TEMPORARY_OUTPUT",
            },
        )


def test_segment_rejects_raster_without_crs(
    provider: Any, checkpoint: Path, tmp_path: Path
) -> None:
    from osgeo import gdal

    bare = tmp_path / "bare.tif"
    gdal.GetDriverByName("GTiff").Create(str(bare), 64, 64, 4, gdal.GDT_Byte).FlushCache()
    layer = QgsRasterLayer(str(bare), "bare")
    QgsProject.instance().addMapLayer(layer)  # as in QGIS: the layer of the project, by id
    params = {"CHECKPOINT": str(checkpoint), "INPUT": layer.id(), "OUTPUT": "TEMPORARY_OUTPUT"}
    try:
        with pytest.raises(QgsProcessingException, match="no CRS"):
            run_alg("segment", params)
    finally:
        QgsProject.instance().removeMapLayer(layer.id())


def test_evaluate(provider: Any, checkpoint: Path, sample_data: Path, tmp_path: Path) -> None:
    result = run_alg(
        "evaluate",
        {
            "CHECKPOINT": str(checkpoint),
            "DATA": str(sample_data),
            "SPLIT": 2,
            "OUTPUT": str(tmp_path),
        },
    )
    assert Path(result["METRICS"]).exists() and 0.0 <= result["MIOU"] <= 1.0


def test_diagnostics_reports_engine(provider: Any) -> None:
    report = json.loads(run_alg("diagnostics", {})["REPORT"])
    assert report["device"] == "cpu" and report["versions"]["torch"]
    assert report["protocol"] == 1 and "predict" in report["ops"]


def test_search_reports_engine_error(provider: Any, sample_data: Path, tmp_path: Path) -> None:
    """A build folder is not an index: the engine's message comes back (real search: the dock)."""
    params = {"QUERY": "trees", "INDEX": str(sample_data), "OUTPUT": str(tmp_path / "h.geojson")}
    with pytest.raises(QgsProcessingException, match="geoseg search: "):
        run_alg("search", params)
    assert not (tmp_path / "h.geojson").exists()


def test_search_text_and_like_tile(search_index: Path, tmp_path: Path) -> None:
    """Index -> text search -> hits load as a valid polygon layer; a tile id finds others."""
    hits = tmp_path / "hits.geojson"
    run_alg("search", {"QUERY": "tall trees", "INDEX": str(search_index), "K": 5,
                       "OUTPUT": str(hits)})  # fmt: skip
    layer = QgsVectorLayer(str(hits), "hits", "ogr")
    assert layer.isValid() and layer.featureCount() == 5
    assert [f["rank"] for f in layer.getFeatures()] == [1, 2, 3, 4, 5]
    assert hits.with_suffix(".png").stat().st_size > 1000  # the thumbnail grid
    tile = json.loads(hits.read_text())["features"][0]["id"]
    like = tmp_path / "like.geojson"
    run_alg("search", {"QUERY": tile, "INDEX": str(search_index), "K": 3, "OUTPUT": str(like)})
    found = [f["id"] for f in json.loads(like.read_text())["features"]]
    assert len(found) == 3 and tile not in found  # tiles like it, not itself


def test_search_reads_amounts_unless_unticked(search_index: Path, tmp_path: Path) -> None:
    """'bare soil': by default the tiles whose LiDAR ground is known to be barren (NDVI <= 0.1)
    come first, even from an untrained embedder; unticked, the engine ranks with --no-amounts."""
    ranked = {}
    for amounts in (True, False):
        out = tmp_path / f"hits-{amounts}.geojson"
        params = {"QUERY": "bare soil", "INDEX": str(search_index), "K": 24,
                  "AMOUNTS": amounts, "THUMBNAILS": False, "OUTPUT": str(out)}  # fmt: skip
        run_alg("search", params)
        ranked[amounts] = [f["properties"] for f in json.loads(out.read_text())["features"]]
    barren = [(p.get("stat_ndvi_mean") or 1.0) <= 0.1 for p in ranked[True]]
    assert any(barren) and not all(barren) and barren == sorted(barren, reverse=True)
    plain = tmp_path / "plain.geojson"
    options = ["--index", str(search_index), "--k", "24", "--no-amounts", "--no-thumbnails"]
    cli = [ENGINE, "-c", "from geoseg.cli import main; main()", "search", "bare soil", *options]
    cli += ["--out", str(plain)]
    subprocess.run(cli, check=True, timeout=240, capture_output=True)
    expected = [f["id"] for f in json.loads(plain.read_text())["features"]]
    assert [p["tile_id"] for p in ranked[False]] == expected


def test_tile_ids_are_told_from_text() -> None:
    from geoseg_qgis.algorithms import is_tile_id

    assert is_tile_id("2154_50cm64_15145_207280")
    assert not is_tile_id("trees next to buildings") and not is_tile_id("a_b_c_d")


def fake_engine(folder: Path, body: str) -> Path:
    """An executable standing in for the engine's Python (`<it> -m geoseg.engine`)."""
    python = folder / "python"
    python.write_text("#!/bin/sh\n" + body + "\n")
    python.chmod(0o755)
    return python


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "checkpoint not found: "),
        (b"not a model", "is not a geoseg checkpoint (not a PyTorch archive, or truncated"),
        ("zip", "is not a geoseg checkpoint (no PyTorch data in it)"),
    ],
)
def test_bad_checkpoint_is_reported_before_any_engine_starts(
    provider: Any,
    scene: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    content: Any,
    message: str,
) -> None:
    """Missing or foreign checkpoints: one line and its fix, with no engine started (so at once,
    not after ~14 s of engine start-up, and no torch `weights_only` paragraph)."""
    import zipfile

    marker = tmp_path / "engine-started"
    monkeypatch.setenv("GEOSEG_ENGINE_PYTHON", str(fake_engine(tmp_path, f"touch {marker}")))
    ckpt = tmp_path / "model.ckpt"
    if content == "zip":
        with zipfile.ZipFile(ckpt, "w") as zf:
            zf.writestr("notes.txt", "a zip, but no torch pickle")
    elif content is not None:
        ckpt.write_bytes(content)
    params = {"CHECKPOINT": str(ckpt), "INPUT": str(scene), "OUTPUT": str(tmp_path / "c.tif")}
    with pytest.raises(QgsProcessingException) as info:
        run_alg("segment", params)
    text = str(info.value)
    assert message in text and "Fix: pick RUN/checkpoints/last.ckpt" in text
    assert "weights_only" not in text and len(text) < 400
    assert not marker.exists()


def test_engine_error_is_shown_once(provider: Any, sample_data: Path, tmp_path: Path) -> None:
    """Run as the Processing dialog runs it (a background task whose log the dialog shows):
    the engine's error appears once, with its cause (fails before: the CLI's error line was
    relayed as a log line and then raised again)."""
    from qgis.core import QgsApplication, QgsProcessingAlgRunnerTask, QgsProcessingContext

    config = tmp_path / "bad.yaml"
    config.write_text("model: {name: no-such-model}\n")
    params = {"CONFIG": str(config), "DATA": str(sample_data), "OUTPUT": str(tmp_path / "run")}
    algorithm = QgsApplication.processingRegistry().createAlgorithmById("geoseg:train")
    context, feedback = QgsProcessingContext(), QgsProcessingFeedback()
    done: list[bool] = []
    task = QgsProcessingAlgRunnerTask(algorithm, params, context, feedback)
    task.executed.connect(lambda ok, results: done.append(ok))
    QgsApplication.taskManager().addTask(task)
    wait_for(lambda: done)
    assert done == [False]
    assert feedback.textLog().count("no-such-model") == 1, feedback.textLog()


def test_engine_without_geoseg_says_how_to_fix(
    provider: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Python without geoseg prints `No module named 'geoseg'`: the message gets its Fix line
    (fails before: the client matched the unquoted text only)."""
    python = fake_engine(tmp_path, 'exec /usr/bin/python3 -I "$@"')
    monkeypatch.setenv("GEOSEG_ENGINE_PYTHON", str(python))
    with pytest.raises(QgsProcessingException) as info:
        run_alg("diagnostics", {})
    text = str(info.value)
    assert "has no geoseg installed" in text and "Fix: in the geoseg environment run" in text


def test_warm_engine_is_reused_and_restarted_after_a_crash(provider: Any) -> None:
    """One engine answers job after job; killed, it is replaced by a fresh one on next use."""
    import signal

    from geoseg_qgis.engine_client import WARM

    first = json.loads(run_alg("diagnostics", {})["REPORT"])["pid"]
    assert json.loads(run_alg("diagnostics", {})["REPORT"])["pid"] == first == WARM.pid
    os.kill(first, signal.SIGKILL)
    time.sleep(0.5)
    second = json.loads(run_alg("diagnostics", {})["REPORT"])["pid"]
    assert second != first and second == WARM.pid


def test_missing_engine_says_how_to_fix(provider: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEOSEG_ENGINE_PYTHON", "/nonexistent/python")
    with pytest.raises(QgsProcessingException, match="geoseg qgis install"):
        run_alg("diagnostics", {})


def test_engine_crash_is_reported(
    provider: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine that dies (here: segfaults) gives an error and QGIS keeps working."""
    crash = tmp_path / "python"
    crash.write_text(
        "#!/bin/sh\necho 'Fatal Python error: Segmentation fault' >&2\nkill -SEGV $$\n"
    )
    crash.chmod(0o755)
    monkeypatch.setenv("GEOSEG_ENGINE_PYTHON", str(crash))
    with pytest.raises(QgsProcessingException, match="without an answer: Fatal Python error"):
        run_alg("diagnostics", {})
    monkeypatch.setenv("GEOSEG_ENGINE_PYTHON", os.environ["GEOSEG_ENGINE_PYTHON"])


def test_cancel_stops_the_engine(
    provider: Any, sample_data: Path, unet_config: Path, tmp_path: Path
) -> None:
    """Cancel mid-training: the run raises promptly and the engine process is gone."""
    feedback = QgsProcessingFeedback()
    progress: list[float] = []
    feedback.progressChanged.connect(progress.append)

    def cancel_when_training() -> None:
        deadline = time.monotonic() + 120
        while not progress and time.monotonic() < deadline:
            time.sleep(0.05)
        feedback.cancel()

    threading.Thread(target=cancel_when_training, daemon=True).start()
    params = {
        "CONFIG": str(unet_config),
        "DATA": str(sample_data),
        "MAX_STEPS": 5000,
        "OUTPUT": str(tmp_path),
    }
    started = time.monotonic()
    with pytest.raises(QgsProcessingException, match="cancelled"):
        run_alg("train", params, feedback)
    assert progress, "the engine reported no progress before the cancel"
    assert time.monotonic() - started < 120
    assert not _engine_processes()
    assert (tmp_path / "config.yaml").exists()  # the run's folder is kept for a resume


def _engine_processes() -> list[int]:
    """Live engine processes of this test session (Linux /proc), zombies and workers included:
    those with this session's XDG_STATE_HOME (others may run engines on the same machine)."""
    ours = f"XDG_STATE_HOME={os.environ['XDG_STATE_HOME']}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and b"geoseg.engine" in (proc / "cmdline").read_bytes()
                and ours in (proc / "environ").read_bytes().split(b"\0")
            ):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids
