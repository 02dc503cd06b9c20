"""Plugin settings: engine Python, device, STAC API, outputs folder, warm engine.

Precedence for the engine: GEOSEG_ENGINE_PYTHON (tests, CI, qgis_process scripts), then the
Settings dialog (QgsSettings), then engine.json that `geoseg qgis install` writes next to this file.

Outputs go to a folder the user can find again (not Processing's temporary files, which vanish
with the session): the folder set in Settings, else `geoseg/` beside the saved project, else
`~/geoseg`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qgis.core import QgsProject, QgsSettings

ENGINE_FILE = Path(__file__).with_name("engine.json")
KEY = "geoseg/"
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_STAC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"
OUTPUTS = "geoseg"


def _installed() -> dict[str, str]:
    try:
        return json.loads(ENGINE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def engine_python() -> str:
    """The interpreter of the geoseg environment ("" when none is configured)."""
    return (
        os.environ.get("GEOSEG_ENGINE_PYTHON")
        or QgsSettings().value(KEY + "engine_python", "", type=str)
        or _installed().get("engine_python", "")
    )


def device() -> str:
    """auto (the engine's choice: CUDA when it works), cpu or cuda."""
    value = QgsSettings().value(KEY + "device", "auto", type=str)
    return value if value in DEVICES else "auto"


def stac_url() -> str:
    return QgsSettings().value(KEY + "stac_url", DEFAULT_STAC_URL, type=str) or DEFAULT_STAC_URL


def keep_engine() -> bool:
    """Keep one engine running between jobs (fast second runs; holds its memory)."""
    return QgsSettings().value(KEY + "keep_engine", True, type=bool)


def output_setting() -> str:
    return QgsSettings().value(KEY + "output_folder", "", type=str)


def output_folder() -> Path:
    """Where outputs go by default (see the module docstring)."""
    chosen = output_setting().strip()
    if chosen:
        return Path(chosen).expanduser()
    home = QgsProject.instance().homePath()
    return Path(home) / OUTPUTS if home else Path.home() / OUTPUTS


def output_path(name: str) -> str:
    """A new path `name` in the outputs folder: name, name_2, ... (never an existing file)."""
    folder = output_folder()
    stem, dot, suffix = name.partition(".")
    candidate, n = folder / name, 2
    while candidate.exists():
        candidate = folder / f"{stem}_{n}{dot}{suffix}"
        n += 1
    return str(candidate)


def save(
    engine: str,
    device_name: str,
    stac: str,
    outputs: str | None = None,
    keep: bool | None = None,
) -> None:
    """Store the Settings dialog's values (an empty engine falls back to engine.json)."""
    settings = QgsSettings()
    settings.setValue(KEY + "engine_python", engine.strip())
    settings.setValue(KEY + "device", device_name if device_name in DEVICES else "auto")
    settings.setValue(KEY + "stac_url", stac.strip())
    if outputs is not None:
        settings.setValue(KEY + "output_folder", outputs.strip())
    if keep is not None:
        settings.setValue(KEY + "keep_engine", bool(keep))


def remembered(name: str) -> str:
    """A value the dialogs remember between sessions (last checkpoint, build, index...)."""
    return QgsSettings().value(KEY + "last/" + name, "", type=str)


def remember(name: str, value: str) -> None:
    QgsSettings().setValue(KEY + "last/" + name, value)
