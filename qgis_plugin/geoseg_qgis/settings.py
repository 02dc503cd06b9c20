"""Plugin settings: which engine Python to run, on which device, against which STAC API.

Precedence for the engine: GEOSEG_ENGINE_PYTHON (tests, CI, qgis_process scripts), then the
Settings dialog (QgsSettings), then engine.json that `geoseg qgis install` writes next to this file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qgis.core import QgsSettings

ENGINE_FILE = Path(__file__).with_name("engine.json")
KEY = "geoseg/"
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_STAC_URL = "https://planetarycomputer.microsoft.com/api/stac/v1"


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


def save(engine: str, device_name: str, stac: str) -> None:
    """Store the Settings dialog's values (an empty engine falls back to engine.json)."""
    settings = QgsSettings()
    settings.setValue(KEY + "engine_python", engine.strip())
    settings.setValue(KEY + "device", device_name if device_name in DEVICES else "auto")
    settings.setValue(KEY + "stac_url", stac.strip())
