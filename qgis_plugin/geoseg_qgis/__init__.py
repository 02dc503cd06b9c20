"""geoseg QGIS plugin: thin UI and Processing algorithms over the geoseg engine subprocess."""

from __future__ import annotations

from typing import Any


def classFactory(iface: Any) -> Any:
    from .plugin import GeosegPlugin

    return GeosegPlugin(iface)
