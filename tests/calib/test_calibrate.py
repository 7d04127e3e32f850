"""Calibration driver: out-of-sample training scores (cross-fit by case) versus the paper's in-sample scores."""

from __future__ import annotations

import numpy as np
import pytest

from segsentry.calib import calibrate
from segsentry.errors import CalibrationError
from segsentry.runtime import load_bundle


def test_cross_fitted_training_scores_are_out_of_sample(ct_pipeline, tmp_path):
    in_sample = calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "a.onnx", score_folds=1,
                          threshold_rule="paper")
    cross = calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "b.onnx", score_folds=2)
    assert in_sample.calibration.score_fit == "in-sample"
    assert cross.calibration.score_fit == "cross-fit, 2 folds by case"
    # a case scored by a Gaussian that never saw it is farther away than one the Gaussian was fitted on
    assert np.all(np.array(cross.calibration.train_scores) > np.array(in_sample.calibration.train_scores))
    # the deployed head is the same full fit either way
    a, b = load_bundle(tmp_path / "a.onnx"), load_bundle(tmp_path / "b.onnx")
    assert a.manifest.calibration.n_patches == b.manifest.calibration.n_patches
    assert in_sample.fit.shrinkage == cross.fit.shrinkage
    np.testing.assert_array_equal(in_sample.fit.mean, cross.fit.mean)


def test_score_folds_validation(ct_pipeline, tmp_path):
    with pytest.raises(CalibrationError, match="score_folds"):
        calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "x.onnx", score_folds=0)


def test_l2_feature_norm_is_recorded_and_deployed(ct_pipeline, test_cases, tmp_path):
    """Mahalanobis++ end to end: the fused head (checked inside calibrate against numpy on normalised features)
    and the deployed score differ from the raw-feature bundle, and the manifest says which one it is."""
    from segsentry.runtime import run_batch

    raw = calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "raw.onnx")
    l2 = calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "l2.onnx", feature_norm="l2")
    assert load_bundle(tmp_path / "l2.onnx").manifest.calibration.feature_norm == "l2"
    assert load_bundle(tmp_path / "raw.onnx").manifest.calibration.feature_norm == "none"
    assert l2.head_check_max_rel_error <= 1e-3
    assert not np.allclose(l2.fit.mean, raw.fit.mean)
    assert 0 < np.linalg.norm(l2.fit.mean) <= 1 + 1e-6 < np.linalg.norm(raw.fit.mean)  # a mean of unit rows
    case = next(iter(test_cases["ct"].values()))
    scores = [run_batch(b, case, tmp_path / name, backend="onnxruntime", qa=False).outcomes[0].report.score
              for name, b in (("r", tmp_path / "raw.onnx"), ("n", tmp_path / "l2.onnx"))]
    assert scores[0] != pytest.approx(scores[1])
    with pytest.raises(CalibrationError, match="feature normalisation"):
        calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "x.onnx", feature_norm="l3")
