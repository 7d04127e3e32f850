"""One case through the bundle: preprocess -> sliding window -> scores -> maps in the input geometry.

Every stage is a plain function; :func:`predict_case` only chains them and times each stage.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from segsentry.contract import Output
from segsentry.errors import BundleError, SegsentryError
from segsentry.manifest import Calibration, Manifest
from segsentry.runtime.agreement import disagreement_map, mean_pairwise_dice
from segsentry.runtime.backends.base import Backend
from segsentry.runtime.guard import content_reasons, content_stats
from segsentry.runtime.io import LoadedCase
from segsentry.runtime.preprocess import Geometry, preprocess, resample_to_cropped, to_input_geometry
from segsentry.runtime.scoring import normalise_score, subject_score
from segsentry.runtime.sliding import (
    Box,
    DistanceAccumulator,
    LogitAccumulator,
    average_folds,
    crop_box,
    importance_for,
    iterate_patches,
    pad_to_patch,
    tile_boxes,
)

TOP_PATCHES = 5


@dataclass(frozen=True)
class TopPatch:
    """One of the most distant patches: its index, squared distance, input voxel ranges and centre.

    ``box_zyx`` holds ``[start, stop)`` per axis of the input image's numpy array (z, y, x); ``centre_mm`` is
    the box centre in physical LPS coordinates (x, y, z), as SimpleITK reports them.
    """

    patch: int
    distance: float
    box_zyx: list[list[int]]
    centre_mm: list[float]


@dataclass
class VolumeInference:
    """Sliding-window outputs for one preprocessed volume (network axis order, unpadded).

    ``logits`` ``(k, Z, Y, X)`` float16 or None; ``distance_map`` ``(Z, Y, X)`` float32 or None;
    ``boxes`` in padded coordinates with ``pad_box`` locating the volume inside the padding;
    ``distances`` ``(n_patches,)``; ``features`` ``(n_patches, D)`` when collected (``(n_patches, folds, D)``
    for a fold ensemble). For an ensemble ``logits`` is the fold average and ``fold_labels`` ``(folds, Z, Y, X)``
    uint8/uint16 holds each fold's own argmax label. ``step_size`` the tile
    step the boxes were placed with (a fraction of the patch size). ``precision`` the one the engine ran the
    network in (its ``precision`` attribute; ``"fp32"`` for an engine without one).
    """

    logits: np.ndarray | None
    distance_map: np.ndarray | None
    boxes: list[Box]
    pad_box: Box
    padded_shape: tuple[int, ...]
    distances: np.ndarray | None
    features: np.ndarray | None
    step_size: float = 0.5
    fold_labels: np.ndarray | None = None
    precision: str = "fp32"
    # a bundle with further feature taps (``Calibration.taps``): each tap's voxel map and patch distances, in order
    tap_distance_maps: list[np.ndarray] = field(default_factory=list)
    tap_distances: list[np.ndarray] = field(default_factory=list)


def _keep_distances(values: np.ndarray, boxes: Sequence[Box], kept: list[np.ndarray],
                    acc: DistanceAccumulator | None) -> None:
    """Keep a batch's patch distances (float64, one per box) and add each to its tile of the voxel map."""
    kept.append(np.asarray(values, dtype=np.float64).reshape(-1))
    if acc is not None:
        for box, d in zip(boxes, kept[-1]):
            acc.add(box, float(d))


def check_step_size(step_size: float) -> float:
    """``step_size`` as a float in (0, 1] (nnU-Net's ``-step_size``), else a :class:`SegsentryError`."""
    value = float(step_size)
    if not 0.0 < value <= 1.0:
        raise SegsentryError(f"the tile step size is a fraction of the patch size in (0, 1] (nnU-Net's default "
                             f"0.5, TotalSegmentator's fast mode 0.8); got {step_size}")
    return value


def label_dtype(manifest: Manifest) -> type:
    return np.uint8 if max(manifest.labels.values()) < 255 else np.uint16


