"""Run a prepare plan: check the output folder, write the tiles block by block, then the outputs.

Every input problem is found while planning, before anything is written (the dataset modules
read every header and label raster first), so bad input leaves no output folder. Tiles are
written atomically, `tile.json` last, like `build-dataset`'s: a rerun of the same command skips
finished tiles, and one with other settings into the same folder is refused instead of mixing
two builds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from geoseg.builder.writers import remove_stale_temps, write_bytes_atomic
from geoseg.classes import ClassSet
from geoseg.prepare.catalog import DatasetInfo, write_outputs
from geoseg.prepare.tiles import GridTile, TileData, finished, write_tile

CONFIG = "prepare.yaml"

Reader = Callable[[GridTile, str], "TileData | str"]
"""Reads one tile of a loaded block: its data, or the reason it is skipped."""


class PrepareError(ValueError):
    """Bad input (missing files, unknown colour codes, mismatched grids): exit 2, no output."""


@dataclass
class Block:
    """Tiles that share source reads (an ISPRS area, a group of DFC2018 cells)."""

    tiles: list[tuple[GridTile, str]]
    load: Callable[[], Reader]
    """Reads the block's sources once; called only if some tile of the block is unfinished."""


@dataclass
class Plan:
    """A checked benchmark release, ready to be written."""

    config: dict[str, Any]
    """Saved as prepare.yaml; a rerun must match it."""
    info: DatasetInfo
    classes: ClassSet
    blocks: list[Block]
    notes: list[str] = field(default_factory=list)


def check_out(out: Path, config: dict[str, Any]) -> None:
    """Refuse an output folder holding something else than this very prepare run."""
    if not out.exists():
        return
    if not out.is_dir():
        raise PrepareError(f"--out {out} is a file")
    saved = out / CONFIG
    if saved.is_file():
        if yaml.safe_load(saved.read_text()) != config:
            raise PrepareError(
                f"{out} was prepared with other inputs or settings ({saved}); use a new --out"
            )
    elif any(out.iterdir()):
        raise PrepareError(f"--out {out} is not empty and holds no {CONFIG}; use a new folder")


def run_plan(
    plan: Plan, out: Path, echo: Callable[[str], None] = print, progress: bool = True
) -> dict[str, Any]:
    """Write every tile of the plan and the build-level outputs; returns the report."""
    t0 = time.perf_counter()
    config = yaml.safe_load(yaml.safe_dump(plan.config))  # the form it is compared in on rerun
    check_out(out, config)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    remove_stale_temps(out / "tiles")
    text = yaml.safe_dump(config, sort_keys=False)
    write_bytes_atomic(out / CONFIG, lambda p: p.write_text(text))
    manifests: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    written = cached = 0
    total = sum(len(b.tiles) for b in plan.blocks)
    bar = tqdm(total=total, unit="tile", disable=not progress, file=sys.stderr, mininterval=1.0)
    for block in plan.blocks:
        reader: Reader | None = None
        for tile, split in block.tiles:
            manifest = finished(out, tile)
            if manifest is None:
                reader = reader or block.load()
                data = reader(tile, split)
                if isinstance(data, str):
                    skipped.append({"tile_id": tile.id, "split": split, "reason": data})
                    bar.update(1)
                    continue
                manifest = write_tile(out, data, plan.classes)
                written += 1
            else:
                cached += 1
            manifests.append(manifest)
            bar.update(1)
    bar.close()
    if not manifests:
        raise PrepareError(
            "no tile could be prepared (every tile was skipped; see the reasons "
            "by rerunning with fewer inputs)"
        )
    report = {
        "src": config.get("src"),
        "tiles": {"written": written, "cached": cached, "skipped": len(skipped)},
        "skipped": skipped,
        "notes": plan.notes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    report = write_outputs(out, manifests, plan.info, plan.classes, report)
    for note in plan.notes:
        echo(f"note: {note}")
    return report
