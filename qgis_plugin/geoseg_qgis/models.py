"""The models a user has: trained runs, imported checkpoints, and (later) downloadable weights.

A `ModelEntry` is a name, a local checkpoint path, and optionally a download URL with its sha256
and the contract it promises: the shape of a model zoo entry (Deepness's idea), so published
weights can be listed before they are fetched. Nothing here downloads; an entry with a URL and no
local file is shown as "not downloaded".

What a model is comes from its run's model card (`RUN/model_card.json`, plain JSON) or, for a run
without one, from the checkpoint's contract (`checkpoint_info`, read without torch). The list is
the registry file (imported checkpoints and zoo entries, in the QGIS profile) plus the runs found
under the outputs folder, plus the last checkpoint used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qgis.core import QgsApplication

from . import settings
from .checkpoint_info import CheckpointError, describe

REGISTRY = "models.json"
# Where runs are looked for below the outputs folder (a run folder holds checkpoints/last.ckpt).
RUN_PATTERNS = ("*/checkpoints/last.ckpt", "*/*/checkpoints/last.ckpt")


@dataclass
class ModelEntry:
    name: str
    path: str = ""
    source: str = "run"  # run | imported | zoo
    url: str = ""
    sha256: str = ""
    contract: dict[str, Any] = field(default_factory=dict)  # what a zoo entry promises
    info: dict[str, Any] | None = None  # checkpoint_info.describe() of the local file
    error: str = ""

    @property
    def available(self) -> bool:
        return bool(self.path) and self.info is not None

    def label(self) -> str:
        model = (self.info or self.contract).get("model", "?")
        if self.url and not self.path:
            return f"{self.name} ({model}, not downloaded)"
        return f"{self.name} ({model})" if self.info else f"{self.name} (unreadable)"


def registry_path() -> Path:
    return Path(QgsApplication.qgisSettingsDirPath()) / "geoseg" / REGISTRY


def _read_registry() -> list[dict[str, Any]]:
    try:
        entries = json.loads(registry_path().read_text(encoding="utf-8")).get("models", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [e for e in entries if isinstance(e, dict) and e.get("name")]


def _write_registry(entries: list[dict[str, Any]]) -> None:
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"models": entries}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _entry(raw: dict[str, Any]) -> ModelEntry:
    keys = ModelEntry.__dataclass_fields__
    entry = ModelEntry(**{k: v for k, v in raw.items() if k in keys and k not in ("info", "error")})
    if entry.path:
        try:
            entry.info = describe(entry.path)
        except CheckpointError as exc:
            entry.error = str(exc)
    return entry


def run_name(checkpoint: Path) -> str:
    """A run's name: its folder (RUN/checkpoints/last.ckpt -> RUN), else the file's stem."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent.name
    return checkpoint.stem


def list_models() -> list[ModelEntry]:
    """Registry entries, runs under the outputs folder and the last used checkpoint, once each."""
    raw = _read_registry()
    folder = settings.output_folder()
    for pattern in RUN_PATTERNS:
        for ckpt in sorted(folder.glob(pattern)) if folder.is_dir() else []:
            raw.append({"name": run_name(ckpt), "path": str(ckpt), "source": "run"})
    last = settings.remembered("checkpoint")
    if last and Path(last).is_file():
        raw.append({"name": run_name(Path(last)), "path": last, "source": "run"})
    seen: set[str] = set()
    entries = []
    for item in raw:
        key = (
            str(Path(item["path"]).resolve()) if item.get("path") else "url:" + item.get("url", "")
        )
        if key not in seen:
            seen.add(key)
            entries.append(_entry(item))
    return entries


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_checkpoint(path: str | Path, name: str | None = None) -> ModelEntry:
    """Add a checkpoint file to the registry (in place, with its sha256); raises
    CheckpointError (one line) for a file that is not a geoseg checkpoint."""
    path = Path(path).resolve()
    describe(path)
    entries = [e for e in _read_registry() if e.get("path") != str(path)]
    raw = {
        "name": name or run_name(path),
        "path": str(path),
        "source": "imported",
        "sha256": sha256(path),
    }
    _write_registry([*entries, raw])
    return _entry(raw)


def add_zoo_entry(name: str, url: str, sha: str, contract: dict[str, Any]) -> ModelEntry:
    """Register downloadable weights by name, URL, sha256 and contract (not downloaded here)."""
    raw = {"name": name, "url": url, "sha256": sha, "source": "zoo", "contract": contract}
    entries = [e for e in _read_registry() if e.get("url") != url]
    _write_registry([*entries, raw])
    return _entry(raw)


def forget(entry: ModelEntry) -> None:
    """Drop an imported or zoo entry from the registry (the file itself stays)."""
    entries = [
        e
        for e in _read_registry()
        if not (e.get("path", "") == entry.path and e.get("url", "") == entry.url)
    ]
    _write_registry(entries)
