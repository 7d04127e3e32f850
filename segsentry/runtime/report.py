"""A case's report, typed until the edge: ``CASE.json``, ``summary.csv`` rows and the CLI table render it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from segsentry import __version__
from segsentry.runtime.pipeline import CasePrediction, TopPatch

DISTANCE_MAP_UNITS = "squared Mahalanobis distance per voxel (aggregated patch distances)"


@dataclass(frozen=True)
class CaseReport:
    """What ``ood-run`` records for one processed case (``CASE.json``).

    ``uncertainty`` is the normalised subject score U in [0, 1], ``score`` the raw mean distance u, ``ood``
    whether U is above ``threshold``; all four are ``None`` for an uncalibrated bundle. ``outputs`` maps
    ``mask`` / ``uncertainty_map`` to the written files.
    """

    case: str
    inputs: list[str]
    ood: bool | None
    ood_reasons: list[str]
    uncertainty: float | None
    score: float | None
    threshold: float | None
    aggregation: str | None
    uncertainty_map_units: str | None
    n_patches: int
    top_patches: list[TopPatch]
    timings_s: dict[str, float]
    backend: str
    model_sha256: str
    bundle: str
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what was accepted about the input with a caveat
    segsentry_version: str = ""
    bundle_sha256: str = ""  # of the bundle file as loaded (model_sha256 is the graph's, from the manifest)
    input_ids: list[dict[str, str]] = field(default_factory=list)  # per input: path + sha256, or series UID
    step_size: float = 0.5  # sliding-window tile step (fraction of the patch); U is calibrated at the bundle's
    mirror_axes: list[int] | None = None  # test-time mirroring: the flipped axes (network order); None: none
    notes: list[str] = field(default_factory=list)  # how the case was run, where it differs from nnU-Net's default
    # fold ensembles: mean pairwise Dice between the folds' masks (1 = the folds agree); the voxel map of the
    # fraction of folds disagreeing with the ensemble is outputs["disagreement_map"]. None for one network.
    fold_agreement: float | None = None
    # the distance's own U; differs from ``uncertainty`` when the bundle fuses the folds' disagreement into U
    distance_uncertainty: float | None = None
    subject_score: str | None = None  # how the patch distances became ``score`` (the bundle's SubjectScore)
    # a bundle fusing several feature taps (segsentry fuse-taps): each tap's U on the first tap's scale, by layer;
    # ``uncertainty`` is their mean. Empty for one tap.
    tap_uncertainties: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_prediction(cls, prediction: CasePrediction, *, inputs: list[str], aggregation: str | None,
                        timings: dict[str, float], backend: str, model_sha256: str, bundle: str,
                        outputs: dict[str, str], warnings: list[str] | None = None, bundle_sha256: str = "",
                        input_ids: list[dict[str, str]] | None = None,
                        subject_score: str | None = None) -> CaseReport:
        return cls(
            case=prediction.case_id,
            inputs=inputs,
            ood=prediction.ood,
            ood_reasons=list(prediction.ood_reasons),
            uncertainty=prediction.uncertainty_score,
            score=prediction.score,
            threshold=prediction.threshold,
            aggregation=aggregation,
            uncertainty_map_units=DISTANCE_MAP_UNITS if prediction.uncertainty is not None else None,
            n_patches=prediction.n_patches,
            top_patches=list(prediction.top_patches),
            timings_s={k: round(v, 4) for k, v in timings.items()},
            backend=backend,
            model_sha256=model_sha256,
            bundle=bundle,
            outputs=outputs,
            warnings=list(warnings or []),
            segsentry_version=__version__,
            bundle_sha256=bundle_sha256,
            input_ids=list(input_ids or []),
            step_size=prediction.step_size,
            mirror_axes=None if prediction.mirror_axes is None else list(prediction.mirror_axes),
            notes=list(prediction.notes),
            fold_agreement=prediction.fold_agreement,
            distance_uncertainty=prediction.distance_uncertainty,
            subject_score=subject_score,
            tap_uncertainties=dict(prediction.tap_uncertainties),
        )

    @property
    def total_seconds(self) -> float:
        return float(self.timings_s.get("total", 0.0))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, keys in the order of the fields."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaseReport:
        """The inverse of :meth:`to_dict` (a ``CASE.json`` read back, possibly from an older release that lacks
        fields added since with defaults); raises KeyError/TypeError on another shape."""
        fields = dataclasses.fields(cls)
        required = {f.name for f in fields if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        odd = (set(data) - {f.name for f in fields}) | (required - set(data))
        if odd:
            raise KeyError(f"CASE.json fields {sorted(odd)} differ from a CaseReport's")
        return cls(**{**data, "top_patches": [TopPatch(**t) for t in data["top_patches"]]})
