"""`geoseg predict`: a checkpoint applied to a whole georeferenced scene.

`predict(checkpoint, image, out, points=...)` writes a uint8 class-map COG with the class
palette, a STAC Item beside it and, optionally, class polygons as a GeoPackage; see
`geoseg.predict.sliding` (windows, blending, streaming) and `geoseg.predict.points` (the scene's
LiDAR, read band by band, for IKD-Net, RandLA-Net and early fusion).
"""

from __future__ import annotations

from geoseg.predict.errors import PredictError
from geoseg.predict.sliding import blend_weights, predict, window_offsets

__all__ = ["PredictError", "blend_weights", "predict", "window_offsets"]
