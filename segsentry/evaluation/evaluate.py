"""``ood-eval``: run a bundle on an in-distribution set and named OOD sets, compare OOD scores as in the paper.

Each case is read once, preprocessed once and run once through the runtime's sliding window
(:func:`~segsentry.runtime.pipeline.infer_volume_for_case`, the core ``ood-run`` uses); everything else is
computed from the arrays in memory. :func:`~segsentry.runtime.pipeline.finish_case` gives the Mahalanobis U and
the mask in the input geometry (Dice against the label file); the output baselines
(:func:`~segsentry.evaluation.baselines.output_baselines`: max softmax at T = 1, 10, 100 — the lowest-ESCE T is
reported, as the paper does —, KL from uniform, energy) come from the same network-space logits. The sample-based
baselines rerun the same core on the same preprocessed volume: TTA (``tta=True``: the 7 other flip combinations,
the unflipped prediction is the case's own) and MC dropout (``mc_dropout=True``: the bundle with test-time
dropout after the encoder stages, :mod:`.mc_dropout`, 10 passes on onnxruntime); both score a case by the voxel
mean of the standard deviation of the foreground probability.

Per OOD scenario, one table in the paper's layout: methods × ESCE, detection error, FPR and AUC. The detection
threshold of every method is the 95 % TPR boundary of its scores on the in-distribution test set (the authors'
rule), so methods are compared at the same TPR. ESCE needs Dice, i.e. labels; energy is not a [0, 1]
uncertainty, so it has no ESCE. ``layers={NAME: BUNDLE}`` adds the feature-layer ablation (paper Table 11):
other calibrated bundles of the same network (and so the same preprocessing), tapped at other layers, run on
the same preprocessed volumes. The report (:mod:`.render`) also draws every method's score distribution per set
(paper Fig. 8: name sets ``kind-weak``, ``kind-medium``, ``kind-strong`` to see the levels side by side).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import SimpleITK as sitk

from segsentry._atomic import write_text_atomic
from segsentry.errors import SegsentryError
from segsentry.evaluation.baselines import output_baselines
from segsentry.evaluation.mc_dropout import add_mc_dropout
from segsentry.evaluation.metrics import (
    EvaluationError,
    auc,
    aurc,
    bootstrap_interval,
    detection_error,
    detection_summary,
    dice,
    e_aurc,
    esce,
    fpr_at_threshold,
    risk_coverage,
    temperature_scaling_search,
    tpr95_threshold,
    tpr_at_threshold,
    wilson_interval,
)
from segsentry.evaluation.render import MethodDistribution, ReportView, ScenarioView, report_html, report_markdown
from segsentry.manifest import Manifest
from segsentry.runtime.backends import BackendOptions, create_backend, resolve_backend_name
from segsentry.runtime.backends.base import Backend
from segsentry.runtime.bundle import Bundle, load_bundle
from segsentry.runtime.io import CaseInput, LoadedCase, collect_cases, read_case
from segsentry.runtime.pipeline import finish_case, infer_volume, infer_volume_for_case, verdict
from segsentry.runtime.preprocess import preprocess

METHODS = ("mahalanobis", "max_softmax", "kl_uniform", "energy")
# optional sample-based baselines; a fold ensemble's members are samples too (Zenk et al.'s deep ensemble)
SAMPLED = {"tta": "TTA (8 flips)", "mc_dropout": "MC dropout", "fold_disagreement": "fold disagreement"}
MC_PASSES = 10
MC_P = 0.5
FLIPS = [c for r in range(4) for c in itertools.combinations((1, 2, 3), r)]  # spatial axes of (c, Z, Y, X)


BOOTSTRAP_RESAMPLES = 1000  # per interval; percentile bootstrap, each set of cases resampled on its own


@dataclass
class CaseResult:
    case_id: str
    group: str  # "id" or the OOD set's name
    scores: dict[str, float]  # method -> uncertainty (energy: raw)
    dice: float | None
    flags: dict[str, bool] = field(default_factory=dict)  # score key -> that bundle's own deployed verdict

    @property
    def flagged(self) -> bool | None:
        """The main bundle's deployed verdict (its threshold and input guard)."""
        return self.flags.get("mahalanobis")


