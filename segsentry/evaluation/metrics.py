"""Evaluation metrics for subject-level OOD detection and segmentation calibration (numpy only).

After Gonzalez et al., "Distance-based detection of out-of-distribution silent failures for Covid-19 lung
lesion segmentation", Medical Image Analysis 2022:

* detection: ROC AUC (OOD = positive class, higher uncertainty = more OOD), the authors' 95 % TPR threshold
  set on in-distribution (ID) cases, the TPR / FPR at that threshold and the detection error;
* calibration: the expected segmentation calibration error (ESCE) of ``confidence = 1 - U`` against Dice;
* segmentation quality: foreground Dice;
* failure detection (Zenk et al., MedIA 2025): risk-coverage curve, AURC and E-AURC with risk = 1 - Dice;
* uncertainty of every number: percentile bootstrap intervals, resampling each set of cases on its own;
* baseline uncertainty scores from per-voxel logits: maximum softmax, KL to the uniform distribution and
  the energy score, computed in float64, chunked over the first spatial axis.

Conventions: a case is *kept as in-distribution* when its uncertainty is ``<= threshold``; so the TPR is the
fraction of ID cases kept and the FPR the fraction of OOD cases wrongly kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Union

import numpy as np

from segsentry.errors import SegsentryError
from segsentry.runtime.scoring import tpr95_threshold as _authors_tpr95_threshold

ArrayLike = Union[np.ndarray, Sequence[float]]

#: float64 elements per chunk when reducing logits (about 32 MiB per temporary array).
_CHUNK_ELEMENTS = 1 << 22

__all__ = [
    "EvaluationError",
    "aurc",
    "auc",
    "bootstrap_interval",
    "e_aurc",
    "risk_coverage",
    "detection_error",
    "detection_summary",
    "dice",
    "energy_score",
    "esce",
    "fpr_at_threshold",
    "kl_uniform_uncertainty",
    "max_softmax_uncertainty",
    "temperature_scaling_search",
    "tpr95_threshold",
    "tpr_at_threshold",
    "wilson_interval",
]


class EvaluationError(SegsentryError):
    """An evaluation metric cannot be computed from the given inputs (empty sets, bad shapes, bad ranges...)."""


# --------------------------------------------------------------------------------------------- validation


def _scores(values: ArrayLike, name: str, *, allow_empty: bool = False) -> np.ndarray:
    """``values`` as a 1-D finite float64 array, else :class:`EvaluationError`."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"{name}: expected a 1-D sequence of numbers, found {type(values).__name__}") from exc
    if array.ndim != 1:
        raise EvaluationError(f"{name}: expected a 1-D array of per-case scores, found shape {array.shape}")
    if array.size == 0 and not allow_empty:
        raise EvaluationError(f"{name}: expected at least one case, found an empty set")
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise EvaluationError(f"{name}: expected finite values, found {bad} NaN/inf of {array.size}")
    return array


