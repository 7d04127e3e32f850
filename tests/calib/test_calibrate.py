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
