"""segsentry.evaluation.metrics against independent computations (sklearn, scipy, hand-worked examples)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp, softmax
from scipy.stats import entropy
from sklearn.metrics import roc_auc_score

from segsentry.errors import SegsentryError
from segsentry.evaluation import (
    EvaluationError,
    auc,
    detection_error,
    detection_summary,
    dice,
    energy_score,
    esce,
    fpr_at_threshold,
    kl_uniform_uncertainty,
    max_softmax_uncertainty,
    temperature_scaling_search,
    tpr95_threshold,
    tpr_at_threshold,
)
from segsentry.evaluation import metrics
from segsentry.runtime import scoring


def test_evaluation_error_is_a_segsentry_error() -> None:
    assert issubclass(EvaluationError, SegsentryError)


# ------------------------------------------------------------------------------------------------- Dice


def test_dice_both_empty_is_one_and_one_empty_is_zero() -> None:
    empty = np.zeros((2, 3, 4), dtype=np.uint8)
    full = np.ones((2, 3, 4), dtype=np.uint8)
    assert dice(empty, empty) == 1.0
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0


def test_dice_partial_overlap_hand_worked() -> None:
    pred = np.zeros((1, 2, 4), dtype=np.int16)
    ref = np.zeros((1, 2, 4), dtype=np.int16)
    pred[0, 0, :3] = 1  # 3 voxels
    ref[0, 0, 1:] = 1  # 3 voxels, overlap 2
    ref[0, 1, 0] = 1  # 4 voxels in total
    assert dice(pred, ref) == pytest.approx(2 * 2 / (3 + 4))


def test_dice_label_specific() -> None:
    pred = np.array([[[0, 1, 1, 2, 2, 2]]])
    ref = np.array([[[0, 1, 2, 2, 2, 0]]])
    # label 1: P={1,2}, R={1} -> 2*1/3 ; label 2: P={3,4,5}, R={2,3,4} -> 2*2/6 ; any: P={1..5}, R={1..4}
    assert dice(pred, ref, label=1) == pytest.approx(2 / 3)
    assert dice(pred, ref, label=2) == pytest.approx(4 / 6)
    assert dice(pred, ref) == pytest.approx(2 * 4 / (5 + 4))
    assert dice(pred, ref, label=3) == 1.0  # label absent from both


def test_dice_shape_mismatch() -> None:
    with pytest.raises(EvaluationError, match=r"same shape.*\(2, 2\).*\(2, 3\)"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))


# ------------------------------------------------------------------------------------------------- AUC


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 6, size=int(rng.integers(1, 40))) / 5.0  # few distinct values: many ties
    oods = rng.integers(2, 8, size=int(rng.integers(1, 40))) / 5.0
    labels = np.r_[np.zeros(ids.size), np.ones(oods.size)]
    expected = roc_auc_score(labels, np.r_[ids, oods])
    assert auc(ids, oods) == pytest.approx(expected, abs=1e-12)


def test_auc_continuous_matches_sklearn_and_extremes() -> None:
    rng = np.random.default_rng(7)
    ids, oods = rng.normal(0, 1, 50), rng.normal(0.7, 1, 30)
    expected = roc_auc_score(np.r_[np.zeros(50), np.ones(30)], np.r_[ids, oods])
    assert auc(ids, oods) == pytest.approx(expected, abs=1e-12)
    assert auc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert auc([0.5, 0.5], [0.5]) == 0.5  # all tied


@pytest.mark.parametrize(("ids", "oods", "found"), [([], [0.1], "0 ID and 1 OOD"), ([0.1, 0.2], [], "2 ID and 0 OOD")])
def test_auc_degenerate_sets_raise(ids: list[float], oods: list[float], found: str) -> None:
    with pytest.raises(EvaluationError, match=f"at least one in-distribution and one OOD case, found {found}"):
        auc(ids, oods)


def test_auc_rejects_nan_and_2d() -> None:
    with pytest.raises(EvaluationError, match="finite"):
        auc([0.1, float("nan")], [0.2])
    with pytest.raises(EvaluationError, match="1-D"):
        auc(np.zeros((2, 2)), [0.2])


# ------------------------------------------------------------------------------ threshold / TPR / FPR


def test_tpr95_threshold_hand_worked() -> None:
    # n = 21: index floor(20 * 0.95) = 19 -> mean of the 20th and 21st sorted values
    values = np.arange(21, dtype=float)[::-1] / 10.0
    assert tpr95_threshold(values) == pytest.approx((1.9 + 2.0) / 2)
    # n = 10: index floor(9 * 0.95) = 8 -> mean of sorted[8] and sorted[9]
    assert tpr95_threshold([5, 1, 2, 3, 4, 6, 7, 8, 9, 10]) == pytest.approx(9.5)
    assert tpr95_threshold([0.42]) == 0.42  # n = 1: the value
    assert tpr95_threshold([0.6, 0.2]) == pytest.approx(0.4)  # n = 2: index floor(0.95) = 0 -> mean(0.2, 0.6)


def test_tpr95_threshold_reuses_runtime_function() -> None:
    assert metrics._authors_tpr95_threshold is scoring.tpr95_threshold


def test_tpr95_threshold_empty_raises() -> None:
    with pytest.raises(EvaluationError, match="at least one case, found an empty set"):
        tpr95_threshold([])


def test_tpr_fpr_detection_error_hand_worked() -> None:
    ids = [0.1, 0.2, 0.3, 0.4]
    oods = [0.25, 0.3, 0.5, 0.9, 1.0]
    t = 0.3
    assert tpr_at_threshold(ids, t) == 0.75  # 0.1, 0.2, 0.3 kept (<= is kept)
    assert fpr_at_threshold(oods, t) == 0.4  # 0.25, 0.3 wrongly kept
    assert detection_error(0.75, 0.4) == pytest.approx(0.5 * 0.25 + 0.5 * 0.4)
    assert detection_error(1.0, 0.0) == 0.0
    assert detection_error(0.0, 1.0) == 1.0


def test_rates_and_detection_error_validation() -> None:
    with pytest.raises(EvaluationError, match="uncertainty_ood: expected at least one case"):
        fpr_at_threshold([], 0.5)
    with pytest.raises(EvaluationError, match="uncertainty_id: expected at least one case"):
        tpr_at_threshold([], 0.5)
    with pytest.raises(EvaluationError, match=r"tpr: expected a value in \[0.0, 1.0\], found 1.5"):
        detection_error(1.5, 0.1)
    with pytest.raises(EvaluationError, match="threshold: expected a finite number"):
        fpr_at_threshold([0.1], float("nan"))


# ------------------------------------------------------------------------------------------------- ESCE


def test_esce_hand_worked_with_empty_bin_and_confidence_one() -> None:
    # confidences 0.95, 0.92, 1.0 -> last bin [0.9, 1.0]; 0.35 -> bin [0.3, 0.4); bins 0.4..0.9 empty.
    uncertainty = [0.05, 0.08, 0.0, 0.65]
    dices = [0.9, 0.7, 1.0, 0.1]
    last = abs(np.mean([0.9, 0.7, 1.0]) - np.mean([0.95, 0.92, 1.0]))  # |0.8667 - 0.9567| = 0.09
    low = abs(0.1 - 0.35)  # 0.25
    expected = 3 / 4 * last + 1 / 4 * low
    assert expected == pytest.approx(0.13)
    assert esce(uncertainty, dices) == pytest.approx(expected)


def test_esce_bins_argument_and_perfect_calibration() -> None:
    # two bins: conf 0.2 and 0.4 in [0, 0.5), 0.75 in [0.5, 1]
    value = esce([0.8, 0.6, 0.25], [0.5, 0.5, 0.75], bins=2)
    assert value == pytest.approx(2 / 3 * abs(0.5 - 0.3) + 0)
    assert esce([0.0, 0.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(0.0)


def test_esce_validation() -> None:
    with pytest.raises(EvaluationError, match=r"uncertainty: expected values in \[0, 1\], found range \[-0.1, 0.5\]"):
        esce([-0.1, 0.5], [0.5, 0.5])
    with pytest.raises(EvaluationError, match=r"uncertainty: expected values in \[0, 1\]"):
        esce([1.2], [0.5])
    with pytest.raises(EvaluationError, match="as many Dice values as uncertainties, found 1 and 2"):
        esce([0.1, 0.2], [0.5])
    with pytest.raises(EvaluationError, match="bins to be a positive integer, found 0"):
        esce([0.1], [0.5], bins=0)
    with pytest.raises(EvaluationError, match="at least one case"):
        esce([], [])


def test_temperature_scaling_search_picks_lowest_esce() -> None:
    dices = np.array([0.9, 0.8, 0.2])
    by_t = {1.0: np.array([0.9, 0.9, 0.9]), 10.0: np.array([0.1, 0.2, 0.8]), 100.0: np.array([0.5, 0.5, 0.5])}
    expected = {t: esce(u, dices) for t, u in by_t.items()}
    best_t, best_e = temperature_scaling_search(by_t, dices)
    assert best_t == 10.0
    assert best_e == pytest.approx(min(expected.values()))
    with pytest.raises(EvaluationError, match="at least one temperature"):
        temperature_scaling_search({}, dices)


# -------------------------------------------------------------------------------------------- summary


def test_detection_summary_consistent_with_parts() -> None:
    ids = np.array([0.1, 0.2, 0.15, 0.3, 0.25])
    oods = np.array([0.28, 0.6, 0.9])
    d_id, d_ood = np.array([0.9, 0.85, 0.8, 0.7, 0.75]), np.array([0.6, 0.3, 0.1])
    s = detection_summary(ids, oods, d_id, d_ood)
    t = tpr95_threshold(ids)  # n = 5: index 3 -> mean(0.25, 0.3)
    assert s["threshold"] == pytest.approx(0.275)
    assert s["tpr"] == tpr_at_threshold(ids, t) == 0.8
    assert s["fpr"] == fpr_at_threshold(oods, t) == 0.0
    assert s["detection_error"] == pytest.approx(0.5 * 0.2)
    assert s["auc"] == pytest.approx(roc_auc_score(np.r_[np.zeros(5), np.ones(3)], np.r_[ids, oods]))
    assert s["esce"] == pytest.approx(esce(np.r_[ids, oods], np.r_[d_id, d_ood]))


def test_detection_summary_given_threshold_and_no_dice() -> None:
    s = detection_summary([0.1, 0.2], [0.3, 0.4], threshold=0.35)
    assert s == {"threshold": 0.35, "tpr": 1.0, "fpr": 0.5, "detection_error": 0.25, "auc": 1.0, "esce": None}


def test_detection_summary_errors() -> None:
    with pytest.raises(EvaluationError, match="both dice_id and dice_ood or neither, found only dice_id"):
        detection_summary([0.1], [0.2], [0.9])
    with pytest.raises(EvaluationError, match="one Dice per case"):
        detection_summary([0.1, 0.2], [0.3], [0.9], [0.5])
    with pytest.raises(EvaluationError, match="uncertainty_ood: expected at least one case"):
        detection_summary([0.1, 0.2], [])


# ---------------------------------------------------------------------------------------- baselines


def _random_logits(seed: int, shape: tuple[int, ...] = (3, 5, 6, 7), scale: float = 4.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, size=shape)


@pytest.mark.parametrize("temperature", [1.0, 10.0, 100.0, 0.5])
def test_max_softmax_matches_scipy(temperature: float) -> None:
    logits = _random_logits(0)
    expected = np.mean(1.0 - softmax(logits / temperature, axis=0).max(axis=0))
    assert max_softmax_uncertainty(logits, temperature=temperature) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 10.0, 0.5])
def test_energy_matches_scipy(temperature: float) -> None:
    logits = _random_logits(1)
    expected = np.mean(-temperature * logsumexp(logits / temperature, axis=0))
    assert energy_score(logits, temperature=temperature) == pytest.approx(expected, rel=1e-12)


def test_kl_uniform_matches_scipy_entropy() -> None:
    logits = _random_logits(2, shape=(4, 3, 5, 6))
    k = logits.shape[0]
    p = softmax(logits, axis=0)
    kl = entropy(p, np.full_like(p, 1.0 / k), axis=0)
    expected = 1.0 - np.mean(kl / math.log(k))
    assert kl_uniform_uncertainty(logits) == pytest.approx(expected, rel=1e-12)
    # uniform logits: softmax uniform, KL 0, uncertainty 1; one dominant class: uncertainty ~ 0
    assert kl_uniform_uncertainty(np.zeros((3, 2, 2, 2))) == pytest.approx(1.0)
    peaked = np.zeros((3, 2, 2, 2))
    peaked[0] = 1000.0
    assert kl_uniform_uncertainty(peaked) == pytest.approx(0.0, abs=1e-12)


def test_float16_input_and_extreme_logits() -> None:
    logits16 = _random_logits(3, scale=3.0).astype(np.float16)
    ref = logits16.astype(np.float64)
    assert max_softmax_uncertainty(logits16) == pytest.approx(np.mean(1 - softmax(ref, axis=0).max(axis=0)), rel=1e-12)
    assert energy_score(logits16, temperature=10.0) == pytest.approx(np.mean(-10 * logsumexp(ref / 10, axis=0)), rel=1e-12)
    p = softmax(ref, axis=0)
    expected_kl = 1.0 - np.mean(entropy(p, np.full_like(p, 1 / 3), axis=0) / math.log(3))
    assert kl_uniform_uncertainty(logits16) == pytest.approx(expected_kl, rel=1e-12)
    # float16 extremes (no overflow from exp: stable softmax)
    big = np.zeros((2, 1, 1, 2), dtype=np.float16)
    big[0] = 60000.0
    assert max_softmax_uncertainty(big) == pytest.approx(0.0)
    assert energy_score(big) == pytest.approx(-60000.0)


def test_baselines_chunk_over_z_without_changing_result(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = _random_logits(4, shape=(3, 11, 4, 5))
    whole = (max_softmax_uncertainty(logits), kl_uniform_uncertainty(logits), energy_score(logits, temperature=2.0))
    calls: list[int] = []
    original = metrics._chunks

    def counting(*args, **kwargs):
        for item in original(*args, **kwargs):
            calls.append(item[0].shape[1])
            yield item

    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 3 * 4 * 5 * 3)  # 3 z slices per chunk
    monkeypatch.setattr(metrics, "_chunks", counting)
    chunked = (max_softmax_uncertainty(logits), kl_uniform_uncertainty(logits), energy_score(logits, temperature=2.0))
    assert calls == [3, 3, 3, 2] * 3
    assert chunked == pytest.approx(whole, rel=1e-12)


def test_baselines_do_not_modify_float64_input() -> None:
    logits = _random_logits(5)
    before = logits.copy()
    max_softmax_uncertainty(logits, temperature=10.0)
    kl_uniform_uncertainty(logits)
    energy_score(logits, temperature=3.0)
    np.testing.assert_array_equal(logits, before)


def test_baselines_validation() -> None:
    with pytest.raises(EvaluationError, match=r"shape \(k, z, y, x\), found shape \(3, 4\)"):
        max_softmax_uncertainty(np.zeros((3, 4)))
    with pytest.raises(EvaluationError, match="at least 2 classes, found 1"):
        kl_uniform_uncertainty(np.zeros((1, 2, 2, 2)))
    with pytest.raises(EvaluationError, match="positive temperature, found 0.0"):
        energy_score(np.zeros((2, 2, 2, 2)), temperature=0.0)
    bad = np.zeros((2, 2, 2, 2))
    bad[1, 1, 0, 0] = np.nan
    with pytest.raises(EvaluationError, match="finite logits, found NaN/inf"):
        energy_score(bad)
    with pytest.raises(EvaluationError, match="at least one voxel"):
        energy_score(np.zeros((2, 0, 2, 2)))


# ------------------------------------------------------------------------------- failure detection (AURC)


def _aurc_reference(uncertainty, risk):
    """Zenk et al.'s definition written out directly: sort by confidence, mean over k of the top-k mean risk."""
    order = sorted(range(len(risk)), key=lambda i: uncertainty[i])
    kept = [risk[i] for i in order]
    return sum(sum(kept[:k]) / k for k in range(1, len(kept) + 1)) / len(kept)


