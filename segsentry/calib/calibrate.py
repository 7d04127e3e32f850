"""``ood-calib``: fit the Gaussian on training patches and fold the Mahalanobis head into the graph.

The training cases go through the runtime's own preprocessing and sliding-window core (no torch): one
feature vector per patch (no mirroring), streamed to disk. After the fit, every training patch's squared
distance is spread over its patch exactly as at inference, giving each case's raw subject score; these fix
the min / 2·max normalisation and the 95 % TPR threshold recorded in the manifest.

A fold ensemble gets one Gaussian per fold, fitted on that fold's features, each folded into the graph; the
patch distance is the mean of the folds' squared distances (a ``Mean`` node in the graph). Everything
downstream is the single-network procedure on that distance: the voxel map, the subject score
``u = mean over folds of u_fold`` (the map is linear in the distance), one min / 2·max normalisation, and the
threshold rule on the combined calibration scores. The folds' squared distances share their scale (same
``D``, each whitened by its own fit), so the raw mean weighs them alike.

``ensemble_score="fused"`` adds the folds' disagreement to an ensemble's U (Zenk et al., MedIA 2025: the
mean pairwise Dice of an ensemble's members is the strongest failure detector they compared). The
calibration cases run as ``ood-run`` deploys them (logits, mirrored over the bundle's axes); their
disagreement ``1 - a`` is mapped onto the distance U's scale by matching median and 95th percentile
(:func:`fit_fusion`), U becomes the mean of the two, and the threshold rule runs on those combined values.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from segsentry._atomic import write_bytes_atomic
from segsentry.calib.gaussian import (
    ESTIMATORS,
    FeatureStore,
    GaussianFit,
    fit_gaussian,
    normalise_features,
    squared_mahalanobis,
)
from segsentry.calib.head import fold_ensemble_head, fold_mahalanobis_head
from segsentry.contract import EnsembleScore, FeatureNorm, Output, SubjectScore, ThresholdRule, choice
from segsentry.errors import BundleError, CalibrationError, SegsentryError
from segsentry.manifest import Calibration, DisagreementFusion, Manifest, write_manifest
from segsentry.runtime.backends import BackendOptions, create_backend
from segsentry.runtime.bundle import load_bundle
from segsentry.runtime.backends.base import Backend
from segsentry.runtime.guard import ContentStats, content_stats, input_range
from segsentry.runtime.io import CaseInput, case_orientation, collect_cases, label_map_reason, read_case
from segsentry.runtime.pipeline import VolumeInference, fold_agreement_of, infer_volume
from segsentry.runtime.preprocess import preprocess
from segsentry.runtime.scoring import (
    check_alpha,
    conformal_threshold,
    min_calibration_cases,
    normalise_score,
    tpr95_threshold,
)
from segsentry.runtime.scoring import subject_score as case_score
from segsentry.runtime.sliding import AGGREGATIONS, Box, crop_box, distance_map, importance_for

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.05


@dataclass(frozen=True)
class _CasePatches:
    case_id: str
    rows: slice  # rows of this case in the feature store
    boxes: list[Box]
    pad_box: Box
    padded_shape: tuple[int, ...]


@dataclass(frozen=True)
class CalibrationResult:
    path: Path
    calibration: Calibration
    fit: GaussianFit
    case_ids: list[str]
    failed: dict[str, str]
    head_check_max_rel_error: float
    fits: list[GaussianFit] = field(default_factory=list)  # one per fold of an ensemble ([fit] otherwise)


def calibrate(
    features_bundle: str | Path,
    images: Sequence[str | Path],
    output: str | Path,
    *,
    estimator: str = "ledoit-wolf",
    aggregation: str = "normalised",
    keep_features: bool = False,
    backend: str = "auto",
    batch_size: int = 1,
    threads: int | None = None,
    workdir: str | Path | None = None,
    score_folds: int = 5,
    feature_norm: FeatureNorm | str = FeatureNorm.NONE,
    threshold_rule: ThresholdRule | str = ThresholdRule.CONFORMAL,
    alpha: float = DEFAULT_ALPHA,
    calibration_images: Sequence[str | Path] | None = None,
    ensemble_score: EnsembleScore | str | None = None,
    subject_score: SubjectScore | str = SubjectScore.MEAN,
    on_case: Callable[[str, int, str | None], None] | None = None,
) -> CalibrationResult:
    """Calibrate ``features_bundle`` (from ood-export) on the training ``images`` and write ``output``.

    The deployed Gaussian is always fitted on every training patch. The training cases' subject scores,
    which set the normalisation range and the threshold, are computed out of sample when
    ``score_folds >= 2``: cases are split into that many folds and each fold is scored by a Gaussian fitted on
    the other folds. ``score_folds=1`` scores the training cases with the Gaussian fitted on them (the
    authors' procedure); with fewer patches than features that makes every unseen case look far away.

    The threshold on U comes from calibration scores: the subject scores of ``calibration_images`` (cases the
    Gaussian never saw; no labels needed) if given, else the cross-fitted training scores (in-sample scores
    are refused for ``conformal``: they are not exchangeable with new cases). ``threshold_rule`` ``conformal``
    takes the ``ceil((n + 1)(1 - alpha))``-th smallest; with fewer than ``1/alpha - 1`` cases it warns and
    records the weaker bound ``1/(n + 1)`` it can give. ``paper`` is the authors' 95 % TPR boundary.

    ``ensemble_score`` ``fused`` (fold ensembles, with ``calibration_images``) makes U the mean of the distance
    U and the folds' disagreement mapped onto its scale (module docstring); ``distance`` keeps the distance alone;
    ``None`` (default) is ``fused`` for an ensemble calibrated with ``calibration_images`` (it won on the phantom
    benchmark, ``benchmarks/results/phantom_ood_2folds``), else ``distance``.

    ``subject_score`` (:class:`~segsentry.contract.SubjectScore`) is how each case's patch distances become
    its raw score, for the training, calibration and deployed cases alike: ``mean`` (the paper's mean of the
    voxel map), ``patch-min`` or ``lower-half``.

    ``on_case(case_id, n_patches, error)`` is called after each training and calibration case (for progress
    display).
    """
    threshold_rule = choice(ThresholdRule, threshold_rule, what="threshold rule", error=CalibrationError)
    if ensemble_score is not None:
        ensemble_score = choice(EnsembleScore, ensemble_score, what="ensemble score", error=CalibrationError)
    feature_norm = choice(FeatureNorm, feature_norm, what="feature normalisation", error=CalibrationError)
    subject_score = choice(SubjectScore, subject_score, what="subject score", error=CalibrationError)
    check_alpha(alpha)
    if estimator not in ESTIMATORS:
        raise CalibrationError(f"unknown estimator '{estimator}'; choose one of {', '.join(ESTIMATORS)}")
    if score_folds < 1:
        raise CalibrationError(f"score_folds must be >= 1 (1 = in-sample scores), got {score_folds}")
    if aggregation not in AGGREGATIONS:
        raise CalibrationError(f"unknown aggregation '{aggregation}'; choose one of {', '.join(AGGREGATIONS)}")
    bundle = load_bundle(features_bundle)
    manifest = bundle.manifest
    if manifest.calibration is not None:
        raise BundleError(f"{features_bundle} is already calibrated; pass the .features.onnx from ood-export")
    if Path(output).resolve() == Path(features_bundle).resolve():
        raise CalibrationError("the output must not overwrite the input bundle; choose another -o")
    if ensemble_score is None:  # the default: fused where it can be calibrated
        ensemble_score = (EnsembleScore.FUSED if manifest.n_folds > 1 and calibration_images
                          else EnsembleScore.DISTANCE)
    fused = ensemble_score is EnsembleScore.FUSED
    if fused and manifest.n_folds < 2:
        raise CalibrationError("--ensemble-score fused needs a fold ensemble (ood-export --folds 0 1 2 ...); this "
                               "bundle holds one network, which has no fold disagreement")
    if fused and not calibration_images:
        raise CalibrationError("--ensemble-score fused needs --calibration-images: the folds disagree less on their "
                               "own training cases than on new scans, so the disagreement is calibrated on unseen ones")
    cases = collect_cases(images, num_channels=manifest.num_channels)
    if not cases:
        raise CalibrationError("no training cases found")
    _check_training_inputs(cases, manifest, threshold_rule=threshold_rule, alpha=alpha,
                           has_calibration_images=bool(calibration_images))
    train_orientation = dominant_orientation(cases)
    calibration_cases = []
    if calibration_images:
        calibration_cases = collect_cases(calibration_images, num_channels=manifest.num_channels)
        if not calibration_cases:
            raise CalibrationError("no calibration cases found in --calibration-images")
        overlap = {c.files for c in cases} & {c.files for c in calibration_cases}
        if overlap:
            raise CalibrationError(f"{len(overlap)} calibration case(s) are also training cases; the threshold "
                                   "must come from scans the Gaussian never saw")
    elif threshold_rule is ThresholdRule.CONFORMAL and _effective_folds(score_folds, len(cases)) == 1:
        raise CalibrationError("the conformal threshold needs scores the Gaussian never saw: give "
                               "--calibration-images, or score the training cases out of sample (--score-folds "
                               ">= 2, with at least 2 cases), or choose --threshold-rule paper")

    failed: dict[str, str] = {}
    patches: list[_CasePatches] = []
    n_folds = manifest.n_folds
    with ExitStack() as stack:
        stores = [stack.enter_context(FeatureStore(directory=workdir)) for _ in range(n_folds)]
        engine = stack.enter_context(create_backend(
            backend, bundle.model_bytes, channels=manifest.num_channels,
            patch_size=manifest.patch_size, options=BackendOptions(threads=threads), manifest=manifest,
        ))
        content: list[ContentStats] = []
        for case, inference in _features_per_case(cases, engine, manifest, batch_size, failed, on_case, "training",
                                                  content):
            start = stores[0].n_samples
            for store, z in zip(stores, _fold_features(inference.features, n_folds)):
                store.append(normalise_features(z, feature_norm).astype(np.float32))
            patches.append(_CasePatches(case.case_id, slice(start, stores[0].n_samples), inference.boxes,
                                        inference.pad_box, inference.padded_shape))
        if not patches:
            raise CalibrationError("every training case failed; nothing to calibrate on")
        features = [store.array() for store in stores]
        fits = [fit_gaussian(z, estimator=estimator) for z in features]
        gaussian = importance_for(manifest.patch_size, sigma_scale=manifest.tiling.sigma_scale,
                                  value_scaling_factor=manifest.tiling.value_scaling_factor)
        case_fits = [_score_fits(z, patches, fit, estimator=estimator, folds=score_folds)
                     for z, fit in zip(features, fits)]  # [fold][case]
        scores = []
        for c, case in enumerate(patches):
            d = np.mean([squared_mahalanobis(case_fits[f][c], np.asarray(features[f][case.rows], dtype=np.float64))
                         for f in range(n_folds)], axis=0)
            voxel_map = distance_map(case.padded_shape, case.boxes, d, gaussian, aggregation=aggregation)
            scores.append(case_score(crop_box(voxel_map, case.pad_box), d, rule=subject_score))
        n_patches = stores[0].n_samples
        held_out: list[float] = []
        agreements: list[float] = []
        mirror_axes = (manifest.tiling.mirror_axes or None) if fused else None
        for case, inference in _features_per_case(calibration_cases, engine, manifest, batch_size, failed,
                                                  on_case, "calibration", fold_labels=fused,
                                                  mirror_axes=mirror_axes):
            if fused:
                agreements.append(fold_agreement_of(inference, manifest))
            d = np.mean([squared_mahalanobis(fit, normalise_features(z, feature_norm))
                         for fit, z in zip(fits, _fold_features(inference.features, n_folds))], axis=0)
            voxel_map = distance_map(inference.padded_shape, inference.boxes, d, gaussian, aggregation=aggregation)
            held_out.append(case_score(crop_box(voxel_map, inference.pad_box), d, rule=subject_score))
    fit = fits[0]

    train_min, train_max = float(min(scores)), float(max(scores))
    if not 2 * train_max > train_min:
        raise CalibrationError(f"training scores are degenerate (min {train_min}, max {train_max})")
    uncertainties = [normalise_score(u, train_min=train_min, train_max=train_max) for u in scores]
    if calibration_cases and not held_out:
        raise CalibrationError("every calibration case failed; no scores to set the threshold from")
    source_scores = held_out if calibration_cases else scores
    source = (f"{len(held_out)} held-out calibration cases" if calibration_cases
              else f"training cases ({_score_fit_label(score_folds, len(patches))})")
    source_u = [normalise_score(u, train_min=train_min, train_max=train_max) for u in source_scores]
    fusion = fit_fusion(source_u, agreements, mirrored=mirror_axes is not None) if fused else None
    if fusion is not None:
        source_u = [fusion.combine(u, a) for u, a in zip(source_u, agreements)]
    threshold, bound = _threshold(source_u, threshold_rule, alpha)
    calibration = Calibration(
        estimator=estimator,
        shrinkage=float(fit.shrinkage),
        rank=int(fit.rank),
        n_patches=int(n_patches),
        n_cases=len(patches),
        aggregation=aggregation,
        train_score_min=train_min,
        train_score_max=train_max,
        threshold=float(threshold),
        train_scores=[float(s) for s in scores],
        train_uncertainties=[float(u) for u in uncertainties],
        score_fit=_score_fit_label(score_folds, len(patches)),
        threshold_rule=threshold_rule.value,
        alpha=float(alpha) if threshold_rule is ThresholdRule.CONFORMAL else None,
        false_alarm_bound=bound,
        calibration_source=source,
        calibration_scores=[float(s) for s in source_scores],
        input_range=input_range(content),
        feature_norm=feature_norm.value,
        train_orientation=train_orientation,
        fold_shrinkage=[float(f.shrinkage) for f in fits] if n_folds > 1 else [],
        fold_rank=[int(f.rank) for f in fits] if n_folds > 1 else [],
        fusion=fusion,
        subject_score=subject_score.value,
    )
    model = onnx.load_model_from_string(bundle.model_bytes)
    if n_folds > 1:
        fused = fold_ensemble_head(model, fits, features_output=manifest.output_name(Output.FEATURES),
                                   keep_features=keep_features, feature_norm=feature_norm)
    else:
        fused = fold_mahalanobis_head(model, fit, keep_features=keep_features, feature_norm=feature_norm)
    outputs = {Output.LOGITS.value: manifest.output_name(Output.LOGITS), Output.DISTANCE.value: "distance"}
    if keep_features:
        outputs[Output.FEATURES.value] = manifest.output_name(Output.FEATURES)
    data = write_manifest(fused, manifest.replace(calibration=calibration, outputs=outputs))
    check = _check_fused_head(data, bundle.model_bytes, fits, manifest.num_channels, manifest.patch_size,
                              feature_norm=feature_norm)
    write_bytes_atomic(output, data)
    log.info("calibrated on %d patches from %d cases (%s); threshold U > %.4f (%s, from %s)", n_patches,
             len(patches), estimator, calibration.threshold, threshold_rule.value, source)
    return CalibrationResult(path=Path(output), calibration=calibration, fit=fit,
                             case_ids=[p.case_id for p in patches], failed=failed, head_check_max_rel_error=check,
                             fits=fits)


def _fold_features(features: np.ndarray, n_folds: int) -> list[np.ndarray]:
    """Per-fold ``(n, D)`` features of a bundle's ``(n, D)`` (one network) or ``(n, folds, D)`` output."""
    if n_folds == 1:
        return [features]
    if features.ndim != 3 or features.shape[1] != n_folds:
        raise CalibrationError(f"an ensemble of {n_folds} folds should output features (n, {n_folds}, D); got "
                               f"{features.shape}")
    return [features[:, f] for f in range(n_folds)]


LABEL_MAP_PROBES = 3  # training cases read up front to catch a folder of label maps


def _check_training_inputs(cases: Sequence[CaseInput], manifest: Manifest, *, threshold_rule: ThresholdRule,
                           alpha: float, has_calibration_images: bool) -> None:
    """Refuse what would calibrate without a word into a useless bundle: fewer than 2 training cases (the
    min/2·max range and the threshold are degenerate with one) and label maps passed as images."""
    usable = [c for c in cases if not c.error]
    if len(usable) < 2:
        need = (f"the conformal threshold at alpha {alpha:g} needs at least {min_calibration_cases(alpha)} "
                "calibration cases" if threshold_rule is ThresholdRule.CONFORMAL
                else "the paper's 95 % TPR boundary needs 20 cases to mean what it says")
        raise CalibrationError(
            f"ood-calib needs at least 2 training cases, found {len(usable)} usable of {len(cases)}: with one, the "
            f"score range is degenerate and every new case would be flagged; {need}"
            + ("" if has_calibration_images else " (give them with --calibration-images, or as training cases "
               "scored out of sample)"))
    for case in usable[:LABEL_MAP_PROBES]:
        try:
            loaded = read_case(case, num_channels=manifest.num_channels)
        except SegsentryError:
            continue  # reported with the case when the training loop reaches it
        for channel, path in enumerate(case.files):
            reason = label_map_reason(loaded.image[channel])
            if reason:
                raise CalibrationError(f"training case {case.case_id} ({path}) has {reason}; pass the training "
                                       "images (nnU-Net imagesTr), not their labels (labelsTr)")


def dominant_orientation(cases: Sequence[CaseInput]) -> str | None:
    """The most common orientation code among the training cases' headers (None if none is readable)."""
    codes = Counter(code for code in map(case_orientation, cases) if code)
    return codes.most_common(1)[0][0] if codes else None


def _features_per_case(cases: Sequence[CaseInput], engine: Backend, manifest: Manifest, batch_size: int,
                       failed: dict[str, str], on_case: Callable[[str, int, str | None], None] | None,
                       what: str, stats: list[ContentStats] | None = None, *, fold_labels: bool = False,
                       mirror_axes: Sequence[int] | None = None,
                       ) -> Iterator[tuple[CaseInput, VolumeInference]]:
    """Each readable case's per-patch features (no logits, unless ``fold_labels``: then the folds' masks too,
    with the logits mirrored over ``mirror_axes`` as ood-run does); a failing case is recorded in ``failed``,
    skipped. ``stats`` collects each case's content statistics (:mod:`segsentry.runtime.guard`)."""
    for case in cases:
        try:
            loaded = read_case(case, num_channels=manifest.num_channels)
            data, _ = preprocess(loaded.image, loaded.spacing, manifest.preprocessing)
            inference = infer_volume(data, engine, manifest, batch_size=batch_size, accumulate_logits=fold_labels,
                                     collect_features=True, mirror_axes=mirror_axes)
        except SegsentryError as exc:
            failed[case.case_id] = str(exc)
            log.error("%s case %s skipped: %s", what, case.case_id, exc)
            if on_case:
                on_case(case.case_id, 0, str(exc))
            continue
        if on_case:
            on_case(case.case_id, len(inference.boxes), None)
        if stats is not None:
            stats.append(content_stats(loaded.image, loaded.spacing))
        yield case, inference


FUSION_MIN_SPREAD = 0.01  # floor of the disagreement's median-to-95th-percentile spread (one Dice point)


def fit_fusion(distance_u: Sequence[float], agreements: Sequence[float], *, mirrored: bool) -> DisagreementFusion:
    """Map the calibration cases' disagreement ``1 - a`` onto their distance U's scale: the affine map that sends
    the disagreement's median and 95th percentile to the distance U's. Needs no labels. The disagreement's spread
    is floored at :data:`FUSION_MIN_SPREAD` so that folds agreeing almost perfectly on every calibration case
    do not turn a tiny disagreement into a huge U."""
    if len(distance_u) != len(agreements) or len(agreements) < 2:
        raise CalibrationError(f"fusing the folds' disagreement needs at least 2 calibration cases with both scores; "
                               f"got {len(agreements)}")
    disagreement = 1.0 - np.asarray(agreements, dtype=np.float64)
    u = np.asarray(distance_u, dtype=np.float64)
    d_mid, d_hi = np.median(disagreement), np.quantile(disagreement, 0.95)
    u_mid, u_hi = np.median(u), np.quantile(u, 0.95)
    scale = max(u_hi - u_mid, 0.0) / max(d_hi - d_mid, FUSION_MIN_SPREAD)
    return DisagreementFusion(offset=float(u_mid - scale * d_mid), scale=float(scale),
                              calibration_disagreements=[float(x) for x in disagreement], mirrored=mirrored)


def _threshold(uncertainties: Sequence[float], rule: ThresholdRule, alpha: float) -> tuple[float, float | None]:
    """The threshold on U and, for ``conformal``, the false-alarm bound it guarantees (warned if above alpha)."""
    if rule is ThresholdRule.PAPER:
        return tpr95_threshold(uncertainties), None
    threshold, bound = conformal_threshold(uncertainties, alpha=alpha)
    if bound > alpha + 1e-12:
        log.warning("only %d calibration cases: the conformal threshold can hold false alarms at %.1f %% (1/(n+1)), "
                    "not alpha = %.1f %%; alpha needs at least %d cases", len(uncertainties), 100 * bound,
                    100 * alpha, min_calibration_cases(alpha))
    return threshold, bound


def _effective_folds(folds: int, n_cases: int) -> int:
    return min(folds, n_cases) if folds >= 2 and n_cases >= 2 else 1


def _score_fit_label(folds: int, n_cases: int) -> str:
    k = _effective_folds(folds, n_cases)
    return "in-sample" if k == 1 else f"cross-fit, {k} folds by case"


def _score_fits(features: np.ndarray, patches: Sequence[_CasePatches], full: GaussianFit, *, estimator: str,
                folds: int) -> list[GaussianFit]:
    """The Gaussian that scores each training case: ``full`` (in-sample) or one fitted without its fold."""
    k = _effective_folds(folds, len(patches))
    if k == 1:
        return [full] * len(patches)
    fold_of = [i % k for i in range(len(patches))]
    fits: dict[int, GaussianFit] = {}
    for f in range(k):
        rows = np.concatenate([np.arange(c.rows.start, c.rows.stop) for c, g in zip(patches, fold_of) if g != f])
        fits[f] = fit_gaussian(np.asarray(features[rows]), estimator=estimator)
    return [fits[g] for g in fold_of]


def _check_fused_head(fused: bytes, features_model: bytes, fits: Sequence[GaussianFit], channels: int,
                      patch_size: Sequence[int], *, feature_norm: FeatureNorm = FeatureNorm.NONE,
                      rtol: float = 1e-3) -> float:
    """Run two random patches through both graphs: the fused distance must equal numpy's on the features
    (for an ensemble, the mean over folds of each fold's distance)."""
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((2, channels, *patch_size)).astype(np.float32)
    with create_backend("onnxruntime", features_model, channels=channels, patch_size=patch_size) as a, \
            create_backend("onnxruntime", fused, channels=channels, patch_size=patch_size) as b:
        expected = np.mean([squared_mahalanobis(fit, normalise_features(z, feature_norm)) for fit, z in
                            zip(fits, _fold_features(a.run(batch)["features"], len(fits)))], axis=0)
        got = b.run(batch)["distance"].astype(np.float64)
    error = float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-12)))
    if not error <= rtol:
        raise CalibrationError(f"fused head disagrees with the numpy distance (max relative error {error:.3g})")
    return error
