"""Checkpoint checks that need no torch: a missing, foreign or corrupt file is reported at once.

Importing torch and Lightning takes 10+ s, so `predict`, `evaluate` and `train`'s resume look at
the file first. A `torch.save` checkpoint is a zip archive whose `data.pkl` holds the pickled
dict; the strings of that pickle are listed without running it (pickletools), which is enough to
see whether a geoseg model contract is in there.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

from geoseg.errors import first_line

CONTRACT_KEY = "geoseg_contract"
"""Key of the model contract in a geoseg checkpoint (see geoseg.train.task)."""

_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})


class CheckpointError(ValueError):
    """A file that is not a readable geoseg checkpoint, or whose weights don't fit its model."""


def check_checkpoint_file(path: str | Path) -> Path:
    """`path` if it looks like a geoseg checkpoint; else a one-line `CheckpointError`.

    Catches a missing path, a folder, a non-zip or truncated file, a zip that is not a PyTorch
    archive, a damaged pickle and a PyTorch checkpoint without a geoseg contract. Damage inside
    the weights themselves only shows when torch loads them.
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
            strings = {
                arg
                for op, arg, _ in pickletools.genops(archive.read(pickles[0]))
                if op.name in _STRING_OPS
            }
    except CheckpointError:
        raise
    except zipfile.BadZipFile as exc:
        raise CheckpointError(
            f"{path} is not a geoseg checkpoint (not a PyTorch archive, or truncated: "
            f"{first_line(exc)})"
        ) from None
    except (OSError, ValueError, EOFError) as exc:  # unreadable file, damaged pickle
        raise CheckpointError(f"{path} is a damaged checkpoint ({first_line(exc)})") from None
    if CONTRACT_KEY not in strings:
        raise CheckpointError(f"{path} is not a geoseg checkpoint (no {CONTRACT_KEY} in it)")
    return path
