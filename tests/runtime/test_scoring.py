"""Subject score, min/2·max normalisation and the authors' 95 % TPR threshold, on hand-worked numbers."""

from __future__ import annotations

import numpy as np
import pytest

from segsentry.errors import CalibrationError
from segsentry.runtime.scoring import normalise_score, subject_score, tpr95_threshold


def test_normalise_clips_to_min_and_twice_max():
    # min 2, max 6 -> range [2, 12]
    assert normalise_score(2.0, train_min=2.0, train_max=6.0) == 0.0
    assert normalise_score(7.0, train_min=2.0, train_max=6.0) == pytest.approx(0.5)
    assert normalise_score(12.0, train_min=2.0, train_max=6.0) == 1.0
    assert normalise_score(100.0, train_min=2.0, train_max=6.0) == 1.0
    assert normalise_score(-5.0, train_min=2.0, train_max=6.0) == 0.0


def test_normalise_degenerate_range():
    with pytest.raises(CalibrationError):
        normalise_score(1.0, train_min=0.0, train_max=0.0)


def test_threshold_authors_rule():
    # n = 21: index floor(20 * 0.95) = 19 -> mean of sorted[19] and sorted[20]
    scores = list(np.arange(21) / 20.0)[::-1]
    assert tpr95_threshold(scores) == pytest.approx((0.95 + 1.0) / 2)
    # n = 4: index floor(3 * 0.95) = 2 -> mean of 3rd and 4th smallest
    assert tpr95_threshold([0.4, 0.1, 0.3, 0.2]) == pytest.approx(0.35)
    # n = 1: the only value
    assert tpr95_threshold([0.25]) == 0.25
    with pytest.raises(CalibrationError):
        tpr95_threshold([])


def test_subject_score_is_float64_mean():
    voxel_map = np.full((10, 10, 10), 1e4, np.float32)
    voxel_map[0, 0, 0] = 1e4 + 1000
    assert subject_score(voxel_map) == pytest.approx(1e4 + 1.0, rel=1e-12)
