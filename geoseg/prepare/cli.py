"""`geoseg prepare vaihingen|dfc2018`: thin click wrappers, one-line errors (exit 2 = bad input)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

EXIT_BAD_INPUT = 2

layout_option = click.option(
    "--layout",
    multiple=True,
    metavar="KEY=GLOB",
    help="Where an input is under --src, relative glob (repeatable; see docs/datasets.md).",
)
common = [
    click.option("--src", required=True, type=click.Path(path_type=Path), help="The release."),
    click.option("--tile-size", type=int, default=512, show_default=True, help="Tile size (px)."),
    click.option("--no-progress", is_flag=True, help="No progress bar."),
    click.option("--out", required=True, type=click.Path(path_type=Path), help="Build folder."),
]


def _fail(message: str) -> None:
    click.echo(f"geoseg: error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _layout(values: tuple[str, ...], known) -> tuple[tuple[str, str], ...]:
    pairs = []
    for value in values:
        key, sep, glob = value.partition("=")
        if not sep or key not in known or not glob:
            _fail(f"--layout {value!r}: expected KEY=GLOB with KEY one of {sorted(known)}")
        pairs.append((key, glob))
    return tuple(pairs)


def _run(plan_fn, cfg, out: Path, no_progress: bool) -> None:
    from geoseg.prepare.run import PrepareError, run_plan

    try:
        report = run_plan(plan_fn(cfg), out, lambda m: click.echo(m, err=True), not no_progress)
    except PrepareError as exc:
        _fail(str(exc))
    tiles = report["tiles"]
    splits = ", ".join(f"{k} {v}" for k, v in report["splits"].items())
    click.echo(
        f"{tiles['written'] + tiles['cached']} tiles ready in {out} ({splits}; "
        f"{tiles['skipped']} skipped); see report.md"
    )


def _with(options):
    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


@click.group("prepare")
def prepare_group() -> None:
    """Turn a benchmark release you hold (ISPRS Vaihingen, DFC2018) into a geoseg build."""


@prepare_group.command("vaihingen")
@_with(common)
@click.option(
    "--lidar",
    type=click.Choice(["auto", "las", "pts"]),
    default="auto",
    show_default=True,
    help="ALS strips (all areas) or 3D-labelling .pts files (a few areas); auto: strips if any.",
)
@click.option("--crs", default="EPSG:32632", show_default=True, help="For files without a CRS.")
@click.option(
    "--val-areas",
    default="5,15,21,30",
    show_default=True,
    help="Training areas held out for validation (comma-separated).",
)
@layout_option
def vaihingen_cmd(
    src: Path,
    tile_size: int,
    no_progress: bool,
    out: Path,
    lidar: str,
    crs: str,
    val_areas: str,
    layout: tuple[str, ...],
) -> None:
    """ISPRS 2D semantic labelling, Vaihingen: IRRG + DSM + LiDAR, 6 classes, official split.

    Validation and test tiles are labelled with the eroded (no-boundary) reference, the one the
    benchmark scores with; `geoseg evaluate` then reports its OA, per-class F1 and mIoU.
    """
    from geoseg.prepare.vaihingen import LAYOUT, VaihingenConfig, plan

    try:
        val = tuple(int(a) for a in val_areas.split(",") if a.strip())
    except ValueError:
        _fail(f"--val-areas {val_areas!r}: expected area numbers like 5,15,21,30")
    cfg = VaihingenConfig(src, tile_size, lidar, crs, val, _layout(layout, LAYOUT))
    _run(plan, cfg, out, no_progress)


@prepare_group.command("dfc2018")
@_with(common)
@click.option("--hsi", is_flag=True, help="Add the 48-band hyperspectral cube (hsi.tif).")
@click.option(
    "--test-labels",
    type=click.Path(path_type=Path),
    help="The test reference (not in the release); without it test tiles are unlabelled.",
)
@click.option(
    "--val-fraction",
    type=float,
    default=0.15,
    show_default=True,
    help="Share of the training labels held out for validation (easternmost cell columns).",
)
@click.option("--crs", default="EPSG:26915", show_default=True, help="For files without a CRS.")
@layout_option
def dfc2018_cmd(
    src: Path,
    tile_size: int,
    no_progress: bool,
    out: Path,
    hsi: bool,
    test_labels: Path | None,
    val_fraction: float,
    crs: str,
    layout: tuple[str, ...],
) -> None:
    """2018 IEEE GRSS Data Fusion Contest (Houston): VHR RGB + multispectral LiDAR (+ HSI), 20
    classes at 0.5 m, the contest's train/test split; evaluated with OA, AA and kappa."""
    from geoseg.prepare.dfc2018 import LAYOUT, DFC2018Config, plan

    cfg = DFC2018Config(
        src, tile_size, hsi, test_labels, val_fraction, crs, _layout(layout, LAYOUT)
    )
    _run(plan, cfg, out, no_progress)
