"""Turning library exceptions into the one-line messages geoseg shows users."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """First line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def innermost_line(exc: BaseException) -> str:
    """First line of the innermost exception in `exc`'s cause/context chain that has a message.

    Library errors wrap the useful text: rasterio's outer message is often just "Read failed.
    See previous exception for details", and GDAL's reason is in the cause.
    """
    chain: list[BaseException] = []
    err: BaseException | None = exc
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for err in reversed(chain):
        if str(err).strip():
            return first_line(err)
    return type(exc).__name__
