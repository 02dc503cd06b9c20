"""Turning library exceptions into the one-line messages geoseg shows users."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """First line of an exception's message, or its type name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