def _scalar(value: float, name: str, *, low: float | None = None, high: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"{name}: expected a number, found {value!r}") from exc
    if not math.isfinite(number):
        raise EvaluationError(f"{name}: expected a finite number, found {number}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise EvaluationError(f"{name}: expected a value in [{low}, {high}], found {number}")
    return number


def _in_unit_interval(array: np.ndarray, name: str) -> None:
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        raise EvaluationError(
            f"{name}: expected values in [0, 1], found range [{array.min():.6g}, {array.max():.6g}]"
        )


# ----------------------------------------------------------------------------------- segmentation quality


def dice(pred: np.ndarray, ref: np.ndarray, *, label: int | None = None) -> float:
    """Foreground Dice ``2|P ∩ R| / (|P| + |R|)`` of a predicted and a reference label map.

    Args:
        pred: predicted label map (any shape).
        ref: reference label map, same shape as ``pred``.
        label: the foreground label; ``None`` takes every label ``> 0`` as foreground.

    Returns:
        Dice in [0, 1]; two empty foregrounds give 1.0 (perfect agreement), one empty gives 0.0.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise EvaluationError(f"dice: expected pred and ref of the same shape, found {pred.shape} and {ref.shape}")
    if label is None:
        p, r = pred > 0, ref > 0
    else:
        p, r = pred == label, ref == label
    denominator = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    if denominator == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & r)) / denominator


# ---------------------------------------------------------------------------------------------- detection


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` with ties given their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # last 1-based rank of each tied group
    averages = ends - (counts - 1) / 2.0
    return averages[inverse.reshape(-1)]


def auc(uncertainty_id: ArrayLike, uncertainty_ood: ArrayLike) -> float:
    """ROC AUC of separating OOD (positive) from ID cases by uncertainty (higher = more OOD).

    Mann-Whitney form: the probability that a random OOD case is more uncertain than a random ID case, ties
    counting one half; equal to ``sklearn.metrics.roc_auc_score`` with OOD labelled 1.

    Raises:
        EvaluationError: when either set is empty (the AUC is undefined) or holds non-finite values.
    """
    ids = _scores(uncertainty_id, "auc: uncertainty_id", allow_empty=True)
    oods = _scores(uncertainty_ood, "auc: uncertainty_ood", allow_empty=True)
    if ids.size == 0 or oods.size == 0:
        raise EvaluationError(
            "auc: expected at least one in-distribution and one OOD case, "
            f"found {ids.size} ID and {oods.size} OOD cases"
        )
    ranks = _average_ranks(np.concatenate([ids, oods]))
    n_id, n_ood = ids.size, oods.size
    u_statistic = float(ranks[n_id:].sum()) - n_ood * (n_ood + 1) / 2.0
    return u_statistic / (n_id * n_ood)


def tpr95_threshold(uncertainty_id: ArrayLike) -> float:
    """The authors' 95 % TPR threshold from in-distribution uncertainties.

    Sorted scores, index ``floor((n-1)·0.95)``, mean of that score and the next one (``n = 1`` gives the
    value itself). Delegates to :func:`segsentry.runtime.scoring.tpr95_threshold`.
    """
    ids = _scores(uncertainty_id, "tpr95_threshold: uncertainty_id")
    return float(_authors_tpr95_threshold(ids.tolist()))


def tpr_at_threshold(uncertainty_id: ArrayLike, threshold: float) -> float:
    """TPR: fraction of in-distribution cases with uncertainty ``<= threshold`` (correctly kept)."""
    ids = _scores(uncertainty_id, "tpr_at_threshold: uncertainty_id")
    t = _scalar(threshold, "tpr_at_threshold: threshold")
    return float(np.count_nonzero(ids <= t)) / ids.size


def fpr_at_threshold(uncertainty_ood: ArrayLike, threshold: float) -> float:
    """FPR: fraction of OOD cases with uncertainty ``<= threshold`` (wrongly kept as in-distribution)."""
    oods = _scores(uncertainty_ood, "fpr_at_threshold: uncertainty_ood")
    t = _scalar(threshold, "fpr_at_threshold: threshold")
    return float(np.count_nonzero(oods <= t)) / oods.size


def detection_error(tpr: float, fpr: float) -> float:
    """Detection error ``0.5·(1 - TPR) + 0.5·FPR`` (both rates in [0, 1])."""
    t = _scalar(tpr, "detection_error: tpr", low=0.0, high=1.0)
    f = _scalar(fpr, "detection_error: fpr", low=0.0, high=1.0)
    return 0.5 * (1.0 - t) + 0.5 * f


# -------------------------------------------------------------------------------------------- calibration


def esce(uncertainty: ArrayLike, dice: ArrayLike, *, bins: int = 10) -> float:
    """Expected segmentation calibration error of ``confidence = 1 - U`` against Dice.

    ``sum_m |B_m|/n · |mean Dice(B_m) - mean confidence(B_m)|`` over ``bins`` equal-width bins of [0, 1]
    (edges ``np.linspace(0, 1, bins + 1)``, each bin ``[lo, hi)``; a confidence of exactly 1.0 goes in the
    last bin; empty bins contribute 0).

    Args:
        uncertainty: per-case normalised uncertainty ``U`` in [0, 1].
        dice: per-case Dice in [0, 1], same length.
        bins: number of bins (>= 1).
    """
    u = _scores(uncertainty, "esce: uncertainty")
    d = _scores(dice, "esce: dice")
    if u.shape != d.shape:
        raise EvaluationError(f"esce: expected as many Dice values as uncertainties, found {d.size} and {u.size}")
    _in_unit_interval(u, "esce: uncertainty")
    _in_unit_interval(d, "esce: dice")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise EvaluationError(f"esce: expected bins to be a positive integer, found {bins!r}")
    confidence = 1.0 - u
    edges = np.linspace(0.0, 1.0, int(bins) + 1)
    index = np.digitize(confidence, edges[1:-1], right=False)  # edges[i] <= c < edges[i+1]; 1.0 -> last
    n = confidence.size
    total = 0.0
    for m in range(int(bins)):
        members = index == m
        count = int(np.count_nonzero(members))
        if count:
            total += count / n * abs(float(d[members].mean()) - float(confidence[members].mean()))
    return total


def temperature_scaling_search(
    uncertainties_by_T: Mapping[float, ArrayLike], dice: ArrayLike
) -> tuple[float, float]:
    """The temperature whose uncertainties give the lowest ESCE against ``dice`` (ties: the smaller T).

    The paper reports, for the softmax-based baselines, the best ESCE among ``T in {1, 10, 100}``.

    Returns:
        ``(best temperature, its ESCE)``.
    """
    if not uncertainties_by_T:
        raise EvaluationError("temperature_scaling_search: expected at least one temperature, found none")
    best: tuple[float, float] | None = None
    for temperature in sorted(uncertainties_by_T):
        t = _scalar(temperature, "temperature_scaling_search: temperature")
        if t <= 0:
            raise EvaluationError(f"temperature_scaling_search: expected positive temperatures, found {t}")
        error = esce(uncertainties_by_T[temperature], dice)
        if best is None or error < best[1]:
            best = (t, error)
    assert best is not None
    return best


def detection_summary(
    uncertainty_id: ArrayLike,
    uncertainty_ood: ArrayLike,
    dice_id: ArrayLike | None = None,
    dice_ood: ArrayLike | None = None,
    *,
    threshold: float | None = None,
) -> dict[str, float | None]:
    """All subject-level detection metrics at once.

    Args:
        uncertainty_id: uncertainties of in-distribution cases (also sets the threshold when none is given).
        uncertainty_ood: uncertainties of OOD cases.
        dice_id, dice_ood: per-case Dice of the two sets; give both or neither.
        threshold: the keep/flag threshold; ``None`` uses :func:`tpr95_threshold` of ``uncertainty_id``.

    Returns:
        ``{"threshold", "tpr", "fpr", "detection_error", "auc", "esce"}``; ``esce`` (over all ID and OOD
        cases, uncertainties in [0, 1]) is ``None`` when no Dice is given.
    """
    if (dice_id is None) != (dice_ood is None):
        given = "dice_id" if dice_id is not None else "dice_ood"
        raise EvaluationError(f"detection_summary: expected both dice_id and dice_ood or neither, found only {given}")
    ids = _scores(uncertainty_id, "detection_summary: uncertainty_id")
    oods = _scores(uncertainty_ood, "detection_summary: uncertainty_ood")
    t = tpr95_threshold(ids) if threshold is None else _scalar(threshold, "detection_summary: threshold")
    tpr = tpr_at_threshold(ids, t)
    fpr = fpr_at_threshold(oods, t)
    summary: dict[str, float | None] = {
        "threshold": t,
        "tpr": tpr,
        "fpr": fpr,
        "detection_error": detection_error(tpr, fpr),
        "auc": auc(ids, oods),
        "esce": None,
    }
    if dice_id is not None and dice_ood is not None:
        d_id = _scores(dice_id, "detection_summary: dice_id")
        d_ood = _scores(dice_ood, "detection_summary: dice_ood")
        if d_id.size != ids.size or d_ood.size != oods.size:
            raise EvaluationError(
                "detection_summary: expected one Dice per case, found "
                f"{d_id.size} Dice for {ids.size} ID cases and {d_ood.size} Dice for {oods.size} OOD cases"
            )
        summary["esce"] = esce(np.concatenate([ids, oods]), np.concatenate([d_id, d_ood]))
    return summary


# -------------------------------------------------------------------------------------- failure detection


def risk_coverage(uncertainty: ArrayLike, risk: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Risk-coverage curve: keep the ``k`` most confident cases (lowest uncertainty first), k = 1..n.

    Returns ``(coverage, selective_risk)``: ``coverage[k-1] = k / n`` and ``selective_risk[k-1]`` the mean risk
    of the ``k`` kept cases. Tied uncertainties are kept as a group: every ``k`` inside a tie gets the mean
    risk over the whole tied group added so far pro rata, so the curve does not depend on the input order.
    """
    u = _scores(uncertainty, "risk_coverage: uncertainty")
    r = _scores(risk, "risk_coverage: risk")
    if u.shape != r.shape:
        raise EvaluationError(f"risk_coverage: expected one risk per case, found {r.size} for {u.size} cases")
    order = np.argsort(u, kind="stable")
    u, r = u[order], r[order]
    # within a tie, spread the tied group's mean risk evenly, so the order inside it does not matter
    _, start, counts = np.unique(u, return_index=True, return_counts=True)
    for s0, c in zip(start, counts):
        if c > 1:
            r[s0:s0 + c] = r[s0:s0 + c].mean()
    k = np.arange(1, u.size + 1)
    return k / u.size, np.cumsum(r) / k


def aurc(uncertainty: ArrayLike, risk: ArrayLike) -> float:
    """Area under the risk-coverage curve: the mean over k of the mean risk of the k most confident cases.

    Lower is better; a random order gives the mean risk in expectation, the oracle order :func:`e_aurc`'s
    reference.
    """
    _, selective = risk_coverage(uncertainty, risk)
    return float(selective.mean())


def e_aurc(uncertainty: ArrayLike, risk: ArrayLike) -> float:
    """Excess AURC: :func:`aurc` minus the AURC of the oracle order (cases sorted by their true risk)."""
    r = _scores(risk, "e_aurc: risk")
    return aurc(uncertainty, r) - aurc(r, r)


# ------------------------------------------------------------------------------------ intervals (bootstrap, Wilson)


def wilson_interval(k: int, n: int, *, z: float = 1.959963984540054) -> list[float]:
    """Wilson score 95 % interval of a proportion ``k / n`` (sensible at 0 and n, unlike the bootstrap)."""
    if n <= 0:
        raise EvaluationError("wilson_interval: no cases")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 (k = n) the bound is exactly 0 (1); computed, it comes out a rounding error away
    return [0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]



def bootstrap_interval(
    statistic: Callable[..., float],
    *groups: ArrayLike,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*groups)``.

    Each group (e.g. the ID cases and the OOD cases; rows are cases, columns optional) is resampled with
    replacement on its own, keeping its size, so a two-sample statistic like the AUC keeps its design.
    Resamples where the statistic is undefined (raises :class:`EvaluationError` or returns NaN) are dropped;
    if more than half are, :class:`EvaluationError` is raised.
    """
    arrays = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrays or any(a.shape[0] == 0 for a in arrays):
        raise EvaluationError("bootstrap_interval: expected at least one non-empty group of cases")
    if not 0.0 < level < 1.0:
        raise EvaluationError(f"bootstrap_interval: level must be in (0, 1), found {level}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_resamples)):
        sample = [a[rng.integers(0, a.shape[0], size=a.shape[0])] for a in arrays]
        try:
            value = float(statistic(*sample))
        except EvaluationError:
            continue
        if math.isfinite(value):
            values.append(value)
    if len(values) < n_resamples / 2:
        raise EvaluationError(f"bootstrap_interval: the statistic is undefined on {n_resamples - len(values)} of "
                              f"{n_resamples} resamples")
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------- baseline scores


def _check_logits(logits: np.ndarray, name: str, *, min_classes: int = 1) -> np.ndarray:
    array = np.asarray(logits)
    if array.ndim != 4:
        raise EvaluationError(f"{name}: expected logits of shape (k, z, y, x), found shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise EvaluationError(f"{name}: expected real-valued logits, found dtype {array.dtype}")
    if array.shape[0] < min_classes:
        raise EvaluationError(f"{name}: expected at least {min_classes} classes, found {array.shape[0]}")
    if array.shape[1] * array.shape[2] * array.shape[3] == 0:
        raise EvaluationError(f"{name}: expected at least one voxel, found spatial shape {array.shape[1:]}")
    return array


def _check_temperature(temperature: float, name: str) -> float:
    t = _scalar(temperature, f"{name}: temperature")
    if t <= 0:
        raise EvaluationError(f"{name}: expected a positive temperature, found {t}")
    return t


def _chunks(array: np.ndarray, temperature: float, name: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per chunk of z slices, in float64: ``(shifted, peak, sum_exp)``.

    ``shifted = logits/T - peak`` with ``peak`` the class maximum (so ``shifted <= 0``) and
    ``sum_exp = sum_k exp(shifted)`` (>= 1): the stable softmax is ``exp(shifted) / sum_exp`` and
    ``logsumexp(logits/T) = peak + log(sum_exp)``. Only one chunk is held in float64 at a time.
    """
    k, z, y, x = array.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, k * y * x))
    for start in range(0, z, step):
        chunk = array[:, start:start + step].astype(np.float64, copy=True)  # never alias the caller's data
        if not np.all(np.isfinite(chunk)):
            raise EvaluationError(
                f"{name}: expected finite logits, found NaN/inf in z slices {start}..{start + chunk.shape[1] - 1}"
            )
        if temperature != 1.0:
            chunk /= temperature
        peak = chunk.max(axis=0)
        chunk -= peak
        sum_exp = np.exp(chunk).sum(axis=0)
        yield chunk, peak, sum_exp


