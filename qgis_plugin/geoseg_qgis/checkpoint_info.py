"""What a geoseg checkpoint is, read with the standard library only (no torch).

The QGIS plugin must answer "is this a geoseg model, and what does it need?" inside QGIS's own
Python, where torch may never be imported, and fast enough for a dialog: a missing or foreign
checkpoint is reported in milliseconds, not after the engine's torch start-up. The plugin ships a
byte-identical copy of this file (like `protocol.py`); the engine uses it for the same early check.

A `geoseg train` checkpoint is a torch zip archive whose pickle (`<name>/data.pkl`) holds a plain
`geoseg_contract` dict next to the weights. `read_contract` unpickles that pickle with every class
replaced by an inert placeholder, so no code from the file runs and no tensor data is read; the
contract itself is plain data (str, numbers, lists, dicts). `model_card` reads the run's
`model_card.json` (written by `geoseg train` beside `checkpoints/`) when there is one.
"""

from __future__ import annotations

import io
import json

# find_class below resolves no real class, so nothing from the file runs (bandit B403/B301).
import pickle  # nosec B403
import zipfile
from pathlib import Path
from typing import Any

CONTRACT_KEY = "geoseg_contract"
CARD_NAME = "model_card.json"
FIX = "pick RUN/checkpoints/last.ckpt of a `geoseg train` run (or import one in geoseg's models)"


class CheckpointError(ValueError):
    """A file that is not a readable geoseg checkpoint, or whose weights don't fit its model;
    the message is one line."""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Inert:
    """Stands in for every class a checkpoint's pickle names (tensors, storages, dtypes)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()  # e.g. a method fetched by getattr: still nothing runs


class _OrderedDict(dict):
    """`collections.OrderedDict` as pickled by torch: a dict that also takes attributes."""


class _ContractUnpickler(pickle.Unpickler):  # nosec B301
    """Rebuilds containers and plain values only; tensors become `_Inert`, storages None."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return _OrderedDict
        return _Inert

    def persistent_load(self, pid: Any) -> None:
        return None  # tensor storages live in other archive members: never read


def read_contract(path: str | Path) -> dict[str, Any]:
    """The model contract stored in a `geoseg train` checkpoint.

    Raises CheckpointError (one line) for a missing path, a folder, a non-zip or truncated
    file, a zip that is not a PyTorch archive, a damaged pickle and a PyTorch checkpoint without
    a geoseg contract. Damage inside the weights themselves only shows when torch loads them.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
            if not pickles:
                raise CheckpointError(f"{path} is not a geoseg checkpoint (no PyTorch data in it)")
            data = archive.read(pickles[0])
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"{path} is not a geoseg checkpoint (not a PyTorch archive, or truncated: "
            f"{_reason(exc)})"
        ) from None
    except (OSError, ValueError, EOFError) as exc:  # unreadable file, damaged member
        raise CheckpointError(f"{path} is a damaged checkpoint ({_reason(exc)})") from None
    try:
        ckpt = _ContractUnpickler(io.BytesIO(data)).load()  # nosec B301
    except Exception as exc:  # any malformed pickle: damaged
        raise CheckpointError(f"{path} is a damaged checkpoint ({_reason(exc)})") from None
    contract = ckpt.get(CONTRACT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(contract, dict):
        raise CheckpointError(f"{path} is not a geoseg checkpoint (no {CONTRACT_KEY} in it)")
    return contract


def model_card(path: str | Path) -> dict[str, Any] | None:
    """The run's model card for a checkpoint at RUN/checkpoints/*.ckpt (or beside it), if any."""
    path = Path(path)
    for folder in (path.parent.parent, path.parent):
        card = folder / CARD_NAME
        try:
            value = json.loads(card.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            return value
    return None


def hex_color(color: Any) -> str:
    """The "#rrggbb" of an [r, g, b(, a)] list or of a "#rrggbb"/"rrggbb" string."""
    if isinstance(color, str):
        return "#" + color.lstrip("#")[:6].lower()
    return "#" + "".join(f"{int(c):02x}" for c in list(color)[:3])


def classes(contract: dict[str, Any]) -> list[dict[str, Any]]:
    """[{value, name, color "#rrggbb"}] of a contract's class set, unlabeled (0) left out."""
    names = contract.get("class_names") or []
    colors = contract.get("class_colors") or []
    found = []
    for value, name in enumerate(names):
        if value == 0:
            continue
        rgb = colors[value] if value < len(colors) else (128, 128, 128)
        found.append({"value": value, "name": str(name), "color": hex_color(rgb)})
    return found


def _card_classes(card: dict[str, Any]) -> list[dict[str, Any]]:
    """A card's classes as `classes` gives them: unlabeled (0) left out, colours "#rrggbb"."""
    return [
        {"value": c["value"], "name": str(c["name"]), "color": hex_color(c.get("color", "888888"))}
        for c in card.get("classes") or []
        if isinstance(c, dict) and c.get("value") not in (0, None) and "name" in c
    ]


def describe(path: str | Path) -> dict[str, Any]:
    """What a dialog shows about a checkpoint: its card when there is one, else its contract.

    Keys: model, bands, gsd, tile_size, classes, needs_points (None when only the engine can
    tell), metrics, data, splits, intended_use, limits, created, seed, card (whether a model card
    was found). Raises CheckpointError.
    """
    contract = read_contract(path)
    card = model_card(path) or {}
    needs = card.get("needs_points", contract.get("needs_points"))
    return {
        "model": card.get("model") or contract.get("model"),
        "bands": card.get("bands") or contract.get("bands") or [],
        "gsd": card.get("gsd", contract.get("gsd")),
        "tile_size": card.get("tile_size", contract.get("tile_size")),
        "classes": _card_classes(card) or classes(contract),
        "needs_points": None if needs is None else bool(needs),
        "metrics": card.get("metrics") or {},
        "data": card.get("data"),
        "splits": card.get("splits"),
        "intended_use": card.get("intended_use"),
        "limits": card.get("limits"),
        "created": card.get("created"),
        "seed": card.get("seed", contract.get("seed")),
        "card": bool(card),
    }