def logits_to_labels(logits: np.ndarray, manifest: Manifest, *, slab: int = 16) -> np.ndarray:
    """The label volume of ``(k, Z, Y, X)`` logits as nnU-Net's LabelManager converts them: argmax, or for a
    region-based bundle ``sigmoid(logits[i]) > 0.5`` (float32) writing ``regions_class_order[i]`` in order."""
    dtype = label_dtype(manifest)
    if manifest.regions_class_order is None:
        return argmax_labels(logits, dtype, slab=slab)
    out = np.zeros(logits.shape[1:], dtype=dtype)
    for z in range(0, logits.shape[1], slab):
        chunk = logits[:, z:z + slab].astype(np.float32)
        with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative logits: probability 0, as torch
            probabilities = np.float32(1) / (np.float32(1) + np.exp(-chunk))
        for i, value in enumerate(manifest.regions_class_order):
            out[z:z + slab][probabilities[i] > 0.5] = value
    return out


def infer_volume(
    data: np.ndarray,
    backend: Backend,
    manifest: Manifest,
    *,
    batch_size: int = 1,
    accumulate_logits: bool = True,
    aggregation: str | None = None,
    collect_features: bool = False,
    step_size: float | None = None,
    mirror_axes: Sequence[int] | None = None,
) -> VolumeInference:
    """Tile ``data`` ``(c, Z, Y, X)``, run the backend, accumulate what is asked for.

    ``aggregation`` (``normalised``/``paper``) turns on the distance map; it needs a ``distance`` output.
    Outputs are looked up by role (``manifest.outputs``), not by graph name. ``mirror_axes`` averages the logits
    over nnU-Net's flips (:func:`segsentry.runtime.sliding.iterate_patches`); distances and features always
    come from the un-mirrored pass, so mirroring needs logits and changes nothing else. ``step_size`` (None: the
    bundle's ``tiling.step_size``, what it was calibrated with) places the tiles as nnU-Net's ``tile_step_size`` does.
    """
    step_size = check_step_size(manifest.tiling.step_size if step_size is None else step_size)
    logits_name = manifest.output_name(Output.LOGITS) if accumulate_logits else None
    distance_name = manifest.outputs.get(Output.DISTANCE.value)
    features_name = manifest.output_name(Output.FEATURES) if collect_features else None
    if aggregation and distance_name is None:
        raise BundleError("a distance map needs a calibrated bundle (no 'distance' output); run ood-calib first")
    patch = manifest.patch_size
    padded, pad_box = pad_to_patch(data, patch)
    shape = padded.shape[1:]
    boxes = tile_boxes(shape, patch, step_size)
    gaussian = importance_for(patch, sigma_scale=manifest.tiling.sigma_scale,
                              value_scaling_factor=manifest.tiling.value_scaling_factor)
    n_folds = manifest.n_folds
    logit_accs = [LogitAccumulator(manifest.num_classes, shape, gaussian)
                  for _ in range(n_folds)] if accumulate_logits else []
    dist_acc = DistanceAccumulator(shape, gaussian, aggregation=aggregation) if aggregation else None
    tap_names = [t.output for t in manifest.calibration.taps] if aggregation and manifest.calibration else []
    tap_accs = [DistanceAccumulator(shape, gaussian, aggregation=aggregation) for _ in tap_names]
    tap_distances: list[list[np.ndarray]] = [[] for _ in tap_names]
    distances: list[np.ndarray] = []
    features: list[np.ndarray] = []
    mirror = list(mirror_axes) if mirror_axes and logits_name is not None else None
    for batch in iterate_patches(padded, backend, boxes, batch_size=batch_size, mirror_axes=mirror,
                                 mirrored=[logits_name] if mirror else ()):
        if logit_accs:
            for box, logits in zip(batch.boxes, batch.outputs[logits_name]):
                if n_folds == 1:
                    logit_accs[0].add(box, logits)
                    continue
                for acc, fold_logits in zip(logit_accs, logits):  # (folds, k, z, y, x)
                    acc.add(box, fold_logits)
        if distance_name is not None and distance_name in batch.outputs:
            _keep_distances(batch.outputs[distance_name], batch.boxes, distances, dist_acc)
        for name, acc, kept in zip(tap_names, tap_accs, tap_distances):
            if name not in batch.outputs:
                raise BundleError(f"the bundle's feature tap '{name}' is not among the engine's outputs")
            _keep_distances(batch.outputs[name], batch.boxes, kept, acc)
        if collect_features:
            features.append(np.asarray(batch.outputs[features_name], dtype=np.float32))
    logits, fold_labels = None, None
    if logit_accs:
        per_fold = [crop_box(acc.result(), pad_box) for acc in logit_accs]
        if n_folds > 1:
            fold_labels = np.stack([logits_to_labels(f, manifest) for f in per_fold])
        logits = average_folds(per_fold)
        del per_fold, logit_accs
    return VolumeInference(
        logits=logits,
        fold_labels=fold_labels,
        distance_map=crop_box(dist_acc.result(), pad_box) if dist_acc is not None else None,
        boxes=boxes,
        pad_box=pad_box,
        padded_shape=tuple(shape),
        distances=np.concatenate(distances) if distances else None,
        features=np.concatenate(features) if features else None,
        step_size=step_size,
        precision=str(getattr(backend, "precision", "fp32")),
        tap_distance_maps=[crop_box(acc.result(), pad_box) for acc in tap_accs],
        tap_distances=[np.concatenate(kept) for kept in tap_distances],
    )


