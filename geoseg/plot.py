"""Figures of geoseg data: tiles (RGB, DSM, labels, points), the tile grid, training curves.

One module draws tiles so the build preview, the notebooks and search thumbnails look alike: the
same contrast stretch and the class palette of the build's class set (`geoseg.classes`: N3C for
`build-dataset` builds, the benchmark's for `geoseg prepare` builds). Everything draws on a bare
`Figure` or on an `Axes` the caller passes: no pyplot state and no backend switch, so the same
calls work headless (build reports, CI) and inline in Jupyter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np
import pandas as pd
import rasterio
import shapely
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from geoseg.builder.plan import PlannedTile
from geoseg.builder.writers import safe_join
from geoseg.classes import N3C, NOISE_CODES, ClassSet, build_classes, point_labels

__all__ = [
    "PANELS",
    "TileLayers",
    "class_colormap",
    "class_legend_handles",
    "plot_grid",
    "plot_thumbnails",
    "plot_tiles",
    "plot_training_log",
    "read_tile",
    "show_dsm",
    "show_labels",
    "show_points",
    "show_rgb",
    "stretch",
    "training_log",
]

PANELS = {
    "rgb": "image (RGB)",
    "label": "label",
    "overlay": "label over image",
    "dsm": "DSM (m)",
    "points": "points (top view)",
}
"""Panel names `plot_tiles` understands, with their column titles."""

LEGEND_ENTRY_INCHES = 1.8
"""Width of one legend entry (patch and a class name like `non_residential_buildings`): a
figure's legend has as many columns as fit, so DFC2018's 21 classes wrap onto more lines."""


def _palette(classes: ClassSet) -> np.ndarray:
    """(K, 4) RGBA floats of the class set's colours."""
    return np.array(classes.colors, float) / 255


def class_colormap(overlay_alpha: float | None = None, classes: ClassSet = N3C) -> ListedColormap:
    """The class palette as a colormap for label rasters (values 0..K-1, `vmin=0`, `vmax=K-1`).

    Opaque by default (unlabeled black). With `overlay_alpha` the classes get that opacity and
    unlabeled becomes fully transparent, so an overlay never hides the image where there is no
    label.
    """
    colors = _palette(classes)
    colors[:, 3] = 1.0 if overlay_alpha is None else overlay_alpha
    if overlay_alpha is not None:
        colors[0, 3] = 0.0
    return ListedColormap(colors, name="geoseg-classes")


def class_legend_handles(with_unlabeled: bool = True, classes: ClassSet = N3C) -> list[Patch]:
    """Legend patches in the class palette, for `fig.legend(handles=...)`."""
    first = 0 if with_unlabeled else 1
    colors = _palette(classes)
    return [Patch(color=colors[k, :3], label=classes.names[k]) for k in range(first, len(classes))]


