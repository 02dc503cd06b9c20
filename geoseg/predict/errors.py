"""The one error type of `geoseg.predict` (its own module so `sliding` and `points` share it)."""

from __future__ import annotations


class PredictError(ValueError):
    """Bad prediction input (scene, points or model); the message is one line for the CLI."""