@dataclass(frozen=True)
class Engines:
    """What an evaluation runs a case on: the main bundle's engine, one engine per layer-ablation bundle
    (name -> its manifest and engine) and the optional MC dropout engine. ``tta`` reuses ``main``."""

    main: Backend
    layers: Mapping[str, tuple[Manifest, Backend]]
    tta: bool = False
    mc_dropout: Backend | None = None
    mc_passes: int = MC_PASSES


def _images_and_labels(folder: Path) -> tuple[Path, Path | None]:
    """nnU-Net raw layout (imagesTr/ + labelsTr/) or a plain folder of images (no labels)."""
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if (folder / images).is_dir():
            return folder / images, (folder / labels) if (folder / labels).is_dir() else None
    if not folder.is_dir():
        raise EvaluationError(f"evaluation set {folder} is not a folder")
    return folder, None


def _softmax_background(logits: np.ndarray) -> np.ndarray:
    """P(background) per voxel, float64 (the std of the next step is often ~1e-6: float32 would not resolve it)."""
    x = logits.astype(np.float64)
    x -= x.max(0, keepdims=True)
    np.exp(x, out=x)
    return x[0] / x.sum(0)


def _foreground_std(logit_maps: Iterable[np.ndarray]) -> float:
    """Voxel mean of the standard deviation (over the predictions) of the foreground probability 1 - P(bg).

    Streamed in float64 and shifted by the first prediction (``var = E[(p - p0)^2] - E[p - p0]^2``), so the
    tiny spreads of a confident network do not cancel away."""
    first = total = total_sq = None
    count = 0
    for logits in logit_maps:
        fg = 1.0 - _softmax_background(logits)
        if first is None:
            first, total, total_sq = fg, np.zeros_like(fg), np.zeros_like(fg)
        d = fg - first
        total += d
        total_sq += d * d
        count += 1
    mean = total / count
    return float(np.mean(np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))))


def tta_std(data: np.ndarray, engine: Backend, manifest: Manifest, *, logits: np.ndarray | None = None) -> float:
    """TTA baseline of a preprocessed volume ``data`` ``(c, Z, Y, X)``: the 8 flip combinations through the sliding
    window, the voxel mean of the standard deviation of the foreground probability (1 - P(background)).

    ``logits`` ``(k, Z, Y, X)``: the unflipped prediction when it is already at hand (it is not run again).
    """
    def predictions() -> Iterator[np.ndarray]:
        for axes in FLIPS:
            if not axes:
                yield logits if logits is not None else infer_volume(data, engine, manifest).logits
                continue
            flipped = infer_volume(np.ascontiguousarray(np.flip(data, axes)), engine, manifest).logits
            yield np.flip(flipped, axes)

    return _foreground_std(predictions())


def mc_dropout_std(data: np.ndarray, engine: Backend, manifest: Manifest, *, passes: int = MC_PASSES) -> float:
    """MC dropout baseline of a preprocessed volume ``data`` ``(c, Z, Y, X)``: ``passes`` sliding-window runs of
    the dropout variant (``engine`` built from :func:`~segsentry.evaluation.mc_dropout.add_mc_dropout`), each
    patch with fresh masks; the voxel mean of the standard deviation of the foreground probability."""
    if passes < 2:
        raise EvaluationError(f"MC dropout needs at least 2 passes; got {passes}")
    return _foreground_std(infer_volume(data, engine, manifest).logits for _ in range(passes))


def _preprocessed(files: Sequence[Path], bundle: Bundle) -> np.ndarray:
    m = bundle.manifest
    loaded = read_case(CaseInput("sampled", tuple(files)), num_channels=m.num_channels)
    data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
    return data


def tta_uncertainty(files: Sequence[Path], bundle: Bundle, engine: Backend) -> float:
    """:func:`tta_std` of one case given by its image files (read and preprocessed here)."""
    return tta_std(_preprocessed(files, bundle), engine, bundle.manifest)


def mc_dropout_uncertainty(files: Sequence[Path], bundle: Bundle, engine: Backend, *,
                           passes: int = MC_PASSES) -> float:
    """:func:`mc_dropout_std` of one case given by its image files (read and preprocessed here)."""
    return mc_dropout_std(_preprocessed(files, bundle), engine, bundle.manifest, passes=passes)


