"""Subject-level scores (design.md, method steps 6-7): raw score, min/2·max normalisation, thresholds.

The raw score is the paper's mean of the voxel map or, as a bundle's calibration records (``subject_score``),
a reduction of the patch distances.

Two threshold rules: the authors' 95 % TPR boundary, and split-conformal (design.md, "Conformal threshold").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from segsentry.contract import SubjectScore, choice
from segsentry.errors import BundleError, CalibrationError


def subject_score(voxel_map: np.ndarray | None, distances: Sequence[float] | np.ndarray | None = None, *,
                  rule: SubjectScore | str = SubjectScore.MEAN) -> float:
    """Raw score ``u`` of one case by ``rule`` (:class:`~segsentry.contract.SubjectScore`).

    ``mean`` (the paper): mean of the voxel distance map over the preprocessed (unpadded) volume (float64 sum).
    ``patch-min``: the smallest of the case's patch distances; ``lower-half``: the mean of the smaller half of
    them (of one patch: that patch). Each needs what it reads: the voxel map or the patch distances.
    """
    rule = choice(SubjectScore, rule, what="subject score", error=BundleError)
    if rule is SubjectScore.MEAN:
        if voxel_map is None:
            raise BundleError("the mean subject score needs the voxel distance map")
        return float(np.mean(voxel_map, dtype=np.float64))
    d = np.sort(np.asarray(distances if distances is not None else [], dtype=np.float64).reshape(-1))
    if d.size == 0:
        raise BundleError(f"the {rule.value} subject score needs the case's patch distances")
    if rule is SubjectScore.PATCH_MIN:
        return float(d[0])
    return float(np.mean(d[:max(1, d.size // 2)]))


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


def min_calibration_cases(alpha: float) -> int:
    """Calibration cases split-conformal needs for a finite threshold at level ``alpha``: n >= 1/alpha - 1."""
    check_alpha(alpha)
    return max(1, math.ceil(1.0 / alpha - 1.0 - 1e-9))


def conformal_rank(n: int, alpha: float) -> int:
    """``k = ceil((n + 1)(1 - alpha))``: the rank of the calibration score that bounds false alarms by alpha.

    ``k > n`` means no finite threshold holds alpha with ``n`` scores (see :func:`conformal_threshold`).
    """
    check_alpha(alpha)
    return math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # the epsilon keeps 20 * 0.95 at 19, not 20


def conformal_threshold(calibration_uncertainties: Sequence[float], *, alpha: float) -> tuple[float, float]:
    """Split-conformal threshold on U and the false-alarm bound it guarantees.

    Returns ``(threshold, bound)``: the ``k``-th smallest calibration U with ``k = ceil((n + 1)(1 - alpha))``,
    so that a new in-distribution case exchangeable with the calibration cases is flagged (U > threshold)
    with probability at most ``bound = 1 - k / (n + 1) <= alpha``. With too few cases (``k > n``) the largest
    score is used and ``bound = 1 / (n + 1)``, which is then larger than ``alpha``: the caller must say so.
    """
    values = sorted(float(v) for v in calibration_uncertainties)
    if not values:
        raise CalibrationError("no calibration scores to set a threshold from")
    n = len(values)
    k = min(conformal_rank(n, alpha), n)
    return values[k - 1], 1.0 - k / (n + 1)


def check_alpha(alpha: float) -> None:
    """Refuse a false-alarm rate outside (0, 1) with :class:`CalibrationError`."""
    if not 0.0 < alpha < 1.0:
        raise CalibrationError(f"alpha must be strictly between 0 and 1 (a false-alarm rate), got {alpha}")
