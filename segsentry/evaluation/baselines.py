"""The paper's output-based baselines of one case, from its aggregated logits (only ``ood-eval`` needs them)."""

from __future__ import annotations

import numpy as np

from segsentry.evaluation.metrics import energy_score, kl_uniform_uncertainty, max_softmax_uncertainty

TEMPERATURES = (1, 10, 100)


def output_baselines(logits: np.ndarray) -> dict[str, float]:
    """The paper's output-based baselines from the aggregated logits ``(k, Z, Y, X)`` (network space).

    Each is a subject-level uncertainty averaged over all voxels: 1 - max softmax (temperature 1, 10, 100),
    1 - KL(softmax || uniform) / log k, and the energy ``-T logsumexp(logits / T)`` (T = 1, raw).
    """
    out = {f"max_softmax_T{t}": max_softmax_uncertainty(logits, temperature=float(t)) for t in TEMPERATURES}
    out["kl_uniform"] = kl_uniform_uncertainty(logits)
    out["energy"] = energy_score(logits)
    return {k: float(v) for k, v in out.items()}