@dataclass
class CasePrediction:
    """Everything ``ood-run`` writes for one case. Arrays are in the input image's numpy order (z, y, x).

    ``tiles`` are the sliding-window boxes in the padded network volume of shape ``padded_shape``.
    """

    case_id: str
    mask: np.ndarray
    uncertainty: np.ndarray | None
    score: float | None
    uncertainty_score: float | None
    ood: bool | None
    threshold: float | None
    tiles: list[Box]
    padded_shape: tuple[int, ...]
    top_patches: list[TopPatch]
    timings: dict[str, float] = field(default_factory=dict)
    ood_reasons: list[str] = field(default_factory=list)  # why the case is flagged, if it is
    step_size: float = 0.5  # the tile step the sliding window used
    mirror_axes: list[int] | None = None  # the flips the logits were averaged over (None: no mirroring)
    # A fold ensemble: mean pairwise Dice between the folds' masks (network space, foreground labels), and per
    # voxel the fraction of folds disagreeing with the ensemble's label (input geometry, float32). None otherwise.
    fold_agreement: float | None = None
    disagreement: np.ndarray | None = None
    distance_uncertainty: float | None = None  # the distance's own U (== uncertainty_score unless fused)
    tap_uncertainties: dict[str, float] = field(default_factory=dict)  # several feature taps: layer -> its U
    notes: list[str] = field(default_factory=list)  # how the case was run, where it differs from nnU-Net's default

    @property
    def n_patches(self) -> int:
        return len(self.tiles)


def box_to_input_index(box: Box, pad_box: Box, geometry: Geometry, transpose_backward: Sequence[int]) -> list[list[int]]:
    """Map a padded network-space box to ``[[start, stop), ...]`` voxel ranges of the input, numpy (z, y, x)."""
    ranges = []
    for axis, ((a, b), (p0, _)) in enumerate(zip(box, pad_box)):
        n_pre = geometry.shape_preprocessed[axis]
        n_crop = geometry.shape_after_cropping[axis]
        lo = min(max(a - p0, 0), n_pre)
        hi = min(max(b - p0, 0), n_pre)
        scale = n_crop / n_pre
        offset = geometry.bbox[axis][0]
        ranges.append([offset + int(np.floor(lo * scale)), offset + int(np.ceil(hi * scale))])
    return [ranges[i] for i in transpose_backward]


