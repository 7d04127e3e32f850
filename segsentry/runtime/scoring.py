"""Subject-level scores (design.md, method steps 6-7): raw score, min/2·max normalisation, 95 % TPR threshold."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from segsentry.errors import CalibrationError


def subject_score(voxel_map: np.ndarray) -> float:
    """Raw score ``u``: mean of the voxel distance map over the preprocessed (unpadded) volume (float64 sum)."""
    return float(np.mean(voxel_map, dtype=np.float64))


def normalise_score(u: float, *, train_min: float, train_max: float) -> float:
    """``U = (clip(u, min, 2·max) - min) / (2·max - min)`` in [0, 1], with the training cases' raw scores."""
    upper = 2.0 * train_max
    if not upper > train_min:
        raise CalibrationError(f"degenerate training score range (min {train_min}, max {train_max})")
    return float((min(max(u, train_min), upper) - train_min) / (upper - train_min))


def tpr95_threshold(train_uncertainties: Sequence[float]) -> float:
    """The authors' 95 % TPR boundary: sorted scores, index ``floor((n-1)·0.95)``, mean with the next one."""
    values = sorted(float(v) for v in train_uncertainties)
    if not values:
        raise CalibrationError("no training scores to set a threshold from")
    index = math.floor((len(values) - 1) * 0.95)
    following = values[min(index + 1, len(values) - 1)]
    return (values[index] + following) / 2.0
