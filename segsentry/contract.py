"""The bundle contract, torch- and onnx-free: output roles, head scope and the named calibration choices.

Every layer (export, calib, runtime, evaluation, cli) takes these names from here, so a choice is spelled once.
The enums subclass ``str``: a member compares equal to its value (``Estimator.OAS == "oas"``), is written to
JSON as the bare value, and typer shows the values as the choices of an option.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["HEAD_SCOPE", "INPUT_IMAGE", "Aggregation", "Estimator", "Output", "ThresholdRule", "choice"]

HEAD_SCOPE = "ood_head/"  # every node and initializer of the fused Mahalanobis head is named with this prefix
INPUT_IMAGE = "image"  # the role of the bundle's one input: (batch, channels, *patch_size) float32


class Output(str, Enum):
    """Roles of a bundle's outputs; ``Manifest.outputs`` maps each role to the graph output's name."""

    LOGITS = "logits"  # (batch, classes, *patch_size)
    FEATURES = "features"  # (batch, D): the pooled, flattened feature tap
    DISTANCE = "distance"  # (batch,): squared Mahalanobis distance of the features (after ood-calib)

    def __str__(self) -> str:
        return self.value


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


class ThresholdRule(str, Enum):
    """How the OOD threshold on U is set from calibration scores."""

    CONFORMAL = "conformal"  # split-conformal: the ceil((n + 1)(1 - alpha))-th smallest calibration score; default
    PAPER = "paper"  # the authors' 95 % TPR boundary: sorted, index floor((n - 1) * 0.95), mean with the next

    def __str__(self) -> str:
        return self.value


def choice(enum: type[Enum], value: str | Enum, *, what: str) -> Enum:
    """``value`` as a member of ``enum``; raise ``ValueError`` naming ``what`` and the valid values."""
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in enum)
        raise ValueError(f"unknown {what} {str(getattr(value, 'value', value))!r}; choose one of {valid}") from None
