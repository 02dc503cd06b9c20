"""`geoseg predict`: a checkpoint applied to a whole georeferenced scene (image-only models).

`predict(checkpoint, image, out)` writes a uint8 class-map COG with the class palette, a STAC
Item beside it and, optionally, class polygons as a GeoPackage; see `geoseg.predict.sliding`.
"""

from __future__ import annotations

from geoseg.predict.sliding import (
    IMAGE_ONLY_MODELS,
    PredictError,
    blend_weights,
    predict,
    window_offsets,
)

__all__ = ["IMAGE_ONLY_MODELS", "PredictError", "blend_weights", "predict", "window_offsets"]
