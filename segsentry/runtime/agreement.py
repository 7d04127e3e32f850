"""Disagreement between the folds of an ensemble bundle: the failure signal of Zenk et al. (MedIA 2025).

Pure functions on label volumes (numpy, any axis order as long as all arrays share it): each fold's own mask
(the argmax of its logits), the ensemble's mask (the argmax of the fold-averaged logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; two empty masks agree perfectly (1.0, not NaN)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def mean_pairwise_dice(fold_labels: np.ndarray, foreground: Sequence[int]) -> float:
    """Mean over fold pairs of the mean over ``foreground`` labels of the Dice between the two folds' masks.

    ``fold_labels`` is ``(folds, ...)`` integer labels, folds >= 2; 1.0 when every fold draws the same masks.
    """
    if fold_labels.shape[0] < 2:
        raise ValueError(f"pairwise Dice needs at least two folds, got {fold_labels.shape[0]}")
    if not foreground:
        raise ValueError("pairwise Dice needs at least one foreground label")
    pairs = []
    for i, j in combinations(range(fold_labels.shape[0]), 2):
        pairs.append(np.mean([dice(fold_labels[i] == c, fold_labels[j] == c) for c in foreground]))
    return float(np.mean(pairs))


def disagreement_map(fold_labels: np.ndarray, ensemble_labels: np.ndarray) -> np.ndarray:
    """Per voxel, the fraction of folds whose label differs from the ensemble's: float32 in ``[0, 1]``, shape of
    ``ensemble_labels`` (``fold_labels`` is ``(folds, *that shape)``)."""
    if fold_labels.shape[1:] != ensemble_labels.shape:
        raise ValueError(f"fold labels {fold_labels.shape} do not match the ensemble's {ensemble_labels.shape}")
    count = np.zeros(ensemble_labels.shape, dtype=np.uint16)
    for labels in fold_labels:
        count += labels != ensemble_labels
    return (count / np.float32(fold_labels.shape[0])).astype(np.float32)
