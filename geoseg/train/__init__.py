"""Training objectives and evaluation: the holistic IKD-Net loss and confusion-matrix metrics.

Class 0 ("unlabeled") is never a target: losses ignore it and metrics exclude it, so the same
label rasters and point classes serve the loss, the metrics and the dataset statistics.
"""

from geoseg.train.losses import HolisticLoss, class_weights, point_pixel_consistency
from geoseg.train.metrics import (
    ConfusionMatrix,
    majority_baseline,
    metrics,
    predict_labels,
    save_confusion,
)

__all__ = [
    "ConfusionMatrix",
    "HolisticLoss",
    "class_weights",
    "majority_baseline",
    "metrics",
    "point_pixel_consistency",
    "predict_labels",
    "save_confusion",
]
