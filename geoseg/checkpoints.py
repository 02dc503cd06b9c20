"""Checkpoint checks that need no torch: a missing, foreign or corrupt file is reported at once.

Importing torch and Lightning takes 10+ s, so `predict`, `evaluate` and `train`'s resume look at
the file first. The reading itself is `geoseg.checkpoint_info` (standard library only, so the QGIS
plugin runs the same check in QGIS): it opens the torch zip archive and unpickles only the plain
model contract, with every class in the pickle replaced by an inert placeholder.
"""

from __future__ import annotations

from pathlib import Path

from geoseg.checkpoint_info import CONTRACT_KEY, CheckpointError, read_contract

__all__ = ["CONTRACT_KEY", "CheckpointError", "check_checkpoint_file"]


def check_checkpoint_file(path: str | Path) -> Path:
    """`path` if it is a geoseg checkpoint; else a one-line `CheckpointError` (see
    `checkpoint_info.read_contract` for what it catches)."""
    read_contract(path)
    return Path(path)