def stretch(
    bands: np.ndarray,
    percentiles: tuple[float, float] = (2.0, 98.0),
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """(C, H, W) bands -> float32 in [0, 1]: the low/high percentiles of all bands map to 0/1.

    Dark forest or hazy NAIP tiles are unreadable without a stretch. One range for all bands
    keeps the colour balance (a per-band stretch turns grey-green canopy pink). Percentiles are
    taken over `valid` pixels only (default: where any band is non-zero, the image nodata), so
    black borders do not flatten the contrast; invalid pixels become 0.
    """
    data = np.asarray(bands, dtype=np.float32)
    if valid is None:
        valid = (data != 0).any(axis=0)
    out = np.zeros_like(data)
    if not valid.any():
        return out
    lo, hi = np.percentile(data[:, valid], percentiles)
    out[:, valid] = np.clip((data[:, valid] - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    return out


@dataclass
class TileLayers:
    """One built tile's layers, as read from its folder (see docs/dataset.md)."""

    tile_id: str
    image: np.ndarray
    """(4, H, W) uint8 R, G, B, NIR; 0 = nodata."""
    label: np.ndarray
    """(H, W) uint8 class index (label value of `classes`)."""
    dsm: np.ma.MaskedArray
    """(H, W) float32 surface height in metres, masked where no point fell."""
    xyz: np.ndarray
    """(N, 3) float64 point coordinates in the tile CRS, noise dropped (empty when not read)."""
    point_classes: np.ndarray
    """(N,) uint8 point class index, same scheme as `label` (`geoseg.classes.point_labels`)."""
    bounds: tuple[float, float, float, float]
    """(xmin, ymin, xmax, ymax) of the tile in its CRS: the frame for the points."""
    classes: ClassSet = N3C
    """The build's class set: names and palette of `label` and `point_classes`."""
    missing_bands: tuple[str, ...] = ()
    """Bands of `image` its source lacked (0 there), e.g. Vaihingen's blue."""

    def display(self) -> tuple[np.ndarray, str]:
        """(3, H, W) bands to draw and their name: RGB, or IR-R-G false colour when the source
        had no blue but NIR (how ISPRS Vaihingen is always shown)."""
        if "blue" in self.missing_bands and "nir" not in self.missing_bands:
            return self.image[[3, 0, 1]], "IRRG"
        return self.image[:3], "RGB"


def read_tile(build: str | Path, tile_id: str, points: bool = True) -> TileLayers:
    """Read a tile of a build folder; `points=False` skips the (larger) point cloud."""
    folder = safe_join(Path(build), "tiles", tile_id)
    with rasterio.open(folder / "image.tif") as src:
        image = src.read()
        missing = tuple(b for b in src.tags().get("MISSING_BANDS", "").split(",") if b)
    with rasterio.open(folder / "label.tif") as src:
        label = src.read(1)
        bounds = tuple(src.bounds)
    with rasterio.open(folder / "dsm.tif") as src:
        dsm = src.read(1, masked=True)
    xyz, classes = np.zeros((0, 3)), np.zeros(0, np.uint8)
    if points:
        las = laspy.read(folder / "points.laz")
        keep = ~np.isin(np.asarray(las.classification), list(NOISE_CODES))  # as in training
        xyz = np.column_stack([las.x, las.y, las.z])[keep].astype(np.float64)
        classes = point_labels(las)[keep]
    return TileLayers(
        tile_id, image, label, dsm, xyz, classes, bounds, build_classes(build), missing
    )


def _bare(ax: Axes, title: str | None = None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def show_rgb(
    ax: Axes, image: np.ndarray, percentiles: tuple[float, float] = (2.0, 98.0)
) -> AxesImage:
    """Draw the first three bands of a (C, H, W) image, contrast-stretched (`stretch`)."""
    rgb = stretch(image[:3], percentiles)
    return ax.imshow(np.moveaxis(rgb, 0, -1), interpolation="nearest")


def show_labels(
    ax: Axes,
    label: np.ndarray,
    image: np.ndarray | None = None,
    alpha: float = 0.5,
    classes: ClassSet = N3C,
) -> AxesImage:
    """Draw a class raster in the class set's palette; over `image` (stretched RGB) if given."""
    if image is None:
        cmap = class_colormap(classes=classes)
    else:
        show_rgb(ax, image)
        cmap = class_colormap(overlay_alpha=alpha, classes=classes)
    return ax.imshow(label, cmap=cmap, vmin=0, vmax=len(classes) - 1, interpolation="nearest")


def show_dsm(ax: Axes, dsm: np.ndarray, cmap: str = "viridis") -> AxesImage:
    """Draw a height raster (masked cells stay blank); add `fig.colorbar(...)` for a scale."""
    return ax.imshow(dsm, cmap=cmap, interpolation="nearest")


def show_points(
    ax: Axes,
    xyz: np.ndarray,
    classes: np.ndarray,
    view: str = "top",
    size: float = 1.0,
    bounds: tuple[float, float, float, float] | None = None,
    palette: ClassSet = N3C,
) -> None:
    """Scatter points coloured by class: `top` (x/y, highest drawn last) or `side` (x/z).

    `bounds` (xmin, ymin, xmax, ymax) frames the plot like the tile's rasters (x only for `side`).
    """
    if view not in ("top", "side"):
        raise ValueError(f"view must be 'top' or 'side', got {view!r}")
    order = np.argsort(xyz[:, 2]) if view == "top" else np.arange(len(xyz))
    x, y = xyz[order, 0], xyz[order, 1 if view == "top" else 2]
    colors = _palette(palette)
    colors[0] = (0.5, 0.5, 0.5, 1.0)  # unlabeled points: grey, visible on white
    ax.scatter(x, y, c=colors[np.asarray(classes)[order]], s=size, linewidths=0)
    ax.set_aspect("equal" if view == "top" else "auto")
    if bounds is not None:
        ax.set_xlim(bounds[0], bounds[2])
        if view == "top":
            ax.set_ylim(bounds[1], bounds[3])


def plot_tiles(
    build: str | Path,
    tile_ids: Sequence[str],
    panels: Sequence[str] = ("rgb", "overlay", "dsm", "points"),
    panel_size: float = 3.0,
) -> Figure:
    """One row per tile, one column per panel (see `PANELS`), the build's class legend below."""
    unknown = [p for p in panels if p not in PANELS]
    if unknown or not tile_ids:
        raise ValueError(f"need tile ids and panels from {list(PANELS)}; got {list(panels)}")
    classes = build_classes(build)
    width = panel_size * len(panels)
    columns = max(1, min(len(classes), int(width / LEGEND_ENTRY_INCHES)))
    legend = 0.15 + 0.25 * -(-len(classes) // columns)  # inches: one line per row of entries
    fig = Figure(figsize=(width, panel_size * len(tile_ids) + legend))
    axes = fig.subplots(len(tile_ids), len(panels), squeeze=False)
    for row, tid in zip(axes, tile_ids, strict=True):
        tile = read_tile(build, tid, points="points" in panels)
        shown, kind = tile.display()
        for ax, panel in zip(row, panels, strict=True):
            title = PANELS[panel]
            if panel == "rgb":
                show_rgb(ax, shown)
                title = f"image ({kind})"
            elif panel == "label":
                show_labels(ax, tile.label, classes=tile.classes)
            elif panel == "overlay":
                show_labels(ax, tile.label, shown, classes=tile.classes)
            elif panel == "dsm":
                fig.colorbar(show_dsm(ax, tile.dsm), ax=ax, fraction=0.046, pad=0.02)
            else:
                show_points(ax, tile.xyz, tile.point_classes, bounds=tile.bounds,
                            palette=tile.classes)  # fmt: skip
            _bare(ax, title)
        row[0].set_ylabel(tid, fontsize=7)
    handles = class_legend_handles(classes=classes)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8)
    fig.tight_layout(rect=(0, legend / fig.get_figheight(), 1, 1))
    return fig


def plot_thumbnails(
    build: str | Path,
    tile_ids: Sequence[str],
    titles: Sequence[str] | None = None,
    cols: int = 5,
    size: float = 2.2,
) -> Figure:
    """A grid of tiles' stretched RGB, e.g. search hits; `titles` default to the tile ids."""
    if not tile_ids:
        raise ValueError("no tiles to show")
    labels = list(titles) if titles is not None else list(tile_ids)
    rows = -(-len(tile_ids) // cols)
    fig = Figure(figsize=(size * cols, (size + 0.3) * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, tid, label in zip(axes.flat, tile_ids, labels, strict=False):
        show_rgb(ax, read_tile(build, tid, points=False).display()[0])
        ax.set_title(label, fontsize=7)
    fig.tight_layout()
    return fig


def _outline(ax: Axes, geom: shapely.Geometry, **style) -> None:
    polys = getattr(geom, "geoms", [geom])
    for poly in polys:
        for ring in [poly.exterior, *poly.interiors]:
            x, y = ring.xy
            ax.plot(x, y, **style)


def plot_grid(
    planned: Sequence[PlannedTile],
    region: shapely.Geometry | None = None,
    ax: Axes | None = None,
    zoom: bool = False,
) -> Figure:
    """Planned tiles in lon/lat over the region outline: buildable filled, skipped hatched.

    A county dwarfs its tiles: unless `zoom` (frame the tiles only), a red box marks where the
    tiles are. Pass `ax` to draw into an existing figure, e.g. an overview beside a zoomed panel.
    """
    if ax is None:
        ax = Figure(figsize=(7, 6)).subplots()
    feet = [p.tile.footprint_lonlat() for p in planned]
    for p, foot in zip(planned, feet, strict=True):
        if p.skip_reason is None:
            ax.fill(*foot.exterior.xy, facecolor="tab:blue", edgecolor="navy", alpha=0.4, lw=0.5)
        else:
            ax.fill(*foot.exterior.xy, fill=False, edgecolor="grey", hatch="///", lw=0.3)
    extent = shapely.box(*shapely.union_all(feet).bounds) if feet else None
    if region is not None:
        _outline(ax, region, color="black", linewidth=1.0)
    if extent is not None and zoom:
        margin = 0.05 * max(
            extent.bounds[2] - extent.bounds[0], extent.bounds[3] - extent.bounds[1]
        )
        w, s, e, n = extent.buffer(margin).bounds
        ax.set_xlim(w, e)
        ax.set_ylim(s, n)
    elif extent is not None:
        _outline(ax, extent, color="red", linewidth=1.5, linestyle="--")
        centre = extent.centroid
        ax.plot(centre.x, centre.y, "o", mfc="none", mec="red", ms=16, mew=1.5)
    ax.legend(
        handles=[
            Patch(facecolor="tab:blue", edgecolor="navy", alpha=0.4, label="tile to build"),
            Patch(fill=False, edgecolor="grey", hatch="///", label="skipped (no NAIP or LiDAR)"),
        ],
        loc="upper right",
        fontsize=8,
    )
    ax.ticklabel_format(useOffset=False)
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_aspect(1 / np.cos(np.radians(np.mean(ax.get_ylim()))))
    return ax.figure


def training_log(run: str | Path) -> pd.DataFrame:
    """All rows of a run's CSV logs (`RUN/logs/version_*/metrics.csv`; a resume adds a version)."""
    files = sorted(
        Path(run).glob("logs/version_*/metrics.csv"),
        key=lambda f: int(f.parent.name.removeprefix("version_")),
    )
    if not files:
        raise FileNotFoundError(f"no logs/version_*/metrics.csv under {run}")
    return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)


def plot_training_log(run: str | Path, ax: Axes | None = None) -> Figure:
    """Training and validation loss against the optimiser step."""
    log = training_log(run)
    if ax is None:
        ax = Figure(figsize=(6, 3.5)).subplots()
    for column, style in (("train_loss", "-"), ("val_loss", "o-")):
        if column in log:
            rows = log.dropna(subset=[column])
            ax.plot(rows["step"], rows[column], style, label=column.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax.figure
