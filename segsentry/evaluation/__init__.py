"""Evaluation of OOD detection and segmentation calibration.

:mod:`.metrics` (numpy only) holds the paper's metrics; :mod:`.baselines` the output baselines of one case's
logits; :mod:`.evaluate` runs ``ood-eval`` through the runtime and computes its results, :mod:`.render` turns
them into the markdown and HTML report; :mod:`.shifts` builds TorchIO transformation shifts (``eval`` extra,
imported lazily).
"""

from segsentry.evaluation.metrics import (
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

__all__ = [
    "EvaluationError",
    "auc",
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
]