def _layer_verdict(data: np.ndarray, engine: Backend, manifest: Manifest, loaded: LoadedCase, *,
                   fold_agreement: float | None = None) -> tuple[float, bool]:
    """U of an extra calibrated bundle on the main bundle's preprocessed volume (distance map only, no logits)
    and its own deployed flag, decided by the runtime's :func:`verdict` exactly as ``ood-run`` would. A fused
    variant takes the folds' agreement of the main run (same network, same mirroring: the same masks)."""
    calibration = manifest.calibration
    inference = infer_volume(data, engine, manifest, accumulate_logits=False, aggregation=calibration.aggregation)
    decision = verdict(inference.distance_map, calibration, loaded, distances=inference.distances,
                       fold_agreement=fold_agreement, tap_maps=inference.tap_distance_maps,
                       tap_distances=inference.tap_distances)
    return decision.uncertainty, bool(decision.ood)


def evaluate_case(case: CaseInput, manifest: Manifest, engines: Engines, *,
                  label: Path | None = None) -> tuple[dict[str, float], float | None, dict[str, bool]]:
    """Scores (method -> uncertainty), Dice (``None`` without ``label``) and the deployed flags (score key ->
    flag: the main bundle's and each layer bundle's own) of one case.

    The case is read, preprocessed and run through the main engine once; the baselines, the layer bundles, TTA
    and MC dropout work on those arrays. Raises :class:`~segsentry.errors.SegsentryError` for a case that
    cannot be processed.
    """
    loaded = read_case(case, num_channels=manifest.num_channels)
    data, geometry = preprocess(loaded.image, loaded.spacing, manifest.preprocessing)
    inference = infer_volume_for_case(data, engines.main, manifest)
    prediction = finish_case(loaded, inference, geometry, manifest, with_uncertainty_map=False)
    scores = {"mahalanobis": prediction.uncertainty_score, **output_baselines(inference.logits)}
    flags = {"mahalanobis": bool(prediction.ood)}
    if prediction.fold_agreement is not None:
        scores["fold_disagreement"] = 1.0 - prediction.fold_agreement
    for name, (layer_manifest, engine) in engines.layers.items():
        key = f"mahalanobis[{name}]"
        scores[key], flags[key] = _layer_verdict(data, engine, layer_manifest, loaded,
                                                 fold_agreement=prediction.fold_agreement)
    if engines.tta:
        scores["tta"] = tta_std(data, engines.main, manifest, logits=inference.logits)
    if engines.mc_dropout is not None:
        scores["mc_dropout"] = mc_dropout_std(data, engines.mc_dropout, manifest, passes=engines.mc_passes)
    case_dice = None
    if label is not None:
        case_dice = dice(prediction.mask, sitk.GetArrayFromImage(sitk.ReadImage(str(label))))
    return scores, case_dice, flags


def run_set(folder: Path, group: str, manifest: Manifest, engines: Engines) -> list[CaseResult]:
    """Every case of one evaluation set (nnU-Net raw layout or a plain folder), in :func:`collect_cases` order;
    the first case that fails raises :class:`EvaluationError` naming it and the set."""
    images, labels = _images_and_labels(folder)
    cases = []
    for case in collect_cases([images], num_channels=manifest.num_channels):
        label = next(iter(sorted(labels.glob(f"{case.case_id}.*"))), None) if labels is not None else None
        try:
            scores, case_dice, flags = evaluate_case(case, manifest, engines, label=label)
        except SegsentryError as exc:
            raise EvaluationError(f"case {case.case_id} of set '{group}' failed: {exc}") from exc
        except (MemoryError, FloatingPointError, OSError) as exc:
            raise EvaluationError(f"case {case.case_id} of set '{group}' failed: {type(exc).__name__}: {exc}") from exc
        cases.append(CaseResult(case.case_id, group, scores, case_dice, flags))
    if not cases:
        raise EvaluationError(f"evaluation set '{group}' ({folder}) holds no cases")
    return cases


def _method_scores(cases: list[CaseResult], method: str) -> np.ndarray:
    return np.array([c.scores[method] for c in cases], dtype=np.float64)


def _best_temperature(cases: list[CaseResult]) -> int:
    """Lowest-ESCE temperature for max softmax over all cases with Dice (T = 1 when there is no Dice)."""
    with_dice = [c for c in cases if c.dice is not None]
    if not with_dice:
        return 1
    best, _ = temperature_scaling_search({t: _method_scores(with_dice, f"max_softmax_T{t}") for t in (1, 10, 100)},
                                         np.array([c.dice for c in with_dice]))
    return int(best)