def _top_patches(inference: VolumeInference, geometry: Geometry, manifest: Manifest,
                 reference: sitk.Image) -> list[TopPatch]:
    if inference.distances is None:
        return []
    order = np.argsort(-inference.distances)[:TOP_PATCHES]
    out = []
    for i in order:
        zyx = box_to_input_index(inference.boxes[i], inference.pad_box, geometry,
                                 manifest.preprocessing.transpose_backward)
        centre_xyz = [(r[0] + r[1] - 1) / 2.0 for r in reversed(zyx)]
        out.append(TopPatch(
            patch=int(i),
            distance=float(inference.distances[i]),
            box_zyx=zyx,
            centre_mm=[float(c) for c in reference.TransformContinuousIndexToPhysicalPoint(centre_xyz)],
        ))
    return out


def argmax_labels(logits: np.ndarray, dtype: type, *, slab: int = 16) -> np.ndarray:
    """Per-voxel argmax over classes of ``(k, Z, Y, X)`` logits, slab by slab along Z (no int64 volume).

    nnU-Net labels are consecutive integers from 0, so the class index is the label value.
    """
    out = np.empty(logits.shape[1:], dtype=dtype)
    for z in range(0, logits.shape[1], slab):
        out[z:z + slab] = logits[:, z:z + slab].argmax(0)
    return out


def predict_case(
    loaded: LoadedCase, backend: Backend, manifest: Manifest, *, batch_size: int = 1, with_uncertainty_map: bool = True,
    step_size: float | None = None,
    mirroring: bool = True,
) -> CasePrediction:
    """Segment one loaded case and, if the bundle is calibrated, score it for OOD.

    ``mirroring`` (nnU-Net's default; ``--disable-tta`` turns it off) averages the logits over the bundle's
    allowed mirroring axes; the OOD score never depends on it.

    The three stages are public so that evaluation can keep what it needs in memory (the preprocessed volume
    for TTA and MC dropout, the network-space logits for the output baselines): :func:`preprocess`,
    :func:`infer_volume`, :func:`finish_case`. ``step_size``: see :func:`infer_volume` (U is calibrated at the
    bundle's own step size only).
    """
    t0 = time.perf_counter()
    data, geometry = preprocess(loaded.image, loaded.spacing, manifest.preprocessing)
    preprocess_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    inference = infer_volume_for_case(data, backend, manifest, batch_size=batch_size, step_size=step_size,
                                      mirroring=mirroring)
    del data
    inference_s = time.perf_counter() - t0
    return finish_case(loaded, inference, geometry, manifest, with_uncertainty_map=with_uncertainty_map,
                       timings={"preprocess": preprocess_s, "inference": inference_s}, mirroring=mirroring)


def mirroring_plan(manifest: Manifest, *, mirroring: bool = True) -> tuple[list[int] | None, list[str]]:
    """The axes a deployed case is mirrored over (``None``: none) and a note where that is not nnU-Net's default."""
    axes = manifest.tiling.mirror_axes
    if not mirroring:
        return None, ["test-time mirroring switched off (--disable-tta); nnU-Net mirrors by default"] if axes else []
    if axes is None:
        return None, ["no test-time mirroring: the bundle records no allowed mirroring axes (exported before "
                      "segsentry supported mirroring; re-export it to mirror as nnU-Net does)"]
    return (list(axes) if axes else None), []


def infer_volume_for_case(data: np.ndarray, backend: Backend, manifest: Manifest, *,
                          batch_size: int = 1, step_size: float | None = None,
                          mirroring: bool = True) -> VolumeInference:
    """:func:`infer_volume` with what a deployed case needs: logits (mirrored over the bundle's allowed axes
    unless ``mirroring=False``), and the distance map if calibrated."""
    calibration = manifest.calibration
    axes, _ = mirroring_plan(manifest, mirroring=mirroring)
    return infer_volume(data, backend, manifest, batch_size=batch_size,
                        aggregation=calibration.aggregation if calibration else None, step_size=step_size,
                        mirror_axes=axes)


