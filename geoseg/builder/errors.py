"""Errors of the dataset builder, split by what the build does about them."""

from __future__ import annotations

from geoseg.errors import innermost_line


class BuildError(RuntimeError):
    """The whole build cannot go on (bad arguments, empty search): one-line message, no output."""

    exit_code = 1


class BuildInputError(BuildError):
    """Bad arguments (output path, dates, conflicting options): checked before any work."""

    exit_code = 2


class EmptySearchError(BuildError):
    """The catalog has no imagery or no LiDAR for the region and dates asked for."""


class TileError(RuntimeError):
    """One tile cannot be built (corrupt input, missing CRS, ...): reported, the build goes on."""


def short_reason(exc: BaseException) -> str:
    """The innermost message of `exc`, one line of at most 200 characters, for the report."""
    return innermost_line(exc)[:200]