def _interval(statistic: Callable[..., float], *groups: np.ndarray) -> list[float] | None:
    """The 95 % percentile-bootstrap interval of ``statistic``, or ``None`` where it is undefined."""
    try:
        return list(bootstrap_interval(statistic, *groups, n_resamples=BOOTSTRAP_RESAMPLES, seed=0))
    except EvaluationError:
        return None


def _refit_fpr(ids: np.ndarray, oods: np.ndarray) -> float:
    return fpr_at_threshold(oods, tpr95_threshold(ids))


def _refit_error(ids: np.ndarray, oods: np.ndarray) -> float:
    t = tpr95_threshold(ids)
    return detection_error(tpr_at_threshold(ids, t), fpr_at_threshold(oods, t))


def scenario_table(id_cases: list[CaseResult], ood_cases: list[CaseResult]) -> list[dict]:
    """One row per method: ESCE (over ID + OOD cases with Dice), detection error, FPR, AUC, threshold.

    This is the paper's protocol: each method's threshold is re-fitted at 95 % TPR on this ID set. Every AUC, FPR
    and error has a 95 % bootstrap interval (``*_ci``), the threshold re-fitted inside each resample."""
    rows = []
    everything = id_cases + ood_cases
    t_best = _best_temperature(everything)
    methods = [*METHODS, *(m for m in SAMPLED if all(m in c.scores for c in everything))]
    with_dice = [c for c in everything if c.dice is not None]
    for method in methods:
        key = f"max_softmax_T{t_best}" if method == "max_softmax" else method
        ids, oods = _method_scores(id_cases, key), _method_scores(ood_cases, key)
        summary = detection_summary(ids, oods)
        error_esce = None
        if with_dice and method != "energy":  # over the cases with labels (a set may be partly labelled)
            error_esce = esce(_method_scores(with_dice, key), np.array([c.dice for c in with_dice]))
        rows.append({
            "method": f"max softmax (T={t_best})" if method == "max_softmax" else
            SAMPLED.get(method, method.replace("_", " ")),
            "esce": error_esce, "error": summary["detection_error"], "fpr": summary["fpr"], "auc": summary["auc"],
            "threshold": summary["threshold"], "tpr": summary["tpr"],
            "auc_ci": _interval(auc, ids, oods), "fpr_ci": _interval(_refit_fpr, ids, oods),
            "error_ci": _interval(_refit_error, ids, oods),
        })
    return rows


def deployed_table(results: Mapping[str, list[CaseResult]]) -> list[dict]:
    """Each bundle's own flag, as deployed (no threshold re-fitted): per bundle (score key) and set the fraction
    flagged OOD with its Wilson 95 % interval -- false alarms on the ID set, detections on the others."""
    rows = []
    keys = list(dict.fromkeys(k for cases in results.values() for c in cases for k in c.flags))
    for key in keys:
        for group, cases in results.items():
            flags = [c.flags[key] for c in cases if key in c.flags]
            if not flags:
                continue
            k = int(sum(flags))
            rows.append({"bundle": key, "set": group, "n": len(flags), "flagged": k, "rate": k / len(flags),
                         "rate_ci": wilson_interval(k, len(flags)),
                         "meaning": "false alarms" if group == "id" else "detected"})
    return rows


def failure_table(cases: list[CaseResult], methods: Mapping[str, str]) -> dict:
    """Failure detection (Zenk et al., MedIA 2025) over the cases with a Dice: risk = 1 - Dice, each method's
    AURC and E-AURC with 95 % bootstrap intervals (cases resampled), and the random-order AURC (the mean risk)."""
    labelled = [c for c in cases if c.dice is not None]
    if len(labelled) < 2:
        return {}
    risk = 1.0 - np.array([c.dice for c in labelled], dtype=np.float64)
    rows, curves = [], {}
    for key, label in methods.items():
        u = _method_scores(labelled, key)
        pairs = np.stack([u, risk], axis=1)
        coverage, selective = risk_coverage(u, risk)
        curves[key] = {"label": label, "coverage": coverage.tolist(), "risk": selective.tolist()}
        rows.append({"key": key, "method": label, "aurc": aurc(u, risk), "e_aurc": e_aurc(u, risk),
                     "aurc_ci": _interval(lambda p: aurc(p[:, 0], p[:, 1]), pairs),
                     "e_aurc_ci": _interval(lambda p: e_aurc(p[:, 0], p[:, 1]), pairs)})
    return {"n": len(labelled), "sets": sorted({c.group for c in labelled}), "mean_risk": float(risk.mean()),
            "random_aurc": float(risk.mean()), "oracle_aurc": aurc(risk, risk), "rows": rows, "curves": curves}


