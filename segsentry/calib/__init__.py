"""Calibration: fit the Gaussian on training-patch features and fold a fused Mahalanobis head into ONNX.

``gaussian`` and ``head`` need only numpy and onnx; ``calibrate`` drives the runtime's sliding-window core.
"""

from segsentry.calib.calibrate import AGGREGATIONS, ESTIMATORS, CalibrationResult, calibrate
from segsentry.calib.gaussian import FeatureStore, GaussianFit, fit_gaussian, squared_mahalanobis
from segsentry.calib.head import fold_mahalanobis_head

__all__ = [
    "AGGREGATIONS",
    "ESTIMATORS",
    "CalibrationResult",
    "FeatureStore",
    "GaussianFit",
    "calibrate",
    "fit_gaussian",
    "fold_mahalanobis_head",
    "squared_mahalanobis",
]
