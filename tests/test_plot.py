"""geoseg.plot: contrast stretch, class palette, tile reading and figures on real sample tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from geoseg.builder.runner import BuildConfig, plan_build
from geoseg.classes import CLASS_COLORS, CLASS_NAMES
from geoseg.plot import (
    class_colormap,
    plot_grid,
    plot_thumbnails,
    plot_tiles,
    plot_training_log,
    read_tile,
    stretch,
)


def test_stretch_maps_percentiles_of_valid_pixels_to_unit_range() -> None:
    band = np.arange(1, 101, dtype=np.uint8).reshape(10, 10)
    image = np.stack([band, band + 100])
    image[:, 0, :] = 0  # a nodata row must not pull the low percentile down
    out = stretch(image, percentiles=(0.0, 100.0))
    assert out.dtype == np.float32
    assert out.shape == image.shape
    assert out[0, 1, 0] == 0.0  # 11, the smallest valid value of all bands
    assert out[1, -1, -1] == 1.0  # 200, the largest
    assert np.all(out[:, 0, :] == 0.0)
    # one range for all bands: the colour balance (band 1 brighter than band 0) survives
    assert np.all(out[1, 1:] > out[0, 1:])


def test_stretch_survives_constant_and_empty_images() -> None:
    flat = np.full((3, 4, 4), 7, np.uint8)
    assert np.all(stretch(flat) == 0.0)  # no division by zero, no NaN
    assert np.all(stretch(np.zeros((3, 4, 4), np.uint8)) == 0.0)


def test_class_colormap_is_the_palette_and_overlay_hides_unlabeled() -> None:
    opaque = class_colormap()
    overlay = class_colormap(overlay_alpha=0.4)
    assert opaque.N == overlay.N == len(CLASS_NAMES)
    for k, rgba in CLASS_COLORS.items():
        np.testing.assert_allclose(opaque(k)[:3], np.array(rgba[:3]) / 255)
        assert opaque(k)[3] == 1.0
    assert overlay(0)[3] == 0.0
    assert all(overlay(k)[3] == pytest.approx(0.4) for k in range(1, len(CLASS_NAMES)))


def test_read_tile_layers_agree_with_the_manifest(sample_build: Path) -> None:
    manifest_path = sorted(sample_build.glob("tiles/*/tile.json"))[0]
    manifest = json.loads(manifest_path.read_text())
    tile = read_tile(sample_build, manifest["tile_id"])
    size = manifest["tile"]["size"]
    assert tile.image.shape == (4, size, size)
    assert tile.label.shape == tile.dsm.shape == (size, size)
    assert tile.xyz.shape == (len(tile.point_classes), 3)
    assert tile.point_classes.max() < len(CLASS_NAMES)
    counts = np.bincount(tile.point_classes, minlength=len(CLASS_NAMES))
    for k, name in enumerate(CLASS_NAMES[1:], start=1):  # noise is dropped: only class 0 shrinks
        assert counts[k] == manifest["points"]["n3c"][name]
    assert read_tile(sample_build, manifest["tile_id"], points=False).xyz.shape == (0, 3)


def test_plot_tiles_draws_every_panel_and_refuses_unknown_ones(sample_build: Path) -> None:
    tiles = sorted(p.parent.name for p in sample_build.glob("tiles/*/tile.json"))[:2]
    fig = plot_tiles(sample_build, tiles)
    images = [ax for ax in fig.axes if ax.get_title()]
    assert len(images) == 2 * 4
    assert [ax.get_title() for ax in images[:4]] == [
        "image (RGB)",
        "label over image",
        "DSM (m)",
        "points (top view)",
    ]
    assert len(images[3].collections[0].get_offsets()) > 0  # points drawn
    with pytest.raises(ValueError, match="panels"):
        plot_tiles(sample_build, tiles, panels=("rgb", "ndvi"))


def test_plot_thumbnails_titles_each_tile(sample_build: Path) -> None:
    tiles = sorted(p.parent.name for p in sample_build.glob("tiles/*/tile.json"))[:3]
    fig = plot_thumbnails(sample_build, tiles, titles=["a", "b", "c"], cols=2)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled] == ["a", "b", "c"]
    assert len(fig.axes) == 4  # 2 x 2 grid, the spare cell left blank
    rgb = titled[0].get_images()[0].get_array()
    assert rgb.shape == (64, 64, 3) and rgb.min() >= 0.0 and rgb.max() <= 1.0
    with pytest.raises(ValueError, match="no tiles"):
        plot_thumbnails(sample_build, [])


def test_plan_build_alone_gives_the_grid_to_plot() -> None:
    # gsd/tile size left unset: plan_build fills in the catalog defaults itself.
    _, region, planned, search = plan_build(
        BuildConfig(out="unused", catalog="sample", region="Fresno")
    )
    assert region.name == "Fresno"
    assert search["planned_tiles"] == len(planned) > 0
    assert {p.tile.gsd for p in planned} == {0.5} and {p.tile.size for p in planned} == {64}
    fig = plot_grid(planned, region.geometry)
    ax = fig.axes[0]
    buildable = sum(p.skip_reason is None for p in planned)
    filled = [patch for patch in ax.patches if patch.get_fill()]
    assert len(filled) == buildable
    assert len(ax.patches) == len(planned)
    west, _, east, north = region.bounds
    xmin, xmax = ax.get_xlim()
    assert xmin <= west and xmax >= east and ax.get_ylim()[1] >= north  # the whole county shows


def test_plot_training_log_joins_resumed_versions(tmp_path: Path) -> None:
    versions = [(f"version_{v}", [v]) for v in range(11)]  # version_10 comes after version_9
    for version, steps in versions:
        folder = tmp_path / "logs" / version
        folder.mkdir(parents=True)
        rows = [{"step": s, "train_loss": 4.0 - s, "val_loss": np.nan} for s in steps]
        rows.append({"step": steps[-1], "train_loss": np.nan, "val_loss": 3.0 - steps[-1]})
        pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    fig = plot_training_log(tmp_path)
    assert isinstance(fig, Figure)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["train loss"].get_xdata()) == list(range(11))
    assert list(lines["val loss"].get_ydata()) == [3.0 - v for v in range(11)]
    with pytest.raises(FileNotFoundError, match=r"metrics\.csv"):
        plot_training_log(tmp_path / "missing")