def test_aurc_matches_the_definition_and_e_aurc_is_zero_for_the_oracle():
    from segsentry.evaluation.metrics import aurc, e_aurc, risk_coverage

    rng = np.random.default_rng(3)
    risk = rng.uniform(size=50)
    u = risk + rng.normal(scale=0.3, size=50)  # an informative but imperfect ranking, no ties
    assert aurc(u, risk) == pytest.approx(_aurc_reference(list(u), list(risk)), rel=1e-12)
    assert e_aurc(risk, risk) == pytest.approx(0.0, abs=1e-15)
    assert e_aurc(u, risk) > 0
    assert aurc(-risk, risk) > aurc(u, risk) > aurc(risk, risk)  # worst < imperfect < oracle
    coverage, selective = risk_coverage(u, risk)
    assert coverage[-1] == 1.0 and selective[-1] == pytest.approx(risk.mean())  # full coverage: mean risk
    # a random order's AURC is the mean risk in expectation
    random_aurcs = [aurc(rng.permutation(50).astype(float), risk) for _ in range(400)]
    assert np.mean(random_aurcs) == pytest.approx(risk.mean(), abs=0.01)


def test_aurc_does_not_depend_on_the_order_inside_ties():
    from segsentry.evaluation.metrics import aurc

    u = np.array([0.1, 0.1, 0.1, 0.5])
    risk = np.array([0.0, 1.0, 0.5, 0.2])
    values = {aurc(u[p], risk[p]) for p in ([0, 1, 2, 3], [1, 0, 2, 3], [2, 1, 0, 3], [3, 2, 1, 0])}
    assert len(values) == 1
    # the tied group's mean risk 0.5 fills coverages 1/4..3/4, then 0.2 joins: (0.5 + 0.5 + 0.5 + 0.425) / 4
    assert values.pop() == pytest.approx((0.5 * 3 + (1.5 + 0.2) / 4) / 4)


def test_bootstrap_interval_agrees_with_scipy():
    from scipy import stats

    from segsentry.evaluation.metrics import auc, bootstrap_interval

    rng = np.random.default_rng(11)
    x = rng.normal(size=60)
    lo, hi = bootstrap_interval(np.mean, x, n_resamples=4000, seed=1)
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=2).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.03) and hi == pytest.approx(ref.high, abs=0.03)
    assert lo < x.mean() < hi
    # two groups resampled on their own (the AUC's design): the interval brackets the point estimate
    ids, oods = rng.normal(size=40), rng.normal(1.0, size=40)
    lo, hi = bootstrap_interval(auc, ids, oods, n_resamples=1000)
    assert lo < auc(ids, oods) < hi and 0.5 < lo and hi < 1.0
    with pytest.raises(EvaluationError):
        bootstrap_interval(np.mean, [])
