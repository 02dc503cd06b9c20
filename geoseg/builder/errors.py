"""Errors of the dataset builder, split by what the build does about them."""

from __future__ import annotations

from geoseg.errors import first_line


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
    """First line of an exception's message, from the innermost cause that has one.

    Library errors can be pages long, and rasterio's outer message is often just "Read failed.
    See previous exception for details": the useful text (e.g. GDAL's) is in the cause.
    """
    chain: list[BaseException] = []
    err: BaseException | None = exc
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for err in reversed(chain):
        if str(err).strip():
            return first_line(err)[:200]
    return type(exc).__name__
