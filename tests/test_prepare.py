"""`geoseg prepare vaihingen|dfc2018` on seeded fixtures with the official names and formats
(tests/data/<dataset>/data.py): the build they write, train -> evaluate on it, and bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import laspy
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
import yaml
from affine import Affine

from geoseg.classes import ClassSet
from geoseg.prepare.dfc2018 import DFC2018
from geoseg.prepare.vaihingen import TEST_AREAS, VAIHINGEN, decode_labels
from geoseg.train.task import load_model
from retrieval.captions import captions, document, relevance
from retrieval.data import load_tiles
from retrieval.train import train_retrieval
from tests.data.dfc2018 import data as dfc_data
from tests.data.vaihingen import data as vaihingen_data
from tests.test_retrieval_train import MICRO
from tests.utils import checksums, cli, one_line_error

pytestmark = pytest.mark.slow

TINY = Path(__file__).parents[1] / "configs" / "ikdnet-tiny.yaml"
N3C_WORDS = r"\b(others|open ground|bare ground|forest|water|road)\b|_"
"""Words of N3C captions that name N3C classes or their refinements (and snake_case names)."""
TILE = "32"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Train/evaluate/predict here run on 32-px tiles in this process: one intra-op thread costs
    less than half the CPU of two on the shared 2-core machine (measured: 15 vs 37 CPU-s for the
    DFC2018 train/evaluate test at load ~12), where two threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vaihingen_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return vaihingen_data.generate(tmp_path_factory.mktemp("vaihingen") / "release")


@pytest.fixture(scope="module")
def dfc_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dfc_data.generate(tmp_path_factory.mktemp("dfc2018") / "download")


@pytest.fixture(scope="module")
def vaihingen_build(vaihingen_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vaihingen_build") / "build"
    res = cli("prepare", "vaihingen", "--src", vaihingen_src, "--out", out, "--tile-size", TILE,
              "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def dfc_build(dfc_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dfc_build") / "build"
    res = cli("prepare", "dfc2018", "--src", dfc_src, "--out", out, "--tile-size", TILE, "--hsi",
              "--test-labels", dfc_src / "test_labels.tif", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def index(build: Path) -> pd.DataFrame:
    return pd.read_parquet(build / "index.parquet")


def read(path: Path, band: int | None = None) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(band) if band else src.read()


def train_tiny(build: Path, tmp: Path, model: dict | None = None, **data) -> Path:
    """Two steps of configs/ikdnet-tiny.yaml (its model, or `model`; `data` keys replaced) on a
    build: the run's last checkpoint."""
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"].update(data)
    cfg["model"] = model or cfg["model"]
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp / "run"
    res = cli("train", "--config", config, "--data", build, "--out", run,
              "--max-steps", "2", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    return run / "checkpoints" / "last.ckpt"


def predicted(checkpoint: Path, scene: Path, out: Path, classes: ClassSet, *points: Path) -> None:
    """`geoseg predict` on a scene: a class map of the build's classes in their palette, and a
    STAC item naming them (what QGIS styles it from)."""
    points_args = [a for p in points for a in ("--points", p)]
    res = cli("predict", "--checkpoint", checkpoint, "--image", scene, *points_args, "--out", out,
              "--device", "cpu")  # fmt: skip
    assert res.exit_code == 0, res.output
    with rasterio.open(out) as map_, rasterio.open(scene) as src:
        assert (map_.crs, map_.shape) == (src.crs, src.shape)
        assert set(np.unique(map_.read(1))) <= set(range(1, len(classes)))
        assert [map_.colormap(1)[v] for v in range(len(classes))] == list(classes.colors)
    item = json.loads(out.with_suffix(".json").read_text())
    names = [c["name"] for c in item["assets"]["classification"]["classification:classes"]]
    assert names == list(classes.names)


def copy_bands(src_path: Path, out: Path, bands: list[int], crs: str | None = None) -> Path:
    """A scene made of some bands of a raster (with a CRS when the source has none)."""
    with rasterio.open(src_path) as src:
        profile = {**src.profile, "count": len(bands), "crs": crs or src.crs}
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(src.read(bands))
    return out


# --- Vaihingen ---------------------------------------------------------------------------


def test_vaihingen_splits_follow_the_benchmark_areas(vaihingen_build: Path):
    tiles = index(vaihingen_build)
    area_split = {1: "train", 3: "train", 11: "train", 5: "val", 2: "test", 4: "test"}
    for tile_id, split in zip(tiles["tile_id"], tiles["split"], strict=True):
        assert split == area_split[int(tile_id.split("_")[1].removeprefix("area"))]
    # 80 x 72 px areas in 32 px tiles: 3 x 3 tiles each, the last row and column padded
    assert tiles.groupby("split").size().to_dict() == {"train": 27, "val": 9, "test": 18}
    assert json.loads((vaihingen_build / "splits.json").read_text())["val"][0].startswith(
        "vaihingen_area05"
    )
    protocol = json.loads((vaihingen_build / "protocol.json").read_text())
    assert protocol["name"] == "isprs-2d-labelling" and protocol["test_areas"] == list(TEST_AREAS)


def test_vaihingen_tiles_keep_the_release_pixels(vaihingen_build: Path, vaihingen_src: Path):
    """IR/R/G land in the NIR/red/green bands, on the area's own grid (no resampling), with the
    default CRS assigned; padding past the area is nodata."""
    folder = vaihingen_build / "tiles" / "vaihingen_area03_c001_r002"
    irrg = read(vaihingen_src / "top" / "top_mosaic_09cm_area3.tif")
    with rasterio.open(folder / "image.tif") as src:
        image = src.read()
        assert src.crs.to_epsg() == 32632
        x0, y0 = vaihingen_data.area_origin(3)
        expected = Affine(0.09, 0, x0 + 32 * 0.09, 0, -0.09, y0 - 64 * 0.09)
        assert src.transform.almost_equals(expected, precision=1e-6)
        assert src.descriptions == ("red", "green", "blue", "nir")
    window = irrg[:, 64:72, 32:64]  # rows 64..71 of 72 are inside the area
    np.testing.assert_array_equal(image[[3, 0, 1], :8], window)
    assert not image[2].any() and not image[:, 8:].any()  # blue missing, padding nodata
    dsm = read(vaihingen_src / "dsm" / "dsm_09cm_matching_area3.tif", 1)
    np.testing.assert_array_equal(read(folder / "dsm.tif", 1)[:8], dsm[64:72, 32:64])


def test_vaihingen_labels_full_for_training_eroded_for_scoring(
    vaihingen_build: Path, vaihingen_src: Path
):
    """Every labelled pixel of the eroded test reference is in exactly one test tile."""
    gts = vaihingen_src / "gts_eroded_for_participants"
    expected = sum(
        int((decode_labels(read(gts / f"top_mosaic_09cm_area{a}_noBoundary.tif"), gts, True) > 0)
            .sum())
        for a in (2, 4)
    )  # fmt: skip
    tiles = index(vaihingen_build)
    test = tiles[tiles["split"] == "test"]
    got = sum(int((read(vaihingen_build / p / "label.tif", 1) > 0).sum()) for p in test["path"])
    assert got == expected
    stats = json.loads((vaihingen_build / "stats.json").read_text())
    assert sum(stats["splits"]["test"]["pixels"][c] for c in VAIHINGEN.real) == expected
    tile = vaihingen_build / "tiles" / "vaihingen_area02_c001_r001"
    full, eroded = read(tile / "label_full.tif", 1), read(tile / "label.tif", 1)
    assert ((eroded == full) | (eroded == 0)).all() and (eroded == 0).sum() > (full == 0).sum()
    train = vaihingen_build / "tiles" / "vaihingen_area01_c001_r001"
    assert not (train / "label_full.tif").exists()
    assert (read(train / "label.tif", 1)[:, :] > 0).all()  # full reference inside the area


def test_vaihingen_class_set_and_band_layout_in_stats(vaihingen_build: Path):
    stats = json.loads((vaihingen_build / "stats.json").read_text())
    assert ClassSet.from_stats(stats).names == VAIHINGEN.names
    assert stats["class_colors"]["building"] == [0, 0, 255, 255]
    assert stats["bands"]["nir"]["layer"] == "image" and stats["bands"]["nir"]["band"] == 4
    assert stats["bands"]["blue"]["count"] == 0  # missing band: no statistics
    assert set(stats["splits"]) == {"train", "val", "test"}
    item = json.loads(
        (vaihingen_build / "tiles/vaihingen_area02_c000_r000/vaihingen_area02_c000_r000.json")
        .read_text()
    )  # fmt: skip
    classes = item["assets"]["label"]["classification:classes"]
    assert [c["name"] for c in classes] == list(VAIHINGEN.names)
    assert classes[2]["color_hint"] == "0000FF"
    collection = json.loads((vaihingen_build / "collection.json").read_text())
    assert collection["id"] == "isprs-vaihingen"


def test_previews_use_the_build_palette(vaihingen_build: Path, dfc_build: Path):
    """The preview (and any plot_tiles figure) shows the build's classes, IR-R-G for Vaihingen."""
    from geoseg.plot import plot_tiles

    for build, classes in ((vaihingen_build, VAIHINGEN), (dfc_build, DFC2018)):
        assert (build / "preview.png").stat().st_size > 0
        assert "preview" in json.loads((build / "collection.json").read_text())["assets"]
        tile = index(build)["tile_id"].iloc[0]
        fig = plot_tiles(build, [tile], panels=("rgb", "label"))
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == list(classes.names)
        kind = "IRRG" if classes is VAIHINGEN else "RGB"
        assert fig.axes[0].get_title() == f"image ({kind})"
        label = fig.axes[1].images[0]
        assert label.cmap(label.norm(2))[:3] == pytest.approx(np.array(classes.colors[2][:3]) / 255)


def test_vaihingen_points_carry_their_pixel_label(vaihingen_build: Path):
    folder = vaihingen_build / "tiles" / "vaihingen_area11_c001_r001"
    las = laspy.read(folder / "points.laz")
    with rasterio.open(folder / "label.tif") as src:
        label, inv = src.read(1), ~src.transform
        xmin, ymin, xmax, ymax = src.bounds
    assert len(las) > 16 and "label" in las.point_format.extra_dimension_names
    x, y = np.asarray(las.x), np.asarray(las.y)
    assert ((x >= xmin) & (x < xmax) & (y > ymin) & (y <= ymax)).all()
    col, row = (np.floor(v).astype(int) for v in inv * (x, y))
    np.testing.assert_array_equal(np.asarray(las.label), label[row, col])


def test_vaihingen_rerun_resumes_and_other_settings_are_refused(
    vaihingen_build: Path, vaihingen_src: Path
):
    before = checksums(vaihingen_build)
    res = cli("prepare", "vaihingen", "--src", vaihingen_src, "--out", vaihingen_build,
              "--tile-size", TILE, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((vaihingen_build / "report.json").read_text())["tiles"]["cached"] == 54
    assert checksums(vaihingen_build) == before
    res = cli("prepare", "vaihingen", "--src", vaihingen_src, "--out", vaihingen_build,
              "--tile-size", TILE, "--val-areas", "3", "--no-progress")  # fmt: skip
    assert "other inputs or settings" in one_line_error(res)


def test_vaihingen_pts_cover_only_some_areas(vaihingen_src: Path, tmp_path: Path):
    res = cli("prepare", "vaihingen", "--src", vaihingen_src, "--out", tmp_path / "b",
              "--tile-size", TILE, "--lidar", "pts", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    kept = {t.split("_")[1] for t in index(tmp_path / "b")["tile_id"]}
    assert kept == {"area01", "area03"}  # the .pts subsets cover these areas only
    assert {s["tile_id"].split("_")[1] for s in report["skipped"]} == {
        "area02", "area04", "area05", "area11"
    }  # fmt: skip


def test_vaihingen_train_evaluate_predict(
    vaihingen_build: Path, vaihingen_src: Path, tmp_path: Path
):
    """The class set flows into the model (7 outputs), its contract, the protocol metrics and
    the predicted class map."""
    checkpoint = train_tiny(vaihingen_build, tmp_path, bands=["nir", "red", "green"])
    run = checkpoint.parents[1]
    _, contract = load_model(checkpoint)
    assert contract["class_names"] == list(VAIHINGEN.names)
    assert contract["class_colors"][2] == [0, 0, 255, 255]
    assert contract["model_kwargs"]["num_classes"] == 7
    card = json.loads((run / "model_card.json").read_text())
    assert [c["name"] for c in card["classes"]] == list(VAIHINGEN.names)
    assert any("isprs-2d-labelling benchmark's reference" in line for line in card["limits"])
    res = cli("evaluate", "--checkpoint", checkpoint, "--data",
              vaihingen_build, "--out", tmp_path / "eval", "--device", "cpu")  # fmt: skip
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    protocol = metrics["protocol"]
    assert protocol["name"] == "isprs-2d-labelling"
    assert {"oa", "mf1", "miou"} | {f"f1/{c}" for c in VAIHINGEN.real} <= set(protocol)
    assert protocol["oa"] == pytest.approx(metrics["pixels"]["oa"])
    confusion = json.loads((tmp_path / "eval" / "confusion.json").read_text())
    stats = json.loads((vaihingen_build / "stats.json").read_text())
    counts = np.array(confusion["matrix"]).sum(1)  # target rows: the eroded test reference
    assert counts.tolist() == [stats["splits"]["test"]["pixels"][c] for c in VAIHINGEN.real]
    # predict: a test area's TOP (given a CRS, docs/datasets.md) with its tiles' points
    top = vaihingen_src / "top" / "top_mosaic_09cm_area2.tif"
    scene = copy_bands(top, tmp_path / "area2.tif", [1, 2, 3], crs="EPSG:32632")
    points = sorted(vaihingen_build.glob("tiles/vaihingen_area02_*/points.laz"))
    predicted(checkpoint, scene, tmp_path / "area2_classes.tif", VAIHINGEN,
              *points)  # fmt: skip


def test_vaihingen_tile_search_with_class_set_captions(vaihingen_build: Path, tmp_path: Path):
    """Retrieval over a prepared build: tiles carry the ISPRS classes, captions name them (not
    N3C's), heights are measured over the ground-level classes' points, and a retrieval run
    trained on these captions indexes and searches the build."""
    build = Path(shutil.copytree(vaihingen_build, tmp_path / "build"))  # gets the stats cache
    tiles = load_tiles(build)
    assert {t.classes for t in tiles} == {VAIHINGEN.real}
    rng = np.random.default_rng(0)
    for t in tiles:
        assert t.dominant in VAIHINGEN.real and relevance(t, t) == 3
        for text in captions(t, rng, n=3):
            assert t.dominant.replace("_", " ") in text.lower(), text
            assert not re.search(N3C_WORDS, text), text
        phrases = [p for _, facet in document(t) for p in facet]  # an index's tile document
        assert not [p for p in phrases if re.search(N3C_WORDS, p)]
    for name, height in (("tree", 10.0), ("building", 8.0)):  # the fixture's heights
        measured = [t.stats[f"{name}_height_p95"] for t in tiles if t.class_fractions[name] > 0.1]
        assert measured and np.allclose(measured, height, atol=0.5), (name, measured)

    run = train_retrieval(MICRO, build, tmp_path / "run", max_steps=1)
    res = cli("index", "--data", build, "--model", run, "--out", tmp_path / "index",
              "--device", "cpu", "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    hits = tmp_path / "hits.geojson"
    res = cli("search", "mostly impervious surfaces with some building", "--index",
              tmp_path / "index", "--k", "5", "--device", "cpu", "--out", hits)  # fmt: skip
    assert res.exit_code == 0, res.output
    found = json.loads(hits.read_text())["features"]
    assert len(found) == 5 and {f["properties"]["tile_id"] for f in found} <= {
        t.tile_id for t in tiles
    }
    assert {f"frac_{c}" for c in VAIHINGEN.real} <= set(found[0]["properties"])
    assert "frac_others" not in found[0]["properties"]


# --- DFC2018 -----------------------------------------------------------------------------


def test_dfc2018_split_is_the_contests(dfc_build: Path, dfc_src: Path):
    """Cells meeting the training ground truth are train/val, the rest test; a straddling
    cell gives one tile of each with disjoint labels that add up to the references."""
    tiles = index(dfc_build)
    assert tiles.groupby("split").size().to_dict() == {"train": 6, "val": 2, "test": 29}
    assert set(tiles.loc[tiles["split"] == "val", "tile_id"]) == {
        "dfc2018_tr_c005_r002", "dfc2018_tr_c005_r003"}  # fmt: skip
    tr = read(dfc_build / "tiles/dfc2018_tr_c003_r003/label.tif", 1)
    te = read(dfc_build / "tiles/dfc2018_te_c003_r003/label.tif", 1)
    assert not ((tr > 0) & (te > 0)).any()
    whole = read(dfc_src / "test_labels.tif", 1)  # the scene's reference at 0.5 m
    cell = whole[3 * 32 : 4 * 32, 3 * 32 : 4 * 32]
    # the ground truth ends 12 m (24 rows) into this cell: train above, test below
    assert (tr[:24] == cell[:24]).all() and (tr[24:] == 0).all()
    assert (te[:24] == 0).all() and (te[24:] == cell[24:]).all()
    gt_labelled = int((read(next(dfc_src.rglob("2018_IEEE_GRSS_DFC_GT_TR.tif")), 1) > 0).sum())
    stats = json.loads((dfc_build / "stats.json").read_text())
    trainval = sum(stats["splits"][s]["pixels"][c] for s in ("train", "val") for c in DFC2018.real)
    assert trainval == gt_labelled


def test_dfc2018_layers_and_point_features(dfc_build: Path, dfc_src: Path):
    folder = dfc_build / "tiles" / "dfc2018_tr_c002_r002"
    with rasterio.open(folder / "hsi.tif") as src:
        assert src.count == 48 and src.descriptions[0] == "hsi_01"
    image = read(folder / "image.tif")
    assert image[:3].all() and not image[3].any()  # RGB averaged from 5 cm, NIR missing
    stats = json.loads((dfc_build / "stats.json").read_text())
    assert (stats["bands"]["hsi_48"]["layer"], stats["bands"]["hsi_48"]["band"]) == ("hsi", 48)
    assert stats["bands"]["intensity_c3"]["band"] == 3 and stats["bands"]["nir"]["count"] == 0
    las = laspy.read(folder / "points.laz")
    assert {"channel", "intensity_c1", "intensity_c2", "intensity_c3", "label"} <= set(
        las.point_format.extra_dimension_names
    )
    assert set(np.unique(las.channel)) == {1, 2, 3}
    own = np.asarray(las.channel) == 2
    np.testing.assert_array_equal(np.asarray(las.intensity_c2)[own], np.asarray(las.intensity)[own])


def test_dfc2018_train_evaluate_with_point_features_and_hsi(dfc_build: Path, tmp_path: Path):
    features = ["intensity_c1", "intensity_c2", "intensity_c3"]
    cfg = yaml.safe_load(TINY.read_text())
    checkpoint = train_tiny(dfc_build, tmp_path, bands=["red", "green", "blue", "hsi_20"],
                            points={**cfg["data"]["points"], "features": features})  # fmt: skip
    model, contract = load_model(checkpoint)
    assert contract["model_kwargs"]["num_classes"] == 21
    assert contract["model_kwargs"]["point_in_channels"] == 6
    assert list(contract["points"]["features"]) == features
    assert isinstance(model, torch.nn.Module)
    res = cli("evaluate", "--checkpoint", checkpoint, "--data", dfc_build,
              "--out", tmp_path / "eval", "--device", "cpu")  # fmt: skip
    assert res.exit_code == 0, res.output
    protocol = json.loads((tmp_path / "eval" / "metrics.json").read_text())["protocol"]
    assert protocol["name"] == "dfc2018" and {"oa", "aa", "kappa"} <= set(protocol)
    # A scene's LiDAR file has no intensity_c1..3: predict says so instead of failing inside.
    folder = dfc_build / "tiles" / "dfc2018_te_c000_r000"
    res = cli("predict", "--checkpoint", checkpoint, "--image",
              folder / "image.tif", "--points", folder / "points.laz", "--out",
              tmp_path / "pred.tif", "--device", "cpu")  # fmt: skip
    assert "intensity_c1" in one_line_error(res)


def test_dfc2018_image_model_predicts_a_scene(dfc_build: Path, tmp_path: Path):
    """A DFC2018 checkpoint on RGB predicts a 0.5 m RGB scene (a test tile's bands) in the
    contest's 20 classes."""
    unet = {"name": "unet", "kwargs": {"widths": [8, 16, 32, 64]}}
    checkpoint = train_tiny(dfc_build, tmp_path, unet, bands=["red", "green", "blue"])
    image = dfc_build / "tiles" / "dfc2018_te_c000_r000" / "image.tif"
    scene = copy_bands(image, tmp_path / "scene.tif", [1, 2, 3])
    predicted(checkpoint, scene, tmp_path / "classes.tif", DFC2018)


def test_dfc2018_without_test_labels(dfc_src: Path, tmp_path: Path):
    res = cli("prepare", "dfc2018", "--src", dfc_src, "--out", tmp_path / "b", "--tile-size",
              TILE, "--no-progress")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "no --test-labels" in res.stderr
    stats = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert sum(stats["splits"]["test"]["pixels"][c] for c in DFC2018.real) == 0
    assert not (tmp_path / "b" / "tiles" / "dfc2018_tr_c002_r002" / "hsi.tif").exists()


# --- bad input ---------------------------------------------------------------------------


def _copy(src: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(src, tmp / "copy"))


def _refused(tmp: Path, *args: str | Path) -> str:
    out = tmp / "out"
    res = cli("prepare", *args, "--out", out, "--tile-size", TILE, "--no-progress")
    message = one_line_error(res)
    assert not out.exists(), "bad input must write nothing"
    return message


def test_missing_release_folder(tmp_path: Path):
    assert "is not a folder" in _refused(tmp_path, "vaihingen", "--src", tmp_path / "nope")
    assert "is not a folder" in _refused(tmp_path, "dfc2018", "--src", tmp_path / "nope")


def test_vaihingen_missing_dsm_folder(vaihingen_src: Path, tmp_path: Path):
    src = _copy(vaihingen_src, tmp_path)
    shutil.rmtree(src / "dsm")
    assert "dsm/dsm_09cm_matching_area1.tif" in _refused(tmp_path, "vaihingen", "--src", src)


def test_vaihingen_unknown_colour_code(vaihingen_src: Path, tmp_path: Path):
    src = _copy(vaihingen_src, tmp_path)
    path = src / "gts_for_participants" / "top_mosaic_09cm_area4.tif"
    rgb = read(path)
    rgb[:, 5, 5] = (12, 34, 56)
    vaihingen_data.write_tif(path, rgb, None)
    message = _refused(tmp_path, "vaihingen", "--src", src)
    assert "top_mosaic_09cm_area4.tif" in message and "(12,34,56)" in message


def test_vaihingen_dsm_on_another_grid(vaihingen_src: Path, tmp_path: Path):
    src = _copy(vaihingen_src, tmp_path)
    path = src / "dsm" / "dsm_09cm_matching_area2.tif"
    with rasterio.open(path) as s:
        dsm, t = s.read(), s.transform
    vaihingen_data.write_tif(path, dsm, t @ Affine.translation(0.5, 0))  # half a pixel east
    message = _refused(tmp_path, "vaihingen", "--src", src)
    assert "dsm_09cm_matching_area2.tif" in message and "not on the grid" in message


def test_dfc2018_bad_inputs(dfc_src: Path, tmp_path: Path):
    src = _copy(dfc_src, tmp_path)
    release = src / "2018IEEE_Contest" / "Phase2"
    dsm = release / "Lidar GeoTiff Rasters" / "DSM_C12" / "UH17c_GEF051.tif"
    with rasterio.open(dsm) as s:
        data, t = s.read(), s.transform
    dfc_data.write(dsm, data, t @ Affine.translation(0.5, 0))  # a quarter metre off the grid
    assert "UH17c_GEF051.tif" in _refused(tmp_path, "dfc2018", "--src", src)
    dfc_data.write(dsm, data, t)
    shutil.rmtree(release / "Lidar Point Cloud Tiles" / "C2")
    assert "no C2 LiDAR tiles" in _refused(tmp_path, "dfc2018", "--src", src)
    gt = release / "TrainingGT" / "2018_IEEE_GRSS_DFC_GT_TR.tif"
    with rasterio.open(gt) as s:
        labels, t = s.read(), s.transform
    labels[0, 0, 0] = 25
    dfc_data.write(gt, labels, t)
    assert "outside 0..20" in _refused(tmp_path, "dfc2018", "--src", src)


def test_bad_options_and_foreign_out(vaihingen_src: Path, tmp_path: Path):
    assert "KEY=GLOB" in _refused(tmp_path, "vaihingen", "--src", vaihingen_src, "--layout", "x")
    assert "not training areas" in _refused(
        tmp_path, "vaihingen", "--src", vaihingen_src, "--val-areas", "2"
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("finished work")
    res = cli("prepare", "vaihingen", "--src", vaihingen_src, "--out", tmp_path / "other",
              "--tile-size", TILE, "--no-progress")  # fmt: skip
    assert "not empty" in one_line_error(res)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("name", ["vaihingen", "dfc2018"])
def test_benchmark_configs_fit_their_builds(name: str, request: pytest.FixtureRequest):
    """configs/ikdnet-<name>.yaml names bands and point features the prepared build has."""
    from geoseg.train.config import load_config

    build = request.getfixturevalue("vaihingen_build" if name == "vaihingen" else "dfc_build")
    cfg = load_config(Path(__file__).parents[1] / "configs" / f"ikdnet-{name}.yaml")
    bands = ["red", "green", "blue"] if cfg.data.bands == "rgb" else cfg.data.bands
    assert set(bands) <= set(json.loads((build / "stats.json").read_text())["bands"])
    las = laspy.read(next(build.glob("tiles/*/points.laz")))
    fields = {*las.point_format.dimension_names}
    assert set(cfg.data.point_config().features) <= fields
