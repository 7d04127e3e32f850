"""``segsentry fuse-taps``: several feature taps of one network in one graph, one Gaussian each, one U.

Each tap is first a whole calibrated bundle of the same network graph (the first tap's features bundle tapped at
another layer by ``segsentry retap``, :func:`segsentry.devtools.retap.retap`, then ``ood-calib`` with the same
options and ``--calibration-images``; a separate ``ood-export --layer`` traces the network anew and is refused): its own
Gaussians, training range, disagreement fusion and threshold. :func:`fuse_taps` copies the further taps'
pooling and heads into the first bundle's graph (the network and its logits are shared and must be identical
node for node and weight for weight), each tap's patch distance a graph output of its own. U becomes the mean
of the first tap's U and each further tap's U mapped onto the first's scale by matching the median and the
95th percentile of both on the calibration cases (as ``ood-calib`` maps the folds' disagreement onto the
distance); the threshold is the first bundle's rule (split-conformal at its alpha) on those cases' fused U.
Chosen on the phantom benchmark's dev seeds and confirmed on seeds drawn for it
(``benchmarks/tap_fusion_offline.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from segsentry._atomic import write_bytes_atomic
from segsentry.contract import HEAD_SCOPE, Output, ThresholdRule
from segsentry.errors import BundleError, CalibrationError
from segsentry.graph import GraphIndex, check_model
from segsentry.manifest import Calibration, Manifest, TapScore, read_manifest, write_manifest
from segsentry.runtime.scoring import conformal_threshold, normalise_score, tpr95_threshold

log = logging.getLogger(__name__)

__all__ = ["FusedTaps", "calibration_uncertainties", "fuse_taps", "tap_output_name"]

CHECK_PATCHES = 2
# the folds' disagreement on each calibration case must agree between the taps' calibrations (same network, same
# cases, same masks) up to what another engine's last-digit ties move: 3e-4 on one of the demo's 40 cases
DISAGREEMENT_ATOL = 0.01
CHECK_RTOL = 1e-5  # the fused graph's distances against each tap bundle's own (onnxruntime, same patches)


@dataclass(frozen=True)
class FusedTaps:
    path: Path
    calibration: Calibration
    max_rel_error: float  # of every tap's patch distance against its own bundle's, on random patches


def tap_output_name(i: int) -> str:
    """The graph output of further tap ``i`` (1, 2, ...): its patch distance."""
    return f"{Output.DISTANCE.value}_tap{i}"


def calibration_uncertainties(calibration: Calibration) -> np.ndarray:
    """The U of each calibration case as the bundle deploys it, from its manifest alone (the scores its own
    threshold was set on): the normalised distance, combined with the folds' disagreement where it is fused."""
    fusion = calibration.fusion
    if fusion is not None and len(fusion.calibration_disagreements) != len(calibration.calibration_scores):
        raise BundleError("the calibration's disagreements and scores differ in number; re-run ood-calib")
    out = []
    for i, score in enumerate(calibration.calibration_scores):
        u = normalise_score(score, train_min=calibration.train_score_min, train_max=calibration.train_score_max)
        agreement = None if fusion is None else 1.0 - fusion.calibration_disagreements[i]
        out.append(calibration.combined_uncertainty(u, agreement))
    return np.asarray(out, dtype=np.float64)