@dataclass(frozen=True)
class Verdict:
    """A calibrated bundle's decision on one case: raw score u, normalised U, threshold, flag and its reasons.
    All ``None`` (and no reasons) without a calibration or a distance map. ``distance_uncertainty`` is the
    distance's own U; it equals ``uncertainty`` unless the bundle fuses the folds' disagreement into U."""

    score: float | None = None
    uncertainty: float | None = None
    threshold: float | None = None
    ood: bool | None = None
    reasons: list[str] = field(default_factory=list)
    distance_uncertainty: float | None = None
    tap_uncertainties: dict[str, float] = field(default_factory=dict)  # several taps: layer -> U on one scale


def tap_uncertainty(calibration: Calibration, distance_map: np.ndarray, distances: np.ndarray | None,
                    fold_agreement: float | None) -> tuple[float, float, float]:
    """``(u, distance U, U)`` of one feature tap by its own calibration: raw subject score, its normalised
    distance U, and that U combined with the folds' disagreement where the calibration fuses it."""
    score = subject_score(distance_map, distances, rule=calibration.subject_score)
    u_distance = normalise_score(score, train_min=calibration.train_score_min, train_max=calibration.train_score_max)
    return score, u_distance, calibration.combined_uncertainty(u_distance, fold_agreement)


def verdict(distance_map: np.ndarray | None, calibration: Calibration | None, loaded: LoadedCase, *,
            distances: np.ndarray | None = None, fold_agreement: float | None = None,
            tap_maps: Sequence[np.ndarray] = (), tap_distances: Sequence[np.ndarray | None] = (),
            first_layer: str | None = None) -> Verdict:
    """The deployed decision: ``U > threshold`` (U from the voxel map or the patch ``distances`` by the
    bundle's ``subject_score``, design.md steps 6-7; for a fused ensemble bundle averaged with the folds'
    disagreement, :meth:`Calibration.combined_uncertainty`; for a bundle with further feature taps averaged with
    each tap's U mapped onto the first's scale, ``tap_maps`` / ``tap_distances`` in ``calibration.taps`` order)
    or an input outside the training cases' content range (:mod:`segsentry.runtime.guard`, when the bundle
    records one)."""
    if calibration is None or distance_map is None:
        return Verdict()
    score, u_distance, u = tap_uncertainty(calibration, distance_map, distances, fold_agreement)
    parts = (f" (distance U {u_distance:.3f}, fold agreement {fold_agreement:.3f})"
             if calibration.fusion is not None else "")
    if calibration.taps:
        if len(tap_maps) != len(calibration.taps):
            raise BundleError(f"the bundle fuses {len(calibration.taps)} further feature tap(s) into U, but "
                              f"{len(tap_maps)} tap distance map(s) were computed")
        mapped = [tap.uncertainty(tap_uncertainty(tap.calibration, m, d, fold_agreement)[2])
                  for tap, m, d in zip(calibration.taps, tap_maps, list(tap_distances) or [None] * len(tap_maps))]
        parts = (f" (first tap U {u:.3f}; " + ", ".join(f"{tap.features.layer} U {v:.3f}"
                                                      for tap, v in zip(calibration.taps, mapped))
                 + (f"; fold agreement {fold_agreement:.3f}" if calibration.fusion is not None else "") + ")")
        layers = [tap.features.layer for tap in calibration.taps]
        tap_u = dict(zip([first_layer or "first tap", *layers], [u, *mapped]))
        u = float(np.mean([u, *mapped]))
    else:
        tap_u = {}
    reasons = [f"U {u:.3f} > threshold {calibration.threshold:.3f}{parts}"] if u > calibration.threshold else []
    if calibration.input_range is not None:
        reasons += content_reasons(content_stats(loaded.image, loaded.spacing), calibration.input_range)
    return Verdict(score=score, uncertainty=u, threshold=calibration.threshold, ood=bool(reasons), reasons=reasons,
                   distance_uncertainty=u_distance, tap_uncertainties=tap_u)


