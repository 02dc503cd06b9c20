"""Errors of the dataset builder, split by what the build does about them."""

from __future__ import annotations


class BuildError(RuntimeError):
    """The whole build cannot go on (bad arguments, empty search): one-line message, no output."""

    exit_code = 1


class EmptySearchError(BuildError):
    """The catalog has no imagery or no LiDAR for the region and dates asked for."""


class TileError(RuntimeError):
    """One tile cannot be built (corrupt input, missing CRS, ...): reported, the build goes on."""


def short_reason(exc: BaseException) -> str:
    """First line of an exception message (library errors can be pages long)."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
