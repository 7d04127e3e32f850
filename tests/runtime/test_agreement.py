"""Fold disagreement: pairwise Dice against scikit-learn's F1 (= Dice for binary masks), the voxel map by hand."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from segsentry.runtime.agreement import dice, disagreement_map, mean_pairwise_dice


def test_mean_pairwise_dice_matches_sklearn_f1():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    folds = rng.integers(0, 3, size=(4, 6, 7, 8)).astype(np.uint8)
    folds[1, :3] = folds[0, :3]  # partly agreeing folds
    expected = np.mean([np.mean([metrics.f1_score((folds[i] == c).ravel(), (folds[j] == c).ravel())
                                 for c in (1, 2)]) for i, j in combinations(range(4), 2)])
    assert mean_pairwise_dice(folds, [1, 2]) == pytest.approx(expected, rel=1e-12)
    assert mean_pairwise_dice(np.stack([folds[0]] * 3), [1, 2]) == 1.0


def test_dice_of_empty_masks_is_one():
    empty = np.zeros((3, 3), bool)
    assert dice(empty, empty) == 1.0
    assert dice(empty, ~empty) == 0.0
    # a label no fold draws counts as agreement, not NaN
    folds = np.stack([np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8)])
    assert mean_pairwise_dice(folds, [1, 2]) == 1.0


def test_disagreement_map_counts_folds_against_the_ensemble():
    folds = np.array([[[0, 1, 2]], [[0, 1, 1]], [[1, 1, 1]]], dtype=np.uint8)  # (3 folds, 1, 3)
    ensemble = np.array([[0, 1, 1]], dtype=np.uint8)
    np.testing.assert_allclose(disagreement_map(folds, ensemble), [[1 / 3, 0, 1 / 3]], rtol=1e-6)
    assert disagreement_map(folds, ensemble).dtype == np.float32
    with pytest.raises(ValueError):
        disagreement_map(folds, ensemble[:, :2])
    with pytest.raises(ValueError):
        mean_pairwise_dice(folds[:1], [1])
