"""What a benchmark ran on: the CPU as /proc/cpuinfo names it (shared by the scripts here)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_info() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields (empty where there is no /proc, e.g. macOS)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    info: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            break  # the first processor's block ends here
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_model() -> str:
    """E.g. "AMD EPYC 7B13"; platform.processor() where /proc/cpuinfo has no model name."""
    return cpu_info().get("model name") or platform.processor()