def layer_ablation_table(id_cases: list[CaseResult], scenarios: Mapping[str, list[CaseResult]],
                         layers: Mapping[str, str]) -> list[dict]:
    """Paper Table 11: per feature layer or calibration variant (score key -> label), AUC (with its bootstrap
    interval) and the re-fitted FPR (95 % TPR on ID) per scenario."""
    rows = []
    for key, label in layers.items():
        sid = _method_scores(id_cases, key)
        row = {"layer": label, "key": key}
        for name, ood_cases in scenarios.items():
            sood = _method_scores(ood_cases, key)
            summary = detection_summary(sid, sood)
            row[name] = {"auc": summary["auc"], "fpr": summary["fpr"], "auc_ci": _interval(auc, sid, sood)}
        rows.append(row)
    return rows


def _score_methods(cases: list[CaseResult]) -> dict[str, str]:
    """score key -> label for the distributions figure: every method present in all cases."""
    t_best = _best_temperature(cases)
    keys = {"mahalanobis": "Mahalanobis U", f"max_softmax_T{t_best}": f"max softmax (T={t_best})",
            "kl_uniform": "KL from uniform", "energy": "energy"}
    keys.update(SAMPLED)
    keys.update({k: k.replace("mahalanobis[", "Mahalanobis [") for k in sorted(cases[0].scores)
                 if k.startswith("mahalanobis[")})
    return {k: v for k, v in keys.items() if all(k in c.scores for c in cases)}


def _engine(bundle: Bundle, backend: str, threads: int | None) -> Backend:
    m = bundle.manifest
    return create_backend(backend, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                          options=BackendOptions(threads=threads, cache_dir=bundle.path),  # TensorRT: cache beside it
                          manifest=m)


