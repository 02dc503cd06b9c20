"""Package the QGIS plugin and install it into a QGIS profile, pointed at this environment.

The plugin's copies of the standard-library modules it shares with the engine (`SHARED`: the
protocol, and the torch-free checkpoint reader) are refreshed from geoseg's on every package, so
each is defined once, in geoseg; `engine.json` in the package records the Python of the
environment that packaged it, which is the engine the plugin then runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from geoseg import __version__
from geoseg.builder.writers import atomic_path

PLUGIN = "geoseg_qgis"
SKIP = {"__pycache__", "engine.json"}
SHARED = ("protocol.py", "checkpoint_info.py")


class QgisInstallError(RuntimeError):
    """The plugin sources or the QGIS profile folder are not where they should be."""


def plugin_source() -> Path:
    """The plugin's source folder (in the repository next to the geoseg package)."""
    folder = Path(__file__).resolve().parents[1] / "qgis_plugin" / PLUGIN
    if not (folder / "metadata.txt").exists():
        raise QgisInstallError(
            f"plugin sources not found at {folder}: install geoseg from a source checkout "
            "(pip install -e .)"
        )
    return folder


def profiles_root() -> Path:
    """QGIS 3's profiles folder on this OS (QGIS_CUSTOM_CONFIG_PATH overrides, as in QGIS)."""
    custom = os.environ.get("QGIS_CUSTOM_CONFIG_PATH")
    if custom:
        return Path(custom) / "profiles"
    if sys.platform == "win32":
        return Path(os.environ["APPDATA"]) / "QGIS" / "QGIS3" / "profiles"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "QGIS" / "QGIS3" / "profiles"
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "QGIS" / "QGIS3" / "profiles"


def package(out: Path, engine_python: str | None = None) -> Path:
    """Write the plugin zip (the QGIS plugin manager's "Install from ZIP" format) to `out`.

    With `engine_python`, the zip carries engine.json naming it as the plugin's engine.
    """
    source = plugin_source()
    out = Path(out)
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source)
            if path.is_dir() or SKIP & set(relative.parts) or relative.as_posix() in SHARED:
                continue
            zf.write(path, f"{PLUGIN}/{relative.as_posix()}")
        for name in SHARED:
            zf.write(Path(__file__).with_name(name), f"{PLUGIN}/{name}")
        if engine_python:
            engine = {"engine_python": engine_python, "geoseg": __version__}
            zf.writestr(f"{PLUGIN}/engine.json", json.dumps(engine, indent=2) + "\n")
    return out


def install(profile: str = "default", engine_python: str | None = None) -> Path:
    """Install the plugin into `profile` (replacing an older copy); returns its folder."""
    engine_python = engine_python or sys.executable
    plugins = profiles_root() / profile / "python" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    target = plugins / PLUGIN
    with tempfile.TemporaryDirectory(dir=plugins, prefix=".geoseg-") as tmp:
        archive = package(Path(tmp) / f"{PLUGIN}.zip", engine_python)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(Path(tmp) / "unpacked")  # our own archive, names built above
        if target.exists():
            target.rename(Path(tmp) / "old")  # removed with the temporary folder
        (Path(tmp) / "unpacked" / PLUGIN).rename(target)
    return target
