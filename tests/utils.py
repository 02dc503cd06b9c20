"""Helpers shared by the end-to-end tests: run the real CLI, compare tile checksums."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from geoseg.builder.tile import MANIFEST
from geoseg.builder.writers import sha256
from geoseg.cli import main

GEOSEG = [sys.executable, "-m", "geoseg.cli"]


def geoseg(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GEOSEG, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def cli(*args: str | Path) -> Result:
    """The CLI in-process (fast; for the subprocess, the real console entry, use `geoseg`)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(res: Result) -> str:
    """The bad-input contract: exit 2 and exactly one `geoseg: error:` line on stderr."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), res.stderr
    return lines[0]


def checksums(out: Path) -> dict[str, str]:
    """sha256 of every file of every finished tile, hashed from disk; checks the manifests too."""
    sums = {}
    for manifest in sorted(out.glob(f"tiles/*/{MANIFEST}")):
        m = json.loads(manifest.read_text())
        for name, meta in m["files"].items():
            digest = sha256(manifest.parent / name)
            assert digest == meta["sha256"], f"{m['tile_id']}/{name} differs from its manifest"
            sums[f"{m['tile_id']}/{name}"] = digest
    return sums