def max_softmax_uncertainty(logits: np.ndarray, *, temperature: float = 1.0) -> float:
    """Mean over voxels of ``1 - max softmax(logits / T)`` (in ``[0, 1 - 1/k]``).

    Args:
        logits: per-voxel class logits, shape (k, z, y, x), any real dtype (float16 is fine).
        temperature: softmax temperature ``T > 0``.
    """
    array = _check_logits(logits, "max_softmax_uncertainty")
    t = _check_temperature(temperature, "max_softmax_uncertainty")
    total = 0.0
    for _, _, sum_exp in _chunks(array, t, "max_softmax_uncertainty"):
        total += float(np.sum(1.0 - 1.0 / sum_exp))  # max softmax = exp(0) / sum_exp
    return total / (array[0].size)


def kl_uniform_uncertainty(logits: np.ndarray) -> float:
    """Uncertainty from the KL divergence of the softmax to the uniform distribution.

    Per voxel ``confidence = KL(softmax || uniform) / log k = 1 - H(softmax) / log k`` in [0, 1]; the
    result is ``1 - mean confidence`` over voxels, in [0, 1]. Needs ``k >= 2`` classes.
    """
    array = _check_logits(logits, "kl_uniform_uncertainty", min_classes=2)
    log_k = math.log(array.shape[0])
    total = 0.0
    for shifted, _, sum_exp in _chunks(array, 1.0, "kl_uniform_uncertainty"):
        log_sum = np.log(sum_exp)
        log_p = shifted - log_sum  # log softmax, finite everywhere
        entropy = -np.sum(np.exp(log_p) * log_p, axis=0)
        confidence = np.clip((log_k - entropy) / log_k, 0.0, 1.0)
        total += float(confidence.sum())
    return 1.0 - total / array[0].size


def energy_score(logits: np.ndarray, *, temperature: float = 1.0) -> float:
    """Mean over voxels of the energy ``-T · logsumexp(logits / T)`` (raw; lower = more in-distribution)."""
    array = _check_logits(logits, "energy_score")
    t = _check_temperature(temperature, "energy_score")
    total = 0.0
    for _, peak, sum_exp in _chunks(array, t, "energy_score"):
        total += float(np.sum(-t * (peak + np.log(sum_exp))))
    return total / array[0].size