def _onto_scale(source: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """``(offset, scale)`` of the affine map sending ``source``'s median and 95th percentile to ``target``'s."""
    s_mid, s_hi = float(np.median(source)), float(np.quantile(source, 0.95))
    t_mid, t_hi = float(np.median(target)), float(np.quantile(target, 0.95))
    if not s_hi > s_mid:
        raise CalibrationError("a tap's calibration U has no spread (median = 95th percentile); it cannot be "
                               "mapped onto the first tap's scale")
    scale = (t_hi - t_mid) / (s_hi - s_mid)
    return t_mid - scale * s_mid, scale


def _check_compatible(first: Manifest, other: Manifest, name: str) -> None:
    """Refuse taps that are not the same network calibrated on the same cases by the same rule."""
    for manifest, label in ((first, "the first bundle"), (other, name)):
        if manifest.calibration is None:
            raise BundleError(f"{label} is not calibrated: fuse calibrated bundles (ood-calib)")
        if manifest.quantization is not None:
            raise BundleError(f"{label} is quantised: fuse the float32 bundles, then quantise")
    if first.calibration.taps or other.calibration.taps:
        raise BundleError("a bundle already fuses several taps: fuse single-tap bundles")
    same = ("source", "labels", "channels", "num_classes", "patch_size", "preprocessing", "tiling", "folds",
            "regions", "regions_class_order", "inputs")
    differ = [f for f in same if getattr(first, f) != getattr(other, f)]
    if differ:
        raise BundleError(f"{name} is not the same network as the first bundle (differs in {', '.join(differ)})")
    a, b = first.calibration, other.calibration
    if first.features.layer == other.features.layer:
        raise BundleError(f"{name} taps the same layer as the first bundle ({first.features.layer})")
    for field in ("threshold_rule", "alpha", "calibration_source", "aggregation", "subject_score"):
        if getattr(a, field) != getattr(b, field):
            raise CalibrationError(f"{name} was calibrated differently ({field}: {getattr(b, field)!r} vs "
                                   f"{getattr(a, field)!r}); calibrate every tap with the same options and "
                                   "--calibration-images")
    if len(a.calibration_scores) != len(b.calibration_scores) or (a.fusion is None) != (b.fusion is None):
        raise CalibrationError(f"{name} was calibrated on other cases or fuses the disagreement differently")
    if a.fusion is not None and (a.fusion.mirrored != b.fusion.mirrored
                                 or not np.allclose(a.fusion.calibration_disagreements,
                                                    b.fusion.calibration_disagreements, rtol=0,
                                                    atol=DISAGREEMENT_ATOL)):
        raise CalibrationError(f"{name}'s calibration cases are not the first bundle's (the folds' disagreement "
                               "on them differs; same network, same cases give the same masks)")


def _node_key(node: onnx.NodeProto) -> tuple:
    return (node.domain, node.op_type, tuple(node.input), tuple(node.output),
            tuple(a.SerializeToString() for a in node.attribute))


def _tap_subgraph(first: onnx.GraphProto, other: onnx.GraphProto, distance: str, i: int,
                  ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[onnx.ValueInfoProto], str]:
    """The nodes, initializers and declared types (``value_info``) of ``other`` that compute its ``distance`` and
    are not the shared network, renamed for tap ``i``, and the renamed distance tensor. A node is shared only when ``first`` holds the same
    node (type, inputs, outputs, attributes) and everything it reads is shared too."""
    first_nodes = {out: node for node in first.node for out in node.output}
    first_inits = {t.name: t.SerializeToString() for t in first.initializer}
    other_inits = {t.name: t for t in other.initializer}
    shared = {x.name for x in other.input} | {n for n, t in other_inits.items()
                                              if first_inits.get(n) == t.SerializeToString()}
    private: list[onnx.NodeProto] = []
    for node in other.node:
        twin = first_nodes.get(node.output[0]) if node.output else None
        if twin is not None and _node_key(twin) == _node_key(node) and all(not x or x in shared for x in node.input):
            shared.update(node.output)
        else:
            private.append(node)
    logits = next((o.name for o in other.output if o.name in {x.name for x in first.output}
                   and o.name != distance), None)
    if logits is None or logits not in shared:
        raise BundleError(f"tap {i}'s network is not the first bundle's graph node for node (exported separately?); "
                          "tap the first bundle's features bundle at the other layer instead (segsentry retap), "
                          "then calibrate that")
    producer = {out: node for node in private for out in node.output}
    needed: set[str] = set()
    stack = [distance]
    while stack:  # the private nodes the distance depends on
        tensor = stack.pop()
        node = producer.get(tensor)
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(x for x in node.input if x)
    nodes = [n for n in private if id(n) in needed]
    if not nodes:
        raise BundleError(f"tap {i}'s distance is computed by the shared network alone; nothing to fuse")

    def rename(name: str) -> str:
        if name == distance:
            return tap_output_name(i)
        return (HEAD_SCOPE + f"tap{i}/" + name[len(HEAD_SCOPE):] if name.startswith(HEAD_SCOPE)
                else f"tap{i}/{name}")

    private_names = {out for n in nodes for out in n.output}
    inits = []
    for n in nodes:
        for x in n.input:
            if x in other_inits and x not in shared and x not in private_names:
                private_names.add(x)
                tensor = onnx.TensorProto()
                tensor.CopyFrom(other_inits[x])
                tensor.name = rename(x)
                inits.append(tensor)
    renamed = {rename(p) for p in private_names}
    copied = []
    for n in nodes:
        node = onnx.NodeProto()
        node.CopyFrom(n)
        node.input[:] = [rename(x) if x in private_names else x for x in n.input]
        node.output[:] = [rename(x) for x in n.output]
        node.name = rename(n.name) if n.name else ""
        unknown = [x for x in node.input if x and x not in shared and x not in renamed]
        if unknown:
            raise BundleError(f"tap {i} reads {unknown} which the first bundle's network does not compute")
        copied.append(node)
    values = []
    for declared in other.value_info:  # the tap's features keep their type: its head can be extracted alone
        if declared.name in private_names and declared.name != distance:
            value = onnx.ValueInfoProto()
            value.CopyFrom(declared)
            value.name = rename(declared.name)
            values.append(value)
    return copied, inits, values, tap_output_name(i)


def fuse_taps(first: str | Path, others: Sequence[str | Path], output: str | Path) -> FusedTaps:
    """Write ``output``: the bundle ``first`` with the feature taps of ``others`` (the same network, each
    calibrated on its own layer with the same options and calibration cases) fused into its U (module
    docstring). The inputs are left as they are."""
    if not others:
        raise CalibrationError("fuse-taps needs the first bundle and at least one more")
    paths = [Path(first), *(Path(p) for p in others)]
    if Path(output).resolve() in {p.resolve() for p in paths}:
        raise CalibrationError("the output must not overwrite an input bundle; choose another -o")
    data = [p.read_bytes() for p in paths]
    manifests = [read_manifest(d) for d in data]
    base = manifests[0]
    for path, manifest in zip(paths[1:], manifests[1:]):
        _check_compatible(base, manifest, str(path))
    model = onnx.load_model_from_string(data[0])
    if base.output_name(Output.DISTANCE) not in GraphIndex(model.graph).outputs:
        raise BundleError(f"{paths[0]} has no distance output")
    first_u = calibration_uncertainties(base.calibration)
    taps: list[TapScore] = []
    fused_u = [first_u]
    for i, (path, blob, manifest) in enumerate(zip(paths[1:], data[1:], manifests[1:]), start=1):
        other = onnx.load_model_from_string(blob)
        nodes, inits, values, out = _tap_subgraph(model.graph, other.graph, manifest.output_name(Output.DISTANCE),
                                                  i)
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(inits)
        model.graph.value_info.extend(values)
        declared = next(o for o in other.graph.output if o.name == manifest.output_name(Output.DISTANCE))
        value = onnx.ValueInfoProto()
        value.CopyFrom(declared)
        value.name = out
        model.graph.output.append(value)
        tap_u = calibration_uncertainties(manifest.calibration)
        offset, scale = _onto_scale(tap_u, first_u)
        taps.append(TapScore(features=manifest.features, output=out, calibration=manifest.calibration,
                             offset=offset, scale=scale))
        fused_u.append(offset + scale * tap_u)
        log.info("tap %d: %s (%s), U mapped as %.4g + %.4g x U", i, manifest.features.layer, path, offset, scale)
    combined = np.mean(fused_u, axis=0)
    calibration = base.calibration
    if calibration.threshold_rule == ThresholdRule.CONFORMAL.value:
        threshold, bound = conformal_threshold(combined, alpha=float(calibration.alpha))
    else:
        threshold, bound = tpr95_threshold(combined), None
    calibration = dataclasses.replace(calibration, taps=taps, threshold=float(threshold), false_alarm_bound=bound)
    check_model(model, types=True, message="the fused-tap graph does not validate")
    blob = write_manifest(model, base.replace(calibration=calibration))
    error = _check_distances(blob, data, manifests)
    write_bytes_atomic(output, blob)
    return FusedTaps(path=Path(output), calibration=calibration, max_rel_error=error)


def _check_distances(fused: bytes, sources: Sequence[bytes], manifests: Sequence[Manifest]) -> float:
    """Run random patches through the fused bundle and every source: the logits must equal the first's and each
    tap's distance its own bundle's (:data:`CHECK_RTOL`)."""
    from segsentry.runtime.backends import create_backend

    manifest = manifests[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((CHECK_PATCHES, manifest.num_channels, *manifest.patch_size)).astype(np.float32)
    options = {"channels": manifest.num_channels, "patch_size": manifest.patch_size}
    with create_backend("onnxruntime", fused, **options) as engine:
        got = engine.run(x)
    worst = 0.0
    logits = manifest.output_name(Output.LOGITS)
    for i, source in enumerate(sources):
        with create_backend("onnxruntime", source, **options) as engine:
            want = engine.run(x)
        if i == 0 and not np.allclose(got[logits], want[logits], rtol=0, atol=1e-5):
            raise CalibrationError("the fused-tap bundle's logits differ from the first bundle's")
        name = manifest.output_name(Output.DISTANCE) if i == 0 else tap_output_name(i)
        reference = np.asarray(want[manifests[i].output_name(Output.DISTANCE)], dtype=np.float64)
        error = float(np.max(np.abs(np.asarray(got[name], dtype=np.float64) - reference) / np.abs(reference)))
        if not error <= CHECK_RTOL:
            raise CalibrationError(f"tap {i}'s distance in the fused graph differs from its own bundle's "
                                   f"(max relative error {error:.3g})")
        worst = max(worst, error)
    return worst
