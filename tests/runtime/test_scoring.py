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


def test_patch_reductions_on_hand_worked_distances():
    d = np.array([9.0, 1.0, 4.0, 16.0, 25.0])  # sorted 1, 4, 9, 16, 25; the smaller half: 1, 4
    assert subject_score(None, d, rule="patch-min") == 1.0
    assert subject_score(None, d, rule="lower-half") == pytest.approx(2.5, rel=1e-15)
    assert subject_score(None, d[:1], rule="lower-half") == 9.0  # one patch: that patch
    assert subject_score(np.full((2, 2, 2), 7.0), d, rule="mean") == 7.0  # mean reads the voxel map only
    from segsentry.errors import BundleError

    with pytest.raises(BundleError, match="patch distances"):
        subject_score(np.ones((2, 2, 2)), None, rule="patch-min")
    with pytest.raises(BundleError, match="voxel distance map"):
        subject_score(None, d, rule="mean")
    with pytest.raises(BundleError, match="subject score"):
        subject_score(np.ones((2, 2, 2)), d, rule="median")


# ------------------------------------------------------------------------------------- conformal threshold


def test_conformal_rank_and_minimum_cases():
    from segsentry.runtime.scoring import conformal_rank, min_calibration_cases

    # k = ceil((n + 1)(1 - alpha)); n >= 1/alpha - 1 is exactly when k <= n
    assert conformal_rank(19, 0.05) == 19  # 20 * 0.95 = 19 (the float product must not round up to 20)
    assert conformal_rank(18, 0.05) == 19
    assert conformal_rank(99, 0.1) == 90
    assert min_calibration_cases(0.05) == 19
    assert min_calibration_cases(0.1) == 9
    for alpha in (0.01, 0.05, 0.1, 0.2, 0.3):
        n_min = min_calibration_cases(alpha)
        assert conformal_rank(n_min, alpha) <= n_min
        assert conformal_rank(n_min - 1, alpha) > n_min - 1


def test_conformal_threshold_is_the_kth_smallest_and_reports_its_bound():
    from segsentry.runtime.scoring import conformal_threshold

    scores = list(np.linspace(0.0, 1.0, 40)[::-1])  # unsorted input
    threshold, bound = conformal_threshold(scores, alpha=0.05)
    k = 39  # ceil(41 * 0.95) = ceil(38.95)
    assert threshold == sorted(scores)[k - 1]
    assert bound == pytest.approx(1 - k / 41)
    assert bound <= 0.05
    # too few cases: the largest score, and the weaker bound 1/(n + 1) is reported, not alpha
    threshold, bound = conformal_threshold([0.1, 0.3, 0.2], alpha=0.05)
    assert threshold == 0.3 and bound == pytest.approx(0.25)
    with pytest.raises(CalibrationError, match="alpha"):
        conformal_threshold([0.1], alpha=1.5)
    with pytest.raises(CalibrationError, match="no calibration scores"):
        conformal_threshold([], alpha=0.05)


def test_conformal_threshold_holds_alpha_on_exchangeable_data():
    """Coverage check by simulation: over many draws of n calibration + 1 new score from one distribution, the
    new score exceeds the threshold with probability <= alpha (here the exact rate 1 - k/(n+1) = 0.0476)."""
    from segsentry.runtime.scoring import conformal_threshold

    rng = np.random.default_rng(7)
    n, alpha, trials = 20, 0.05, 20000
    draws = rng.gamma(2.0, size=(trials, n + 1))
    flags = 0
    for row in draws:
        threshold, bound = conformal_threshold(row[:n], alpha=alpha)
        flags += row[n] > threshold
    rate = flags / trials
    assert abs(rate - bound) < 4 * np.sqrt(bound * (1 - bound) / trials)  # 4 sigma
    assert bound <= alpha
