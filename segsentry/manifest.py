"""The versioned JSON manifest carried in an ONNX bundle's ``metadata_props``.

The manifest is everything the torch-free runtime needs to reproduce the training pipeline: preprocessing
parameters from nnU-Net's plans, the patch size, labels, channels, the feature layer and its pooling plan,
and (after ``ood-calib``) the fitted Gaussian's summary, the training score range and the threshold.

Axis conventions: every per-axis list in the manifest (``patch_size``, ``spacing``, pooling kernels) is in
nnU-Net's *transposed* numpy order, i.e. the order the network sees after ``transpose_forward`` has been
applied to a SimpleITK array (numpy arrays from SimpleITK are z, y, x).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segsentry import _onnx_wire
from segsentry.contract import Output
from segsentry.errors import BundleError

if TYPE_CHECKING:  # the runtime reads bundles without the onnx package
    import onnx

MANIFEST_KEY = "segsentry.manifest"
SEAL_KEY = "segsentry.seal"  # sha256 over the graph hash and the manifest text: an edited manifest breaks it
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Preprocessing:
    """nnU-Net v2 preprocessing parameters (see design.md, "nnU-Net v2 inference")."""

    transpose_forward: list[int]
    transpose_backward: list[int]
    spacing: list[float]
    normalization_schemes: list[str]
    use_mask_for_norm: list[bool]
    intensity_properties: dict[str, dict[str, float]]
    crop_to_nonzero: bool = True
    resampling_data: dict[str, Any] = field(
        default_factory=lambda: {"order": 3, "order_z": 0, "force_separate_z": None}
    )
    resampling_probabilities: dict[str, Any] = field(
        default_factory=lambda: {"order": 1, "order_z": 0, "force_separate_z": None}
    )
    anisotropy_threshold: float = 3.0


@dataclass(frozen=True)
class Tiling:
    """Sliding-window parameters (nnU-Net defaults).

    ``mirror_axes`` are the checkpoint's ``inference_allowed_mirroring_axes`` (network axis order): ``ood-run``
    averages the logits over every flip of them, as ``nnUNetv2_predict`` does by default (``--disable-tta``
    turns it off). ``[]``: the checkpoint allows none. ``None``: the bundle predates this field; it runs without
    mirroring and says so in the report. The OOD distance always comes from the un-mirrored pass only: the
    Gaussian was fit on un-mirrored patches, so U does not depend on mirroring.
    """

    step_size: float = 0.5
    sigma_scale: float = 0.125
    value_scaling_factor: float = 10.0
    mirror_axes: list[int] | None = None


@dataclass(frozen=True)
class FeatureSpec:
    """Where the OOD features come from and how they are projected to a vector of size ``dim``."""

    layer: str
    layer_shape: list[int]  # (C, z, y, x) per sample at the layer output
    pooling: list[list[int]]  # one avg_pool3d kernel (= stride) per pooling step
    dim: int


@dataclass(frozen=True)
class FoldSource:
    """One trained network of the bundle: nnU-Net's fold name, its checkpoint file and that file's sha256."""

    fold: str
    checkpoint: str
    sha256: str


@dataclass(frozen=True)
class DisagreementFusion:
    """How a fold ensemble's disagreement enters U (``ood-calib --ensemble-score fused``).

    The case's disagreement ``1 - a`` (``a``: mean pairwise Dice of the folds' masks) is mapped onto the
    distance U's scale, ``U_dis = offset + scale * (1 - a)``, by matching the median and the 95th percentile of
    both on the unlabelled calibration cases; the deployed U is the mean ``(U_distance + U_dis) / 2`` and the
    threshold is the conformal rule on those cases' combined U. ``mirrored``: whether the calibration cases'
    folds were mirrored (as ``ood-run`` deploys them by default)."""

    offset: float
    scale: float
    calibration_disagreements: list[float]  # 1 - fold agreement of each calibration case
    mirrored: bool

    def uncertainty(self, fold_agreement: float) -> float:
        """The disagreement part of U for a case whose folds agree with mean pairwise Dice ``fold_agreement``."""
        return float(self.offset + self.scale * (1.0 - fold_agreement))

    def combine(self, distance_uncertainty: float, fold_agreement: float) -> float:
        """The deployed U: the mean of the distance U and the disagreement part."""
        return 0.5 * (distance_uncertainty + self.uncertainty(fold_agreement))


@dataclass(frozen=True)
class TapScore:
    """A further feature tap of the same network whose U joins the bundle's (``segsentry fuse-taps``).

    The tap has its own Gaussians (one per fold) in the graph, read from the graph output ``output`` (its
    patch distance, as ``distance`` is the first tap's), and its own ``calibration``, exactly as the
    single-tap bundle it came from was calibrated (training range, calibration scores, disagreement fusion,
    its own threshold). Its U is mapped onto the first tap's scale, ``offset + scale * U_tap``, by matching
    the median and the 95th percentile of both on the shared calibration cases; the deployed U is the mean
    of the first tap's U and every mapped tap U, and the bundle's ``threshold`` is on that mean."""

    features: FeatureSpec
    output: str
    calibration: Calibration
    offset: float
    scale: float

    def uncertainty(self, tap_uncertainty: float) -> float:
        """This tap's U on the first tap's scale."""
        return float(self.offset + self.scale * tap_uncertainty)


@dataclass(frozen=True)
class InputRange:
    """Plain statistics of the training cases (``segsentry.runtime.guard``): per-channel minimum intensity
    standard deviation, and the minimum physical extent in mm of the sides sorted ascending."""

    min_intensity_std: list[float]
    min_extent_mm: list[float]


@dataclass(frozen=True)
class Calibration:
    """Summary of the Gaussian fitted by ``ood-calib`` and the training-score statistics."""

    estimator: str
    shrinkage: float
    rank: int
    n_patches: int
    n_cases: int
    aggregation: str  # "normalised" or "paper"
    train_score_min: float
    train_score_max: float
    threshold: float  # on the normalised uncertainty U in [0, 1]
    train_scores: list[float]  # raw subject scores u of the training cases
    train_uncertainties: list[float]  # normalised U of the training cases
    score_fit: str = "in-sample"  # how the training scores were computed (in-sample or cross-fit by case)
    threshold_rule: str = "paper"  # ThresholdRule: "conformal" or "paper" (bundles before 0.2: always paper)
    alpha: float | None = None  # the requested false-alarm rate (conformal)
    false_alarm_bound: float | None = None  # what the threshold guarantees with these n cases (conformal)
    calibration_source: str = "training cases"  # whose scores set the threshold
    calibration_scores: list[float] = field(default_factory=list)  # their raw subject scores u
    input_range: InputRange | None = None  # the training cases' content range (None: bundles before 0.2)
    feature_norm: str = "none"  # FeatureNorm: "none" (the paper) or "l2" (Mahalanobis++), fit and head alike
    train_orientation: str | None = None  # dominant orientation code of the training images ("LPS"...), if known
    # A fold ensemble: one Gaussian per fold (shrinkage and rank above are fold 0's; every fold's here). The
    # patch distance is the mean of the folds' squared distances; scores, range and threshold are on that mean.
    fold_shrinkage: list[float] = field(default_factory=list)
    fold_rank: list[int] = field(default_factory=list)
    # A fold ensemble whose U also holds the folds' disagreement (None: U is the distance's alone). Then
    # ``threshold`` is on the combined U; ``calibration_scores`` stay the raw distance scores u.
    fusion: DisagreementFusion | None = None
    # SubjectScore: how the patch distances become the raw score u (older bundles: the voxel map's mean).
    # Training scores, calibration scores, range and threshold are all on this score.
    subject_score: str = "mean"
    # Further feature taps fused into U (``segsentry fuse-taps``); then ``threshold`` and ``false_alarm_bound``
    # are on the mean of this calibration's U and theirs (each tap's own threshold stays in its calibration).
    taps: list[TapScore] = field(default_factory=list)

    def combined_uncertainty(self, distance_uncertainty: float, fold_agreement: float | None) -> float:
        """The deployed U from the distance U and, for a fused bundle, the folds' agreement."""
        if self.fusion is None:
            return distance_uncertainty
        if fold_agreement is None:
            raise BundleError("this bundle's U combines the distance with the folds' disagreement, but no fold "
                              "agreement was computed (the case ran without logits or with one fold)")
        return self.fusion.combine(distance_uncertainty, fold_agreement)


@dataclass(frozen=True)
class QuantizationFidelity:
    """How a reduced-precision bundle agrees with its float32 source on ``n_cases`` cases (both run on
    ``backend``, same preprocessing and tiling): voxel agreement of the masks, foreground Dice of the
    reduced-precision mask against the float32 one (every label > 0, per case), the largest |U difference|
    and how many cases changed their OOD flag."""

    n_cases: int
    voxel_agreement_min: float
    voxel_agreement_mean: float
    dice_min: float
    dice_mean: float
    max_abs_u_difference: float | None
    flags_changed: int
    cases_source: str  # which folders the fidelity cases came from
    backend: str = "onnxruntime"  # the engine both bundles ran on (INT8 kernels differ between engines)


@dataclass(frozen=True)
class Quantization:
    """A reduced-precision bundle (``segsentry.calib.quantize``): what was quantised and how it was checked.

    The calibration (threshold, training scores) is the float32 bundle's: U is not re-calibrated, so its
    shift is part of ``fidelity``."""

    precision: str  # "int8"
    method: str  # e.g. "onnxruntime static QDQ"
    op_types: list[str]  # the operator types quantised; everything else stays float32
    weights: str
    activations: str
    fp32_nodes: list[str]  # nodes kept float32 on purpose (Mahalanobis head, normalisations)
    n_calibration_patches: int
    n_calibration_cases: int
    source_weights_sha256: str  # the float32 bundle's graph hash
    fidelity: QuantizationFidelity | None = None


@dataclass(frozen=True)
class Manifest:
    """Versioned description of a bundle. ``source`` says where the network came from."""

    source: dict[str, Any]
    labels: dict[str, int]
    channels: dict[str, str]
    file_ending: str
    num_classes: int
    patch_size: list[int]
    preprocessing: Preprocessing
    tiling: Tiling
    features: FeatureSpec
    inputs: dict[str, str] = field(default_factory=lambda: {"image": "image"})
    outputs: dict[str, str] = field(default_factory=lambda: {Output.LOGITS.value: "logits",
                                                             Output.FEATURES.value: "features"})  # role -> name
    calibration: Calibration | None = None
    quantization: Quantization | None = None  # None: the float32 network as exported
    weights_sha256: str = ""
    version: int = MANIFEST_VERSION
    # The networks in the bundle, in ensemble order. With two or more (a fold ensemble) every output gains a fold
    # axis after the batch axis -- logits (batch, folds, classes, z, y, x), features (batch, folds, D) -- except
    # ``distance`` (batch,), the mean of the folds' squared distances. [] (any torch module) or one: no fold axis.
    folds: list[FoldSource] = field(default_factory=list)
    # Region-based models (BraTS-style): output channel i is a sigmoid over the labels regions[i]; the mask gets
    # regions_class_order[i] where its probability exceeds 0.5, in order. None: softmax over labels, argmax.
    regions: list[list[int]] | None = None
    regions_class_order: list[int] | None = None

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def n_folds(self) -> int:
        """Networks in the bundle (1 unless it is a fold ensemble)."""
        return max(1, len(self.folds))

    def output_name(self, role: Output | str) -> str:
        """The graph output name that plays ``role``; raise :class:`BundleError` if the bundle has none."""
        key = Output(role).value
        if key not in self.outputs:
            raise BundleError(f"the bundle has no '{key}' output (it has: {', '.join(sorted(self.outputs))})")
        return self.outputs[key]

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            raw = json.loads(text)
            version = raw.get("version")
            if version != MANIFEST_VERSION:
                raise BundleError(
                    f"bundle manifest version {version} is not supported by this segsentry "
                    f"(expected {MANIFEST_VERSION}); re-export the model with this version"
                )
            calibration = raw.pop("calibration", None)
            quantization = raw.pop("quantization", None)
            folds = [FoldSource(**f) for f in raw.pop("folds", [])]
            return cls(
                folds=folds,
                preprocessing=Preprocessing(**raw.pop("preprocessing")),
                tiling=_tiling(raw.pop("tiling")),
                features=FeatureSpec(**raw.pop("features")),
                calibration=_calibration(calibration) if calibration else None,
                quantization=_quantization(quantization) if quantization else None,
                **raw,
            )
        except BundleError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BundleError(f"bundle manifest is malformed ({exc}); re-export the model") from exc


def _calibration(raw: dict[str, Any]) -> Calibration:
    content = raw.pop("input_range", None)
    fusion = raw.pop("fusion", None)
    taps = [TapScore(features=FeatureSpec(**t.pop("features")), calibration=_calibration(t.pop("calibration")), **t)
            for t in raw.pop("taps", [])]
    return Calibration(**raw, input_range=InputRange(**content) if content else None,
                       fusion=DisagreementFusion(**fusion) if fusion else None, taps=taps)


def _quantization(raw: dict[str, Any]) -> Quantization:
    fidelity = raw.pop("fidelity", None)
    return Quantization(**raw, fidelity=QuantizationFidelity(**fidelity) if fidelity else None)


def _tiling(raw: dict[str, Any]) -> Tiling:
    """``Tiling`` from its JSON; bundles written before 0.2 carry an unused ``mirroring: false``, dropped here."""
    if raw.pop("mirroring", False):
        raise BundleError("the bundle asks for test-time mirroring, which this segsentry does not implement")
    return Tiling(**raw)


def weights_sha256(model_bytes: bytes) -> str:
    """sha256 of the serialized graph (every node and initializer), excluding ``metadata_props``.

    Computed from the bytes of ``ModelProto.graph`` as stored in the file, so the manifest can hold it.
    """
    try:
        return hashlib.sha256(_onnx_wire.graph_bytes(model_bytes)).hexdigest()
    except ValueError as exc:
        raise BundleError(f"not a valid ONNX model ({exc})") from exc


def manifest_seal(manifest_json: str) -> str:
    """The seal of a stamped manifest: sha256 of its exact JSON text, which itself records the graph's sha256,
    so graph and manifest are covered together (a threshold edited to 0.999 no longer loads)."""
    return hashlib.sha256(("segsentry-seal-v1\n" + manifest_json).encode("utf-8")).hexdigest()


def write_manifest(model: onnx.ModelProto, manifest: Manifest) -> bytes:
    """Store ``manifest`` with the graph hash in ``model.metadata_props`` (merging other props).

    ``onnx.helper.set_model_props`` would wipe existing props, so the entry is replaced in place.
    Returns the serialized model, whose graph bytes are exactly the hashed ones.
    """
    graph_hash = weights_sha256(model.SerializeToString())
    stamped = manifest.replace(weights_sha256=graph_hash).to_json()
    for key, value in ((MANIFEST_KEY, stamped), (SEAL_KEY, manifest_seal(stamped))):
        for prop in model.metadata_props:
            if prop.key == key:
                prop.value = value
                break
        else:
            entry = model.metadata_props.add()
            entry.key = key
            entry.value = value
    data = model.SerializeToString()
    if weights_sha256(data) != graph_hash:  # protobuf must not reorder the graph between serializations
        raise BundleError("graph serialization is not stable; cannot stamp a weight hash")
    return data


def read_manifest(model_bytes: bytes, *, verify_hash: bool = True) -> Manifest:
    """Read the manifest from a serialized model; raise :class:`BundleError` if absent, if the graph changed,
    or if the manifest was edited (bundles written before the seal existed carry none and are read as before)."""
    try:
        props = _onnx_wire.metadata_props(model_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"not a valid ONNX model ({exc})") from exc
    if MANIFEST_KEY not in props:
        raise BundleError(
            "the ONNX file has no segsentry manifest; it was not produced by ood-export/ood-calib "
            "(export the model with ood-export first)"
        )
    manifest = Manifest.from_json(props[MANIFEST_KEY])
    if verify_hash and SEAL_KEY in props and props[SEAL_KEY] != manifest_seal(props[MANIFEST_KEY]):
        raise BundleError("the bundle's manifest was edited after export/calibration (its seal does not match); "
                          "re-run ood-calib instead of editing thresholds or settings by hand")
    if verify_hash:
        actual = weights_sha256(model_bytes)
        if actual != manifest.weights_sha256:
            raise BundleError(
                f"weight hash mismatch: the manifest records sha256 {manifest.weights_sha256[:12]}… but the "
                f"graph hashes to {actual[:12]}…; the file was modified after export/calibration"
            )
    return manifest
