"""Which torch device a job runs on: one rule for every command, so `auto` means the same
everywhere and a typo or a missing GPU is a one-line error before any work starts."""

from __future__ import annotations

import torch

AUTO = "auto"


class DeviceError(ValueError):
    """A device that torch cannot use on this machine."""


def resolve_device(name: str | torch.device = AUTO) -> torch.device:
    """`auto`: the current CUDA GPU when torch sees one, else the CPU. Otherwise a torch device
    (or its string: `cpu`, `cuda`, `cuda:1`, `mps`), checked to exist here."""
    name = str(name)
    if name == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise DeviceError(f"device {name!r} asked for, but torch sees {count} CUDA GPU(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError("device 'mps' asked for, but torch sees no Apple GPU here")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device