def fold_agreement_of(inference: VolumeInference, manifest: Manifest) -> float | None:
    """Mean pairwise Dice between the folds' masks (network space, foreground labels); None for one network."""
    if inference.fold_labels is None:
        return None
    return mean_pairwise_dice(inference.fold_labels, sorted(v for v in manifest.labels.values() if v > 0))


def finish_case(
    loaded: LoadedCase, inference: VolumeInference, geometry: Geometry, manifest: Manifest, *,
    with_uncertainty_map: bool = True, timings: dict[str, float] | None = None, mirroring: bool = True,
) -> CasePrediction:
    """Score ``inference`` (subject score, U, flag) and bring the mask and uncertainty map to the input geometry.

    ``timings`` (seconds per stage so far) is extended with ``scoring`` and ``resample_back``; ``mirroring`` says
    whether ``inference`` was run mirrored (as :func:`infer_volume_for_case` was asked), for the report.
    """
    timings = dict(timings or {})
    t0 = time.perf_counter()
    fold_agreement = fold_agreement_of(inference, manifest)
    decision = verdict(inference.distance_map, manifest.calibration, loaded, distances=inference.distances,
                       fold_agreement=fold_agreement, tap_maps=inference.tap_distance_maps,
                       tap_distances=inference.tap_distances, first_layer=manifest.features.layer)
    timings["scoring"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    spec = manifest.preprocessing
    logits = resample_to_cropped(inference.logits, geometry, spec)
    mask = to_input_geometry(logits_to_labels(logits, manifest), geometry, spec)
    del logits
    uncertainty = None
    if with_uncertainty_map and inference.distance_map is not None:
        cropped = resample_to_cropped(inference.distance_map[None], geometry, spec)[0]
        uncertainty = to_input_geometry(cropped.astype(np.float32, copy=False), geometry, spec)  # no extra copy
        del cropped
    timings["resample_back"] = time.perf_counter() - t0
    disagreement = None
    if inference.fold_labels is not None:
        t0 = time.perf_counter()
        ensemble = logits_to_labels(inference.logits, manifest)
        net_map = disagreement_map(inference.fold_labels, ensemble)
        cropped = resample_to_cropped(net_map[None], geometry, spec)[0]
        disagreement = np.clip(to_input_geometry(cropped.astype(np.float32), geometry, spec), 0, 1)
        timings["fold_agreement"] = time.perf_counter() - t0

    axes, notes = mirroring_plan(manifest, mirroring=mirroring)
    fusion = manifest.calibration.fusion if manifest.calibration else None
    if fusion is not None and fusion.mirrored != (axes is not None):
        notes.append(f"U's fold-disagreement part was calibrated {'with' if fusion.mirrored else 'without'} "
                     f"test-time mirroring and this case ran {'with' if axes else 'without'} it")
    if inference.precision != "fp32":
        notes.append(f"the network ran in {inference.precision}: the mask is not nnU-Net's float32 prediction, and "
                     "U's threshold was set on float32 scores")
    return CasePrediction(
        case_id=loaded.case_id,
        mask=mask,
        uncertainty=uncertainty,
        score=decision.score,
        uncertainty_score=decision.uncertainty,
        distance_uncertainty=decision.distance_uncertainty,
        tap_uncertainties=dict(decision.tap_uncertainties),
        ood=decision.ood,
        threshold=decision.threshold,
        tiles=inference.boxes,
        padded_shape=inference.padded_shape,
        top_patches=_top_patches(inference, geometry, manifest, loaded.reference),
        timings=timings,
        ood_reasons=decision.reasons,
        step_size=inference.step_size,
        fold_agreement=fold_agreement,
        disagreement=disagreement,
        mirror_axes=axes,
        notes=notes,
    )
