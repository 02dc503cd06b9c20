"""The `geoseg` command line: thin wrappers over the library, one-line errors, stable exit codes.

Exit codes: 0 ok; 1 the job ran into a problem (empty search, unreachable API, tiles failed);
2 bad input (unknown region, AOI outside the catalog, bad option values).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from geoseg import __version__

EXIT_BAD_INPUT = 2


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
@click.option("--max-tiles", type=int, help="Build at most N tiles (first N by tile id).")
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
    no_progress: bool,
    out: Path,
) -> None:
    """Build N3C-style tiles (image, label, points, DSM, ...) for a region.

    Searches NAIP and 3DEP LiDAR (COPC) through STAC, cuts tiles on the NAIP UTM grid, labels them
    from the LiDAR's ASPRS classes and writes a STAC catalog, a GeoParquet index, stats, splits
    and a report to --out. Rerunning the same command finishes an interrupted build.
    """
    from geoseg.build.errors import BuildError
    from geoseg.build.runner import BuildConfig, build_dataset
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
    )
    if workers is not None:
        cfg.workers = workers
    try:
        summary = build_dataset(
            cfg, echo=lambda m: click.echo(m, err=True), progress=not no_progress
        )
    except RegionError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except (BuildError, StacError) as exc:
        _fail(str(exc), 1)
    failed = summary.count("failed")
    ok = summary.count("built") + summary.count("cached")
    click.echo(
        f"{ok} tiles ready in {summary.out} ({summary.count('built')} built, "
        f"{summary.count('cached')} already there, {failed} failed); see report.md"
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