def evaluate(
    bundle: str | Path, id_set: str | Path, ood_sets: Mapping[str, str | Path], output: str | Path, *,
    backend: str = "auto", threads: int | None = None, tta: bool = False, mc_dropout: bool = False,
    mc_passes: int = MC_PASSES, layers: Mapping[str, str | Path] | None = None,
    failure_sets: Sequence[str] | None = None,
) -> dict:
    """Run everything once, then write ``output/report.md``, ``report.html``, ``cases.csv``, ``results.json``.

    ``tta`` / ``mc_dropout`` add the sample-based baselines (7 / ``mc_passes`` extra sliding-window runs per
    case). ``layers`` maps a name to another calibrated bundle of the same network tapped at another layer
    (``ood-export --layer``, then ``ood-calib``): the report gets the feature-layer ablation table.

    Three views, each labelled as such: the paper's (thresholds re-fitted at 95 % TPR on the ID set, per
    method), the deployed one (the bundle's own flag on every set: false alarms on ID, detections elsewhere),
    and failure detection (risk-coverage, AURC, E-AURC with risk = 1 - Dice) over the labelled cases of
    ``failure_sets`` (default: every set; "id" names the ID set).
    """
    output = Path(output)
    if not ood_sets:
        raise EvaluationError("give at least one OOD set (NAME=FOLDER)")
    if "id" in ood_sets:
        raise EvaluationError("'id' is reserved for the in-distribution set; rename that OOD set")
    if mc_dropout and mc_passes < 2:
        raise EvaluationError(f"MC dropout needs at least 2 passes; got {mc_passes}")
    layers = {name: Path(path) for name, path in (layers or {}).items()}
    for name, path in layers.items():
        if not name or "[" in name or "]" in name:
            raise EvaluationError(f"layer name {name!r} must be non-empty without brackets")
        if not path.is_file():
            raise EvaluationError(f"layer bundle '{name}' ({path}) is not a file")
    main = load_bundle(bundle)
    if main.manifest.calibration is None:
        raise EvaluationError("the bundle is not calibrated (no distance output); run ood-calib first")
    layer_bundles = _same_network(main, layers)
    m = main.manifest
    mc_variant = (add_mc_dropout(onnx.load_from_string(main.model_bytes), p=MC_P).SerializeToString()
                  if mc_dropout else None)
    backend = resolve_backend_name(backend)

    sets = {"id": Path(id_set), **{name: Path(folder) for name, folder in ood_sets.items()}}
    results: dict[str, list[CaseResult]] = {}
    with ExitStack() as stack:  # one engine per bundle for the whole evaluation
        engine = stack.enter_context(_engine(main, backend, threads))
        layer_engines = {name: (b.manifest, stack.enter_context(_engine(b, backend, threads)))
                         for name, b in layer_bundles.items()}
        for group, folder in sets.items():
            # a fresh MC dropout engine per set: every set draws the same dropout masks from the same seeds; it
            # runs on onnxruntime (its random ops are standard ONNX, not every engine implements them)
            with (create_backend("onnxruntime", mc_variant, channels=m.num_channels, patch_size=m.patch_size,
                                 options=BackendOptions(threads=threads)) if mc_variant is not None else nullcontext()) as mc_engine:
                engines = Engines(main=engine, layers=layer_engines, tta=tta, mc_dropout=mc_engine,
                                  mc_passes=mc_passes)
                results[group] = run_set(folder, group, m, engines)

    pool = list(sets) if failure_sets is None else list(failure_sets)
    unknown = [g for g in pool if g not in sets]
    if unknown:
        raise EvaluationError(f"failure_sets names unknown sets {unknown}; the sets are {list(sets)}")
    result, view = _summarise(main, layer_bundles, results, bundle=bundle, id_set=id_set, ood_sets=ood_sets,
                             tta=tta, mc_dropout=mc_dropout, mc_passes=mc_passes, failure_sets=pool)
    write_text_atomic(output / "results.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(output / "cases.csv", _cases_csv([c for cases in results.values() for c in cases]))
    write_text_atomic(output / "report.md", report_markdown(view))
    write_text_atomic(output / "report.html", report_html(view))
    return result


def _summarise(main: Bundle, layer_bundles: Mapping[str, Bundle], results: Mapping[str, list[CaseResult]], *,
              bundle: str | Path, id_set: str | Path, ood_sets: Mapping[str, str | Path], tta: bool,
              mc_dropout: bool, mc_passes: int, failure_sets: Sequence[str]) -> tuple[dict, ReportView]:
    """``results.json``'s content and the report's view from the per-set case results (``"id"`` first)."""
    id_cases = results["id"]
    all_cases = [c for cases in results.values() for c in cases]
    groups = list(results)
    scenarios = {name: scenario_table(id_cases, results[name]) for name in ood_sets}
    mean_dice = {g: _mean_dice(results[g]) for g in groups}
    spec = main.manifest.features
    layer_keys = {"mahalanobis": f"{spec.layer} (D={spec.dim})"}
    for name, layer_bundle in layer_bundles.items():
        spec = layer_bundle.manifest.features
        layer_keys[f"mahalanobis[{name}]"] = f"{name}: {spec.layer} (D={spec.dim})"
    ablation = (layer_ablation_table(id_cases, {name: results[name] for name in ood_sets}, layer_keys)
                if layer_bundles else None)
    methods = _score_methods(all_cases)
    distributions = {key: {g: _summary([c.scores[key] for c in results[g]]) for g in groups} for key in methods}
    deployed = deployed_table(results)
    failure = failure_table([c for g in failure_sets for c in results[g]], methods)
    calibration = main.manifest.calibration
    result = {
        "bundle": str(bundle), "id_set": str(id_set), "ood_sets": {k: str(v) for k, v in ood_sets.items()},
        "scenarios": scenarios,
        "mean_dice": mean_dice,
        "distributions": distributions,
        "sampled_baselines": {"tta": tta, "mc_dropout": {"passes": mc_passes, "p": MC_P} if mc_dropout else None},
        "deployed": {"threshold": calibration.threshold, "threshold_rule": calibration.threshold_rule,
                     "alpha": calibration.alpha, "false_alarm_bound": calibration.false_alarm_bound,
                     "feature_norm": calibration.feature_norm, "sets": deployed},
        "failure_detection": {k: v for k, v in failure.items() if k != "curves"},
        "risk_coverage": failure.get("curves", {}),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "level": 0.95, "method": "percentile, each set resampled "
                      "on its own; flag rates: Wilson score interval"},
    }
    if ablation is not None:
        result["layer_ablation"] = ablation
    view = ReportView(
        bundle_name=Path(bundle).name,
        groups=groups,
        scenarios=[ScenarioView(
            name=name, rows=rows, n_id=len(id_cases), n_ood=len(results[name]), mean_dice_id=mean_dice["id"],
            mean_dice_ood=mean_dice[name],
            points=[(c.scores["mahalanobis"], c.dice, c.group == "id") for c in id_cases + results[name]
                    if c.dice is not None],
            threshold=next(r["threshold"] for r in rows if r["method"] == "mahalanobis"),
        ) for name, rows in scenarios.items()],
        ablation=ablation,
        distributions=[MethodDistribution(
            key=key, label=label, values=[(g, _method_scores(results[g], key)) for g in groups],
            summaries=distributions[key], threshold=tpr95_threshold(_method_scores(id_cases, key)),
        ) for key, label in methods.items()],
        mc_dropout=(MC_P, mc_passes) if mc_dropout else None,
        deployed=deployed,
        deployed_rule=_rule_text(calibration),
        failure=failure,
    )
    return result, view


