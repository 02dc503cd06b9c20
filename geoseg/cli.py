"""The `geoseg` command line: thin wrappers over the library, one-line errors, stable exit codes.

Exit codes: 0 ok; 1 the job ran into a problem (empty search, unreachable API, tiles failed);
2 bad input (unknown region, AOI outside the catalog, bad option values).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from geoseg import __version__
from geoseg.stac.retry import DEFAULT_POLICY as DEFAULT_READS

EXIT_BAD_INPUT = 2


device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (a CUDA GPU if torch sees one, else the CPU), cpu, cuda, cuda:N or mps.",
)
tta_option = click.option(
    "--tta/--no-tta",
    default=None,
    help="Average the 8 flips and quarter turns of every tile (8x the compute). Default: the "
    "checkpoint's own setting (its training config's inference.tta).",
)


def _fail(message: str, code: int) -> None:
    click.echo(f"geoseg: error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
def main() -> None:
    """geoseg: NAIP + 3DEP LiDAR land-cover datasets, models and tile search."""


@main.command("build-dataset")
@click.option("--region", help='"CA" (default), or a county name, e.g. "Santa Clara".')
@click.option("--bbox", nargs=4, type=float, metavar="W S E N", help="lon/lat bounding box.")
@click.option("--aoi", type=click.Path(path_type=Path), help="GeoJSON (or any vector) AOI file.")
@click.option("--year", type=int, help="NAIP year, e.g. 2022 (same as --datetime 2022).")
@click.option("--datetime", "datetime_", help="NAIP date or range, e.g. 2018/2022.")
@click.option(
    "--gsd", type=float, default=None, help="Tile pixel size in metres [1.0; sample: 0.5]."
)
@click.option("--tile-size", type=int, default=None, help="Tile size in pixels [512; sample: 64].")
@click.option(
    "--max-tiles",
    type=int,
    help="Stop once N tiles are ready (built now or earlier); candidates go in tile-id order.",
)
@click.option("--stac-url", help="Any STAC API with `naip` and `3dep-lidar-copc` collections.")
@click.option(
    "--catalog",
    type=click.Choice(["planetary-computer", "sample"]),
    default="planetary-computer",
    show_default=True,
    help="`sample` = the embedded offline sample region, served by a local STAC API.",
)
@click.option("--scheduler", help="Address of an existing dask scheduler (tcp://host:8786).")
@click.option("--workers", type=int, help="Workers of the local dask cluster [CPU count].")
@click.option(
    "--min-coverage",
    type=float,
    default=0.25,
    show_default=True,
    help="Skip tiles whose NAIP or LiDAR coverage is below this fraction.",
)
@click.option(
    "--signer",
    default="auto",
    show_default=True,
    help="How asset URLs are signed: auto (Planetary Computer's for its API), none, "
    "planetary-computer, or package.module:Name for a store with its own tokens.",
)
@click.option(
    "--read-tries",
    type=int,
    default=DEFAULT_READS.tries,
    show_default=True,
    help="Attempts per HTTP range request (COPC) or window read (COG) before a tile fails.",
)
@click.option(
    "--read-budget",
    type=float,
    default=DEFAULT_READS.budget_s,
    show_default=True,
    help="Most seconds one asset read may wait between retries (Retry-After included).",
)
@click.option(
    "--read-timeout",
    type=float,
    default=DEFAULT_READS.timeout_s,
    show_default=True,
    help="Seconds without progress after which an HTTP request is retried.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
def build_dataset_cmd(
    region: str | None,
    bbox: tuple[float, float, float, float] | None,
    aoi: Path | None,
    year: int | None,
    datetime_: str | None,
    gsd: float | None,
    tile_size: int | None,
    max_tiles: int | None,
    stac_url: str | None,
    catalog: str,
    scheduler: str | None,
    workers: int | None,
    min_coverage: float,
    signer: str,
    read_tries: int,
    read_budget: float,
    read_timeout: float,
    no_progress: bool,
    out: Path,
) -> None:
    """Build N3C-style tiles (image, label, points, DSM, ...) for a region.

    Searches NAIP and 3DEP LiDAR (COPC) through STAC, cuts tiles on the NAIP UTM grid, labels them
    from the LiDAR's ASPRS classes and writes a STAC catalog, a GeoParquet index, stats, splits
    and a report to --out. Rerunning the same command finishes an interrupted build.
    """
    from geoseg.builder.errors import BuildError
    from geoseg.builder.runner import BuildConfig, build_dataset
    from geoseg.regions import RegionError
    from geoseg.stac.client import StacError

    if year is not None and datetime_ is not None:
        _fail("give --year or --datetime, not both", EXIT_BAD_INPUT)
    if year is not None:
        datetime_ = f"{year}-01-01/{year}-12-31"
    if (
        (gsd is not None and gsd <= 0)
        or (tile_size is not None and tile_size < 16)
        or (max_tiles is not None and max_tiles < 1)
    ):
        _fail("--gsd must be > 0, --tile-size >= 16 and --max-tiles >= 1", EXIT_BAD_INPUT)
    if not 0.0 <= min_coverage <= 1.0:
        _fail("--min-coverage must be between 0 and 1", EXIT_BAD_INPUT)
    cfg = BuildConfig(
        out=str(out),
        region=region,
        bbox=list(bbox) if bbox else None,
        aoi=str(aoi) if aoi else None,
        datetime=datetime_,
        gsd=gsd,
        tile_size=tile_size,
        max_tiles=max_tiles,
        catalog=catalog,
        stac_url=stac_url,
        scheduler=scheduler,
        min_coverage=min_coverage,
        signer=signer,
        read_tries=read_tries,
        read_budget_s=read_budget,
        read_timeout_s=read_timeout,
    )
    if workers is not None:
        cfg.workers = workers
    try:
        summary = build_dataset(
            cfg, echo=lambda m: click.echo(m, err=True), progress=not no_progress
        )
    except RegionError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except BuildError as exc:
        _fail(str(exc), exc.exit_code)
    except StacError as exc:
        _fail(str(exc), 1)
    failed = summary.count("failed")
    ok = summary.count("built") + summary.count("cached")
    click.echo(
        f"{ok} tiles ready in {summary.out} ({summary.count('built')} built, "
        f"{summary.count('cached')} already there, {failed} failed); see report.md"
    )
    if failed:
        sys.exit(1)


@main.command("train")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Training config YAML, e.g. configs/ikdnet.yaml.",
)
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Build folder.")
@click.option("--devices", help='Devices per node, e.g. 4 or "auto" [config].')
@click.option("--num-nodes", type=int, help="Number of nodes (DDP) [config].")
@click.option("--max-steps", type=int, help="Stop after K optimiser steps in total [config].")
@click.option("--no-progress", is_flag=True, help="No progress bar or model summary.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder.")
def train_cmd(
    config_path: Path,
    data: Path,
    devices: str | None,
    num_nodes: int | None,
    max_steps: int | None,
    no_progress: bool,
    out: Path,
) -> None:
    """Train a model on a build; rerunning the same command resumes from RUN/checkpoints/last.ckpt.

    Writes the resolved config to RUN/config.yaml, checkpoints (last.ckpt and the best by val
    mIoU) carrying the model contract to RUN/checkpoints, CSV logs to RUN/logs and the model
    card to RUN/model_card.json/.md.
    """
    from geoseg.checkpoints import CheckpointError
    from geoseg.train.config import ConfigError, DataError, load_config
    from geoseg.train.fit import train

    if (num_nodes is not None and num_nodes < 1) or (max_steps is not None and max_steps < 1):
        _fail("--num-nodes and --max-steps must be >= 1", EXIT_BAD_INPUT)
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    if devices is not None:
        cfg.trainer.devices = int(devices) if devices.isdigit() else devices
    if num_nodes is not None:
        cfg.trainer.num_nodes = num_nodes
    if max_steps is not None:
        cfg.trainer.max_steps = max_steps
    try:
        last = train(cfg, data, out, progress=not no_progress)
    except (CheckpointError, ConfigError, DataError) as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    click.echo(f"trained {cfg.model.name}; latest checkpoint {last}")


@main.command("evaluate")
@click.option(
    "--checkpoint", required=True, type=click.Path(path_type=Path), help="A geoseg checkpoint."
)
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Build folder.")
@click.option(
    "--split",
    type=click.Choice(["train", "val", "test"]),
    default="test",
    show_default=True,
    help="Split of the build to evaluate on.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True)
@device_option
@tta_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
def evaluate_cmd(
    checkpoint: Path,
    data: Path,
    split: str,
    batch_size: int,
    device: str,
    tta: bool | None,
    out: Path,
) -> None:
    """Per-class IoU/F1/Acc, mIoU, OA, kappa and confusion matrices of a checkpoint on a split.

    Writes metrics.json and confusion.json/.png (pixels; points_confusion.* for point models)
    to --out. Unlabeled pixels and points are excluded.
    """
    from geoseg.checkpoints import CheckpointError, check_checkpoint_file

    try:  # before importing torch (10+ s): a wrong path is reported at once
        check_checkpoint_file(checkpoint)
    except CheckpointError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    from geoseg.device import DeviceError
    from geoseg.train.config import DataError
    from geoseg.train.evaluate import evaluate

    try:
        result = evaluate(checkpoint, data, split, out, batch_size, device, tta)
    except (CheckpointError, DataError, DeviceError) as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    scores = result["pixels"]
    shown = "  ".join(
        f"{key} {'n/a' if scores[key] is None else format(scores[key], '.3f')}"
        for key in ("miou", "oa", "kappa")
    )
    how = " with TTA" if result["tta"] else ""
    click.echo(f"{split}: {shown} over {result['tiles']} tiles{how}; see {out / 'metrics.json'}")


@main.command("predict")
@click.option(
    "--checkpoint", required=True, type=click.Path(path_type=Path), help="A geoseg checkpoint."
)
@click.option(
    "--image", required=True, type=click.Path(path_type=Path), help="Georeferenced scene."
)
@click.option(
    "--points",
    multiple=True,
    type=click.Path(path_type=Path),
    help="LiDAR of the scene (COPC, LAS or LAZ with a CRS); repeat for several files.",
)
@click.option("--stac-url", help="Find the scene's COPC points through this STAC API instead.")
@click.option(
    "--catalog",
    type=click.Choice(["planetary-computer", "sample"]),
    help="Find the scene's COPC points in this catalog (`sample`: the embedded offline one).",
)
@click.option(
    "--overlap",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.25,
    show_default=True,
    help="Fraction of a window shared with its neighbour.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--vector", type=click.Path(path_type=Path), help="Also write class polygons (GPKG).")
@click.option(
    "--datetime",
    "datetime_",
    help="Scene acquisition date (ISO) for the STAC Item, when neither a STAC item beside the "
    "scene, its metadata nor its file name gives one.",
)
@device_option
@tta_option
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Class-map COG.")
def predict_cmd(
    checkpoint: Path,
    image: Path,
    points: tuple[Path, ...],
    stac_url: str | None,
    catalog: str | None,
    overlap: float,
    batch_size: int,
    vector: Path | None,
    datetime_: str | None,
    device: str,
    tta: bool | None,
    out: Path,
) -> None:
    """Class map of a whole scene (sliding windows, blended seams), with its LiDAR if needed.

    Writes a uint8 COG with the class palette (0 where the scene is nodata), a STAC Item
    (<out>.json) beside it and, with --vector, one polygon per class region as a GeoPackage.
    The scene's bands must be the checkpoint's image bands in order, at its pixel size (within
    10 %). IKD-Net, RandLA-Net and early fusion also need the scene's points: --points files, or
    the COPC items of --stac-url / --catalog covering the scene.
    """
    from geoseg.checkpoints import CheckpointError, check_checkpoint_file

    try:  # before importing torch (10+ s): a wrong path is reported at once
        check_checkpoint_file(checkpoint)
    except CheckpointError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    from geoseg.device import DeviceError
    from geoseg.predict import PredictError, predict
    from geoseg.stac.client import StacError

    try:
        item = predict(
            checkpoint, image, out, points=list(points) or None, stac_url=stac_url,
            catalog=catalog, overlap=overlap, batch_size=batch_size, vector=vector, device=device,
            datetime=datetime_, tta=tta,
        )  # fmt: skip
    except (CheckpointError, PredictError, DeviceError) as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except StacError as exc:
        _fail(str(exc), 1)
    props = item["properties"]
    shape = props["proj:shape"]
    skipped = props["geoseg:skipped_windows"]
    if skipped:
        click.echo(
            f"warning: {skipped} of {props['geoseg:windows']} windows had too few points and "
            "were skipped (nodata where no other window covers)",
            err=True,
        )
    click.echo(f"predicted {shape[0]} x {shape[1]} px on {props['geoseg:device']}: {out}")


@main.group("qgis")
def qgis_group() -> None:
    """The geoseg QGIS plugin: package it, or install it into a QGIS profile."""


@qgis_group.command("package")
@click.option(
    "--out", default="geoseg_qgis.zip", show_default=True, type=click.Path(path_type=Path)
)
@click.option("--no-engine", is_flag=True, help="Do not point the zip at this environment.")
def qgis_package_cmd(out: Path, no_engine: bool) -> None:
    """Write the plugin zip for QGIS's plugin manager ("Install from ZIP")."""
    from geoseg.qgis_install import QgisInstallError, package

    try:
        package(out, None if no_engine else sys.executable)
    except QgisInstallError as exc:
        _fail(str(exc), 1)
    click.echo(f"plugin zip: {out}")


@qgis_group.command("install")
@click.option("--profile", default="default", show_default=True, help="QGIS user profile.")
def qgis_install_cmd(profile: str) -> None:
    """Install the plugin into a QGIS profile, running this environment's Python as its engine."""
    from geoseg.qgis_install import QgisInstallError, install

    try:
        target = install(profile)
    except QgisInstallError as exc:
        _fail(str(exc), 1)
    click.echo(
        f"installed {target} (engine {sys.executable}); enable 'geoseg' in "
        "Plugins > Manage and Install Plugins, or: qgis_process plugins enable geoseg_qgis"
    )


def _add_prepare_commands() -> None:
    """`geoseg prepare vaihingen|dfc2018` (geoseg/prepare/cli.py; imports nothing heavy)."""
    from geoseg.prepare.cli import prepare_group

    main.add_command(prepare_group)


def _add_plugin_commands() -> None:
    """Subcommands registered by other packages (retrieval/) under the `geoseg.commands`
    entry-point group, so geoseg gains them without importing those packages itself."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="geoseg.commands"):
        main.add_command(entry.load(), entry.name)


_add_prepare_commands()
_add_plugin_commands()

if __name__ == "__main__":
    main()
