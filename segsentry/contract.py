"""The bundle contract, torch- and onnx-free: output roles, head scope and the named calibration choices.

Every layer (export, calib, runtime, evaluation, cli) takes these names from here, so a choice is spelled once.
The enums subclass ``str``: a member compares equal to its value (``Estimator.OAS == "oas"``), is written to
JSON as the bare value, and typer shows the values as the choices of an option.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = [
    "HEAD_SCOPE", "INPUT_IMAGE", "L2_EPS", "Aggregation", "EnsembleScore", "Estimator", "FeatureNorm",
    "HeadInitializer", "Output", "SubjectScore", "ThresholdRule", "choice",
]

E = TypeVar("E", bound=Enum)

HEAD_SCOPE = "ood_head/"  # every node and initializer of the fused Mahalanobis head is named with this prefix
INPUT_IMAGE = "image"  # the role of the bundle's one input: (batch, channels, *patch_size) float32


class Output(str, Enum):
    """Roles of a bundle's outputs; ``Manifest.outputs`` maps each role to the graph output's name."""

    LOGITS = "logits"  # (batch, classes, *patch_size)
    FEATURES = "features"  # (batch, D): the pooled, flattened feature tap
    DISTANCE = "distance"  # (batch,): squared Mahalanobis distance of the features (after ood-calib)

    def __str__(self) -> str:
        return self.value


class HeadInitializer(str, Enum):
    """The fused head's float32 initializers; each is stored under ``HEAD_SCOPE + value`` (:attr:`tensor_name`).

    With ``delta = z - MEAN`` the head computes the squared Mahalanobis distance (design.md, method step 4).
    A fit without a complement term (``N > D``, or the empirical estimator) stores ``COMPONENTS_T``::

        d = ReduceSumSquare(MatMul(delta, COMPONENTS_T))

    A shrinkage fit with ``N <= D`` stores the training span's basis once, its whitening as one scale per
    basis column, and the weight of the residual outside the span::

        c = MatMul(delta, BASIS)
        d = ReduceSumSquare(c * SPAN_SCALE) + COMPLEMENT_SCALE * ReduceSumSquare(delta - MatMul(c, BASIS^T))

    Older bundles stored ``COMPONENTS_T`` (``= BASIS * SPAN_SCALE``) beside ``BASIS``
    instead of ``SPAN_SCALE``, twice the bytes, with the first term ``ReduceSumSquare(MatMul(delta,
    COMPONENTS_T))``; readers accept both. Every implementation of the distance (the ONNX head, the torch
    reference backend, :func:`segsentry.calib.head.head_distance`, the float64 reference
    ``segsentry.calib.gaussian.squared_mahalanobis``) reads these names and this formula.
    """

    MEAN = "mean"  # (D,): mu
    COMPONENTS_T = "components_t"  # (D, k): W^T, with W^T W = Sigma^-1 (fits without a complement term)
    BASIS = "basis"  # (D, r): orthonormal basis V of the training span
    SPAN_SCALE = "span_scale"  # (r,): Sigma^-1/2 on the span, per column of BASIS (0: dropped by the cutoff)
    COMPLEMENT_SCALE = "complement_scale"  # (): weight of the squared residual outside the span

    def __str__(self) -> str:
        return self.value

    @property
    def tensor_name(self) -> str:
        """The initializer's name in the graph, e.g. ``ood_head/mean``."""
        return HEAD_SCOPE + self.value


class Estimator(str, Enum):
    """Covariance estimator of the Gaussian (design.md, method step 3)."""

    LEDOIT_WOLF = "ledoit-wolf"  # shrinkage towards trace(S)/D * I (scikit-learn's LedoitWolf); the default
    EMPIRICAL = "empirical"  # maximum likelihood, pseudo-inverse (the paper's EmpiricalCovariance)
    OAS = "oas"  # oracle approximating shrinkage (scikit-learn's OAS)

    def __str__(self) -> str:
        return self.value


class Aggregation(str, Enum):
    """How patch distances become a voxel map (design.md, method step 5)."""

    NORMALISED = "normalised"  # divide by the summed Gaussian weights, as the logits are; the default
    PAPER = "paper"  # the authors' code: plain sum of d * G

    def __str__(self) -> str:
        return self.value


class FeatureNorm(str, Enum):
    """What happens to the pooled features before the Gaussian (fit and head alike)."""

    NONE = "none"  # the paper: raw pooled features
    L2 = "l2"  # Mahalanobis++ (Mueller & Hein, ICML 2025): z / max(||z||_2, L2_EPS), then fit and score

    def __str__(self) -> str:
        return self.value


L2_EPS = 1e-12  # the floor of the feature norm in FeatureNorm.L2 (numpy and the ONNX head alike)


class ThresholdRule(str, Enum):
    """How the OOD threshold on U is set from calibration scores."""

    CONFORMAL = "conformal"  # split-conformal: the ceil((n + 1)(1 - alpha))-th smallest calibration score; default
    PAPER = "paper"  # the authors' 95 % TPR boundary: sorted, index floor((n - 1) * 0.95), mean with the next

    def __str__(self) -> str:
        return self.value


class SubjectScore(str, Enum):
    """How a case's patch distances become its raw subject score u (before the min/2-max normalisation to U)."""

    MEAN = "mean"  # the paper (design.md step 6): the mean of the voxel map over the preprocessed volume
    PATCH_MIN = "patch-min"  # the smallest patch distance: a case is as far as its most typical patch
    LOWER_HALF = "lower-half"  # the mean of the smaller half of the patch distances

    def __str__(self) -> str:
        return self.value


class EnsembleScore(str, Enum):
    """What a fold ensemble's U is made of (one network: always the distance)."""

    DISTANCE = "distance"  # the folds' mean Mahalanobis distance alone
    FUSED = "fused"  # mean of the distance U and the folds' disagreement (1 - mean pairwise Dice), same scale

    def __str__(self) -> str:
        return self.value


def choice(enum: type[E], value: str | Enum, *, what: str, error: type[Exception] = ValueError) -> E:
    """``value`` as a member of ``enum``; raise ``error`` naming ``what`` and the valid values."""
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in enum)
        raise error(f"unknown {what} '{getattr(value, 'value', value)}'; choose one of {valid}") from None