def _rule_text(c) -> str:  # noqa: ANN001 - manifest.Calibration
    if c.threshold_rule == "conformal":
        return (f"U > {c.threshold:.4f}, split-conformal at alpha = {c.alpha:g} (guaranteed false-alarm bound "
                f"{100 * c.false_alarm_bound:.1f} %), set on {c.calibration_source}")
    return f"U > {c.threshold:.4f}, the paper's 95 % TPR rule on {c.calibration_source}"


def _same_network(main: Bundle, layers: Mapping[str, Path]) -> dict[str, Bundle]:
    """The layer-ablation bundles, checked to be the same network and pipeline as ``main`` (tapped elsewhere)
    and calibrated. Their mirroring need not match: a layer bundle's distance comes from the un-mirrored pass
    (:func:`_layer_verdict` runs no logits) -- unless its U is fused, as it then takes the main run's masks."""
    def fields(m: Manifest, *, masks: bool) -> dict:
        source = {k: v for k, v in m.source.items() if k != "model_dir"}  # the folder may have moved
        return {"source": source, "labels": m.labels, "channels": m.channels, "patch_size": m.patch_size,
                "preprocessing": m.preprocessing,
                "tiling": m.tiling if masks else replace(m.tiling, mirror_axes=None)}

    bundles = {}
    for name, path in layers.items():
        layer_bundle = load_bundle(path)
        manifest = layer_bundle.manifest
        masks = manifest.calibration is not None and manifest.calibration.fusion is not None
        expected, found = fields(main.manifest, masks=masks), fields(manifest, masks=masks)
        for what in expected:
            if found[what] != expected[what]:
                raise EvaluationError(
                    f"layer bundle '{name}' ({path}) differs from {main.path.name} in its {what}: the ablation "
                    "compares feature layers of one network; export the same model folder with --layer and "
                    "calibrate it")
        if manifest.calibration is None:
            raise EvaluationError(f"layer bundle '{name}' ({path}) is not calibrated; run ood-calib on it first")
        bundles[name] = layer_bundle
    return bundles


def _summary(values: Sequence[float]) -> dict[str, float]:
    q1, median, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "n": len(values)}


def _mean_dice(cases: list[CaseResult]) -> float | None:
    values = [c.dice for c in cases if c.dice is not None]
    return float(np.mean(values)) if values else None


def _cases_csv(cases: list[CaseResult]) -> str:
    """``cases.csv``: one row per case and set, every score key as a column (sorted)."""
    keys = sorted({k for c in cases for k in c.scores})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    flag_keys = list(dict.fromkeys(k for c in cases for k in c.flags))
    writer.writerow(["case", "group", "dice", *[f"flagged{k.removeprefix('mahalanobis')}" for k in flag_keys],
                     *keys])
    for c in cases:
        writer.writerow([c.case_id, c.group, "" if c.dice is None else f"{c.dice:.6f}",
                         *["" if k not in c.flags else int(c.flags[k]) for k in flag_keys],
                         *[f"{c.scores[k]:.6g}" for k in keys]])
    return buffer.getvalue()
