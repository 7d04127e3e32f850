"""INT8 post-training quantisation of a bundle: an explicit choice, never the default.

onnxruntime static quantisation in QDQ format (``QuantizeLinear``/``DequantizeLinear`` pairs that its CPU
provider fuses into integer kernels; OpenVINO reads them as ``FakeQuantize``): weights int8 per output channel
(symmetric), activations int8 per tensor (MinMax ranges), only the convolutions (``Conv``, ``ConvTranspose``).
The Mahalanobis head (every node of :func:`segsentry.graph.scope.head_nodes`) and the normalisations stay
float32 and are passed as ``nodes_to_exclude`` as well, so a wider op list cannot reach them.

The activation ranges come from real calibration patches: the images go through the runtime's own
preprocessing (:func:`segsentry.runtime.preprocess.preprocess`) and tiler (:func:`pad_to_patch`,
:func:`tile_boxes` at the bundle's step size), exactly what the network sees at inference.

The result is a sealed bundle whose manifest records ``quantization`` (precision ``int8``, what was
quantised, the float32 source's graph hash) and, with fidelity images, the agreement with the float32
bundle (:class:`~segsentry.manifest.QuantizationFidelity`). The calibration (threshold, training scores)
stays the float32 bundle's: U is *not* re-calibrated, which is why its shift and the changed flags are
measured and recorded.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from segsentry._atomic import write_bytes_atomic
from segsentry.errors import BundleError, CalibrationError, SegsentryError
from segsentry.graph.scope import head_nodes, in_head_scope
from segsentry.manifest import Manifest, Quantization, QuantizationFidelity, write_manifest
from segsentry.runtime.backends import BackendOptions, create_backend
from segsentry.runtime.bundle import load_bundle
from segsentry.runtime.io import collect_cases, read_case
from segsentry.runtime.pipeline import predict_case
from segsentry.runtime.preprocess import preprocess
from segsentry.runtime.sliding import pad_to_patch, tile_boxes

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "ConvTranspose")
NORM_OPS = ("InstanceNormalization", "BatchNormalization", "LayerNormalization", "GroupNormalization")
DEFAULT_MAX_PATCHES = 64
METHOD = "onnxruntime static QDQ"


@dataclass(frozen=True)
class CaseFidelity:
    """One case run through the float32 and the int8 bundle (same backend, same preprocessing)."""

    case_id: str
    voxel_agreement: float  # fraction of input voxels with the same label
    dice: float  # foreground (labels > 0) Dice of the int8 mask against the float32 one; 1 when both empty
    u_fp32: float | None
    u_int8: float | None
    ood_fp32: bool | None
    ood_int8: bool | None

    @property
    def flag_changed(self) -> bool:
        return self.ood_fp32 != self.ood_int8


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    quantization: Quantization
    cases: list[CaseFidelity]


def calibration_patches(manifest: Manifest, images: Sequence[str | Path], *,
                        max_patches: int = DEFAULT_MAX_PATCHES) -> Iterator[np.ndarray]:
    """Yield ``(1, channels, *patch_size)`` float32 patches of the cases in ``images``, preprocessed and tiled as
    at inference: at most ``max_patches`` in all, spread evenly over each case's tiles and over the cases."""
    cases = collect_cases(images, num_channels=manifest.num_channels)
    if not cases:
        raise CalibrationError("no calibration cases found in the quantisation images")
    per_case = max(1, -(-max_patches // len(cases)))
    left = max_patches
    for case in cases:
        if left <= 0:
            return
        loaded = read_case(case, num_channels=manifest.num_channels)
        data, _ = preprocess(loaded.image, loaded.spacing, manifest.preprocessing)
        padded, _ = pad_to_patch(data, manifest.patch_size)
        boxes = tile_boxes(padded.shape[1:], manifest.patch_size, manifest.tiling.step_size)
        take = min(per_case, left, len(boxes))
        for i in np.unique(np.linspace(0, len(boxes) - 1, take).round().astype(int)):
            yield np.ascontiguousarray(padded[(slice(None), *(slice(a, b) for a, b in boxes[i]))][None],
                                       dtype=np.float32)
            left -= 1


class _PatchReader:
    """onnxruntime's ``CalibrationDataReader`` protocol (``get_next() -> {input: batch}`` or ``None``) over
    :func:`calibration_patches`; counts what it fed."""

    def __init__(self, input_name: str, patches: Iterator[np.ndarray]) -> None:
        self.input_name = input_name
        self._patches = patches
        self.count = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        patch = next(self._patches, None)
        if patch is None:
            return None
        self.count += 1
        return {self.input_name: patch}

    def rewind(self) -> None:  # MinMax needs a single pass
        raise CalibrationError("the calibration patches are streamed once; a second pass is not supported")


def fp32_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the nodes that must stay float32: the Mahalanobis head and every normalisation."""
    keep = head_nodes(graph) | {i for i, n in enumerate(graph.node) if n.op_type in NORM_OPS}
    names = [graph.node[i].name for i in sorted(keep)]
    if any(not name for name in names):
        raise BundleError("the bundle has unnamed head or normalisation nodes, which quantisation cannot exclude; "
                          "re-export it with this segsentry")
    return names


def quantize_bundle(
    bundle_path: str | Path,
    output: str | Path,
    *,
    calibration_images: Sequence[str | Path],
    fidelity_images: Sequence[str | Path] = (),
    max_patches: int = DEFAULT_MAX_PATCHES,
    threads: int | None = None,
    fidelity_backend: str = "onnxruntime",
) -> QuantizeResult:
    """Quantise ``bundle_path``'s network to INT8 (see the module docstring) and write a sealed bundle to
    ``output``. ``calibration_images``: folders or files of in-distribution cases whose patches set the
    activation ranges (``max_patches`` at most); ``fidelity_images``: cases (preferably others) on which the
    int8 bundle is compared with the float32 one on ``fidelity_backend``, recorded in the manifest. Raises
    :class:`~segsentry.errors.SegsentryError` subclasses for anything a person must fix."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if max_patches < 1:
        raise CalibrationError(f"max_patches must be at least 1, got {max_patches}")
    source = load_bundle(bundle_path)
    manifest = source.manifest
    if manifest.quantization is not None:
        raise BundleError(f"{bundle_path} is already quantised ({manifest.quantization.precision}); quantise the "
                          "float32 bundle instead")
    model = onnx.load_from_string(source.model_bytes)
    keep = fp32_nodes(model.graph)
    input_name = manifest.inputs.get("image", "image")
    reader = _PatchReader(input_name, calibration_patches(manifest, calibration_images, max_patches=max_patches))
    with tempfile.TemporaryDirectory(prefix="segsentry-quantize-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(source.model_bytes)
        try:
            quantize_static(
                src, dst, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=keep, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )
        except SegsentryError:
            raise
        except Exception as exc:  # onnxruntime raises plain exceptions of several kinds
            raise CalibrationError(f"onnxruntime could not quantise the bundle: {type(exc).__name__}: {exc}") from exc
        quantized = onnx.load(str(dst))
    _check_quantized(quantized, model, keep)
    n_cases = len(collect_cases(calibration_images, num_channels=manifest.num_channels))
    quantization = Quantization(
        precision="int8", method=METHOD, op_types=list(QUANTIZED_OPS),
        weights="int8, symmetric, per output channel", activations="int8, asymmetric, per tensor, MinMax ranges",
        fp32_nodes=keep, n_calibration_patches=reader.count, n_calibration_cases=n_cases,
        source_weights_sha256=manifest.weights_sha256,
    )
    model_bytes = write_manifest(quantized, manifest.replace(quantization=quantization))
    cases: list[CaseFidelity] = []
    if fidelity_images:
        cases = compare_bundles(source.model_bytes, model_bytes, manifest, fidelity_images, threads=threads,
                                backend=fidelity_backend)
        quantization = Quantization(**{**quantization.__dict__, "fidelity": summarise(
            cases, source=", ".join(str(p) for p in fidelity_images), backend=fidelity_backend)})
        model_bytes = write_manifest(quantized, manifest.replace(quantization=quantization))
    write_bytes_atomic(output, model_bytes)
    load_bundle(output)  # the seal and the graph hash check out
    return QuantizeResult(path=Path(output), quantization=quantization, cases=cases)


def _check_quantized(model: onnx.ModelProto, source: onnx.ModelProto, keep: list[str]) -> None:
    """The quantised graph is valid, holds quantised convolutions, and kept every float32 node with the same
    operator and inputs, and the head's float32 initializers bit for bit."""
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise CalibrationError(f"the quantised graph is not valid ONNX: {exc}") from exc
    ops = [n.op_type for n in model.graph.node]
    if "QuantizeLinear" not in ops or "DequantizeLinear" not in ops:
        raise CalibrationError("onnxruntime quantised nothing (no QuantizeLinear/DequantizeLinear in the graph)")
    before = {n.name: n for n in source.graph.node}
    after = {n.name: n for n in model.graph.node}
    changed = [k for k in keep if k not in after or after[k].op_type != before[k].op_type
               or (in_head_scope(k) and list(after[k].input) != list(before[k].input))]
    if changed:
        raise CalibrationError(f"quantisation changed float32 nodes: {', '.join(changed[:5])}")
    head_before = {t.name: t for t in source.graph.initializer if in_head_scope(t.name)}
    head_after = {t.name: t for t in model.graph.initializer if in_head_scope(t.name)}
    if head_before.keys() != head_after.keys() or any(
            head_after[k].SerializeToString() != v.SerializeToString() for k, v in head_before.items()):
        raise CalibrationError("quantisation changed the Mahalanobis head's float32 initializers")


def compare_bundles(fp32_bytes: bytes, int8_bytes: bytes, manifest: Manifest, images: Sequence[str | Path], *,
                    threads: int | None = None, backend: str = "onnxruntime",
                    precision: str | None = None) -> list[CaseFidelity]:
    """Run every case in ``images`` through both graphs (on ``backend``, same manifest) and compare.

    ``precision`` is the second engine's (:class:`BackendOptions`; the first always runs fp32): with the same
    bytes twice and ``precision="bf16"`` on OpenVINO this compares its bf16 network with fp32 (the ``*_int8``
    fields then hold the bf16 run)."""
    cases = collect_cases(images, num_channels=manifest.num_channels)
    if not cases:
        raise CalibrationError("no cases found in the fidelity images")
    kwargs = {"channels": manifest.num_channels, "patch_size": manifest.patch_size}
    full = BackendOptions(threads=threads, precision="fp32")
    reduced = BackendOptions(threads=threads, precision=precision)
    out = []
    with create_backend(backend, fp32_bytes, options=full, **kwargs) as fp32, \
            create_backend(backend, int8_bytes, options=reduced, **kwargs) as int8:
        for case in cases:
            loaded = read_case(case, num_channels=manifest.num_channels)
            a = predict_case(loaded, fp32, manifest, with_uncertainty_map=False)
            b = predict_case(loaded, int8, manifest, with_uncertainty_map=False)
            out.append(CaseFidelity(
                case_id=case.case_id, voxel_agreement=float(np.mean(a.mask == b.mask)),
                dice=foreground_dice(b.mask, a.mask), u_fp32=a.uncertainty_score, u_int8=b.uncertainty_score,
                ood_fp32=a.ood, ood_int8=b.ood))
            log.info("%s: agreement %.6f, Dice %.4f, U %s -> %s", case.case_id, out[-1].voxel_agreement,
                     out[-1].dice, a.uncertainty_score, b.uncertainty_score)
    return out


def foreground_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of the foregrounds (labels > 0) of two masks of one shape; 1.0 when both are empty."""
    p, r = pred > 0, ref > 0
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total


def summarise(cases: list[CaseFidelity], *, source: str, backend: str = "onnxruntime") -> QuantizationFidelity:
    """The manifest's summary of :func:`compare_bundles`' cases."""
    agreement = np.array([c.voxel_agreement for c in cases])
    dice = np.array([c.dice for c in cases])
    du = [abs(c.u_int8 - c.u_fp32) for c in cases if c.u_fp32 is not None and c.u_int8 is not None]
    return QuantizationFidelity(
        n_cases=len(cases), voxel_agreement_min=float(agreement.min()), voxel_agreement_mean=float(agreement.mean()),
        dice_min=float(dice.min()), dice_mean=float(dice.mean()),
        max_abs_u_difference=float(max(du)) if du else None, flags_changed=sum(c.flag_changed for c in cases),
        cases_source=source, backend=backend)


__all__ = ["CaseFidelity", "QuantizeResult", "calibration_patches", "compare_bundles", "foreground_dice",
           "fp32_nodes", "quantize_bundle", "summarise"]
