"""``ood-eval``: run a bundle on an in-distribution set and named OOD sets, compare OOD scores as in the paper.

Every case goes through the runtime's ``run_batch`` (one sliding-window core), so the Mahalanobis score and the
output baselines (max softmax at T = 1, 10, 100 — the lowest-ESCE T is reported, as the paper does —, KL from
uniform, energy) come from the same aggregated logits. The sample-based baselines go through the same core too:
TTA (``tta=True``: 8 flip combinations) and MC dropout (``mc_dropout=True``: the bundle with test-time dropout
after the encoder stages, :mod:`.mc_dropout`, 10 passes on onnxruntime); both score a case by the voxel mean of
the standard deviation of the foreground probability.

Per OOD scenario, one table in the paper's layout: methods × ESCE, detection error, FPR and AUC. The detection
threshold of every method is the 95 % TPR boundary of its scores on the in-distribution test set (the authors'
rule), so methods are compared at the same TPR. ESCE needs Dice, i.e. labels; energy is not a [0, 1]
uncertainty, so it has no ESCE. ``layers={NAME: BUNDLE}`` adds the feature-layer ablation (paper Table 11):
other calibrated bundles of the same network, tapped at other layers, scored on the same sets. The HTML report
also draws every method's score distribution per set (paper Fig. 8: name sets ``kind-weak``, ``kind-medium``,
``kind-strong`` to see the levels side by side).
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import SimpleITK as sitk

from segsentry._atomic import write_text_atomic
from segsentry.evaluation.mc_dropout import add_mc_dropout
from segsentry.evaluation.metrics import (
    EvaluationError,
    detection_summary,
    dice,
    esce,
    temperature_scaling_search,
    tpr95_threshold,
)
from segsentry.manifest import Manifest
from segsentry.runtime.backends import BackendOptions, create_backend
from segsentry.runtime.batch import run_batch
from segsentry.runtime.bundle import Bundle, load_bundle
from segsentry.runtime.io import CaseInput, read_case
from segsentry.runtime.pipeline import infer_volume
from segsentry.runtime.preprocess import preprocess

SILENT_FAILURE_DICE = 0.6
METHODS = ("mahalanobis", "max_softmax", "kl_uniform", "energy")
SAMPLED = {"tta": "TTA (8 flips)", "mc_dropout": "MC dropout"}  # optional sample-based baselines
MC_PASSES = 10
MC_P = 0.5


@dataclass
class CaseResult:
    case_id: str
    group: str  # "id" or the OOD set's name
    scores: dict[str, float]  # method -> uncertainty (energy: raw)
    dice: float | None


def _images_and_labels(folder: Path) -> tuple[Path, Path | None]:
    """nnU-Net raw layout (imagesTr/ + labelsTr/) or a plain folder of images (no labels)."""
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        if (folder / images).is_dir():
            return folder / images, (folder / labels) if (folder / labels).is_dir() else None
    if not folder.is_dir():
        raise EvaluationError(f"evaluation set {folder} is not a folder")
    return folder, None


def _preprocessed(files: Sequence[Path], bundle: Bundle) -> np.ndarray:
    m = bundle.manifest
    loaded = read_case(CaseInput("sampled", tuple(files)), num_channels=m.num_channels)
    data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
    return data


def _foreground_std(logit_maps: Iterable[np.ndarray]) -> float:
    """Voxel mean of the standard deviation (over the predictions) of the foreground probability 1 - P(bg)."""
    total = total_sq = None
    count = 0
    for logits in logit_maps:
        fg = 1.0 - _softmax_background(logits)
        total = fg if total is None else total + fg
        total_sq = fg * fg if total_sq is None else total_sq + fg * fg
        count += 1
    mean = total / count
    return float(np.mean(np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))))


def tta_uncertainty(files: Sequence[Path], bundle: Bundle, engine) -> float:
    """TTA baseline: 8 flip combinations of the preprocessed volume through the same sliding window; the
    uncertainty is the voxel mean of the standard deviation of the foreground probability (1 - P(background))."""
    data = _preprocessed(files, bundle)

    def predictions() -> Iterator[np.ndarray]:
        for axes in [c for r in range(4) for c in itertools.combinations((1, 2, 3), r)]:
            flipped = np.ascontiguousarray(np.flip(data, axes)) if axes else data
            logits = infer_volume(flipped, engine, bundle.manifest).logits
            yield np.flip(logits, axes) if axes else logits

    return _foreground_std(predictions())


def mc_dropout_uncertainty(files: Sequence[Path], bundle: Bundle, engine, *, passes: int = MC_PASSES) -> float:
    """MC dropout baseline: ``passes`` sliding-window runs of the dropout variant (``engine`` built from
    :func:`~segsentry.evaluation.mc_dropout.add_mc_dropout`), each patch with fresh masks; the uncertainty is the
    voxel mean of the standard deviation of the foreground probability."""
    if passes < 2:
        raise EvaluationError(f"MC dropout needs at least 2 passes; got {passes}")
    data = _preprocessed(files, bundle)
    return _foreground_std(infer_volume(data, engine, bundle.manifest).logits for _ in range(passes))


def _softmax_background(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32)
    x -= x.max(0, keepdims=True)
    np.exp(x, out=x)
    return x[0] / x.sum(0)


Sampler = Callable[[list[Path]], float]  # a case's image files -> its sample-based uncertainty


def _sampling_engines(bundle: Bundle, *, tta: bool, mc_variant: bytes | None, mc_passes: int, backend: str,
                      threads: int | None) -> dict[str, tuple[object, Sampler]]:
    """name -> (engine, sampler) for the requested sample-based baselines. ``mc_variant`` is the bundle with
    test-time dropout (:func:`add_mc_dropout`); it always runs on onnxruntime (its random ops are standard ONNX;
    not every engine implements them)."""
    m = bundle.manifest
    engines: dict[str, tuple[object, Sampler]] = {}
    if tta:
        engine = create_backend(backend, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                                options=BackendOptions(threads=threads), manifest=m)
        engines["tta"] = (engine, lambda files, e=engine: tta_uncertainty(files, bundle, e))
    if mc_variant is not None:
        engine = create_backend("onnxruntime", mc_variant, channels=m.num_channels, patch_size=m.patch_size,
                                options=BackendOptions(threads=threads))
        engines["mc_dropout"] = (engine, lambda files, e=engine: mc_dropout_uncertainty(
            files, bundle, e, passes=mc_passes))
    return engines


def _ok_reports(result, group: str, what: str) -> dict[str, dict]:
    """case id -> report of a ``run_batch`` result; raise on a failed case or a bundle without a distance."""
    reports = {}
    for o in result.outcomes:
        if o.status != "ok":
            raise EvaluationError(f"case {o.case_id} of set '{group}' failed: {o.error}")
        if o.report.get("uncertainty") is None:
            raise EvaluationError(f"{what} is not calibrated (no distance output); run ood-calib first")
        reports[o.case_id] = o.report
    return reports


def run_set(bundle: Path, folder: Path, group: str, work: Path, *, backend: str, threads: int | None,
            samplers: Mapping[str, Sampler] | None = None,
            layers: Mapping[str, Path] | None = None) -> list[CaseResult]:
    """Run one evaluation set. ``samplers`` add sample-based scores by name; ``layers`` are extra calibrated
    bundles whose U is recorded as ``mahalanobis[NAME]`` (the feature-layer ablation)."""
    images, labels = _images_and_labels(folder)
    reports = _ok_reports(run_batch(bundle, [images], work / group, backend=backend, threads=threads, qa=False),
                          group, "the bundle")
    extra = {name: _ok_reports(run_batch(path, [images], work / f"{group}@{name}", backend=backend,
                                         threads=threads, qa=False), group, f"layer bundle '{name}'")
             for name, path in (layers or {}).items()}
    cases = []
    for case_id, r in reports.items():
        b = r["baselines"]
        scores = {"mahalanobis": r["uncertainty"], "kl_uniform": b["kl_uniform"], "energy": b["energy"],
                  **{f"max_softmax_T{t}": b[f"max_softmax_T{t}"] for t in (1, 10, 100)}}
        for name, layer_reports in extra.items():
            scores[f"mahalanobis[{name}]"] = layer_reports[case_id]["uncertainty"]
        for name, sampler in (samplers or {}).items():
            scores[name] = sampler([Path(f) for f in r["inputs"]])
        case_dice = None
        if labels is not None:
            ref_path = next(iter(sorted(labels.glob(f"{case_id}.*"))), None)
            if ref_path is not None:
                pred = sitk.GetArrayFromImage(sitk.ReadImage(r["outputs"]["mask"]))
                ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_path)))
                case_dice = dice(pred, ref)
        cases.append(CaseResult(case_id, group, scores, case_dice))
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


def scenario_table(id_cases: list[CaseResult], ood_cases: list[CaseResult]) -> list[dict]:
    """One row per method: ESCE (over ID + OOD cases with Dice), detection error, FPR, AUC, threshold."""
    rows = []
    everything = id_cases + ood_cases
    t_best = _best_temperature(everything)
    methods = [*METHODS, *(m for m in SAMPLED if all(m in c.scores for c in everything))]
    with_dice = [c for c in everything if c.dice is not None]
    for method in methods:
        key = f"max_softmax_T{t_best}" if method == "max_softmax" else method
        summary = detection_summary(_method_scores(id_cases, key), _method_scores(ood_cases, key))
        error_esce = None
        if with_dice and method != "energy":  # over the cases with labels (a set may be partly labelled)
            error_esce = esce(_method_scores(with_dice, key), np.array([c.dice for c in with_dice]))
        rows.append({
            "method": f"max softmax (T={t_best})" if method == "max_softmax" else
            SAMPLED.get(method, method.replace("_", " ")),
            "esce": error_esce, "error": summary["detection_error"], "fpr": summary["fpr"], "auc": summary["auc"],
            "threshold": summary["threshold"], "tpr": summary["tpr"],
        })
    return rows


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _scatter_svg(id_cases: list[CaseResult], ood_cases: list[CaseResult], threshold: float, title: str) -> str:
    """Dice vs Mahalanobis U with the 95 % TPR line; the silent-failure quadrant (Dice < 0.6, U below) shaded."""
    w, h, pad = 360, 260, 36
    pts = [(c.scores["mahalanobis"], c.dice, c.group == "id") for c in id_cases + ood_cases if c.dice is not None]

    def x(u: float) -> float:
        return pad + (w - 2 * pad) * min(max(u, 0), 1)

    def y(d: float) -> float:
        return h - pad - (h - 2 * pad) * min(max(d, 0), 1)

    dots = "".join(f'<circle cx="{x(u):.1f}" cy="{y(d):.1f}" r="4" fill="{"#2a7" if is_id else "#d33"}" '
                   f'fill-opacity="0.7"><title>U {u:.3f}, Dice {d:.3f}</title></circle>' for u, d, is_id in pts)
    return (
        f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" role="img"><title>{html.escape(title)}</title>'
        f'<rect x="{x(0):.1f}" y="{y(SILENT_FAILURE_DICE):.1f}" width="{x(threshold) - x(0):.1f}" '
        f'height="{y(0) - y(SILENT_FAILURE_DICE):.1f}" fill="#fdd" />'
        f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(0)}" stroke="#333" />'
        f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(0)}" y2="{y(1)}" stroke="#333" />'
        f'<line x1="{x(threshold):.1f}" y1="{y(0)}" x2="{x(threshold):.1f}" y2="{y(1)}" stroke="#000" stroke-dasharray="4,3" />'
        f'{dots}<text x="{w / 2 - 30}" y="{h - 6}" font-size="11">uncertainty U</text>'
        f'<text x="4" y="{pad - 8}" font-size="11">Dice</text>'
        f'<text x="{x(0) + 2:.1f}" y="{y(0) - 4:.1f}" font-size="9" fill="#a00">silent failures</text></svg>'
    )


def _distribution_svg(groups: Sequence[tuple[str, np.ndarray]], threshold: float, title: str) -> str:
    """One method's score distribution per set (paper Fig. 8): box (quartiles, median) and the cases as dots;
    dashed line = the method's 95 % TPR threshold on the ID set. The y axis spans this method's scores."""
    pad, band, h = 44, 86, 230
    w = 2 * pad + band * len(groups)
    values = np.concatenate([v for _, v in groups] + [np.array([threshold])])
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo if hi > lo else 1.0

    def y(v: float) -> float:
        return h - pad - (h - 2 * pad) * (v - lo) / span

    parts = [(f'<svg width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg" role="img">'
             f'<title>{html.escape(title)}</title><text x="4" y="14" font-size="12">{html.escape(title)}</text>'),
             f'<line x1="{pad}" y1="{y(lo):.1f}" x2="{pad}" y2="{y(hi):.1f}" stroke="#333" />',
             (f'<text x="2" y="{y(hi) + 4:.1f}" font-size="9">{hi:.3g}</text>'
             f'<text x="2" y="{y(lo) + 4:.1f}" font-size="9">{lo:.3g}</text>')]
    for i, (name, v) in enumerate(groups):
        cx = pad + band * i + band / 2
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        colour = "#2a7" if i == 0 else "#d33"
        parts.append(f'<rect x="{cx - 16:.1f}" y="{y(q3):.1f}" width="32" height="{max(y(q1) - y(q3), 1):.1f}" '
                     f'fill="{colour}" fill-opacity="0.18" stroke="{colour}" />'
                     f'<line x1="{cx - 16:.1f}" y1="{y(med):.1f}" x2="{cx + 16:.1f}" y2="{y(med):.1f}" '
                     f'stroke="{colour}" stroke-width="2" />')
        for j, value in enumerate(v):
            dx = ((j * 7919) % 23 - 11) * 1.2  # deterministic jitter
            parts.append(f'<circle cx="{cx + dx:.1f}" cy="{y(value):.1f}" r="2.5" fill="{colour}" '
                         f'fill-opacity="0.7"><title>{html.escape(name)}: {value:.4g}</title></circle>')
        label = name if len(name) <= 16 else name[:15] + "…"
        parts.append(f'<text x="{cx:.1f}" y="{h - pad + 14}" font-size="9" text-anchor="middle">'
                     f'{html.escape(label)}</text>')
    parts.append(f'<line x1="{pad}" y1="{y(threshold):.1f}" x2="{w - pad}" y2="{y(threshold):.1f}" stroke="#000" '
                 f'stroke-dasharray="4,3" /></svg>')
    return "".join(parts)


def layer_ablation_table(id_cases: list[CaseResult], scenarios: Mapping[str, list[CaseResult]],
                         layers: Mapping[str, str]) -> list[dict]:
    """Paper Table 11: per feature layer (score key -> label), AUC and FPR (95 % TPR on ID) per scenario."""
    rows = []
    for key, label in layers.items():
        sid = _method_scores(id_cases, key)
        row = {"layer": label, "key": key}
        for name, ood_cases in scenarios.items():
            summary = detection_summary(sid, _method_scores(ood_cases, key))
            row[name] = {"auc": summary["auc"], "fpr": summary["fpr"]}
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


def evaluate(
    bundle: str | Path, id_set: str | Path, ood_sets: Mapping[str, str | Path], output: str | Path, *,
    backend: str = "auto", threads: int | None = None, tta: bool = False, mc_dropout: bool = False,
    mc_passes: int = MC_PASSES, layers: Mapping[str, str | Path] | None = None,
) -> dict:
    """Run everything once, then write ``output/report.md``, ``report.html``, ``cases.csv``, ``results.json``.

    ``tta`` / ``mc_dropout`` add the sample-based baselines (8 / ``mc_passes`` extra sliding-window runs per
    case). ``layers`` maps a name to another calibrated bundle of the same network tapped at another layer
    (``ood-export --layer``, then ``ood-calib``): the report gets the feature-layer ablation table.
    """
    output = Path(output)
    if not ood_sets:
        raise EvaluationError("give at least one OOD set (NAME=FOLDER)")
    if "id" in ood_sets:
        raise EvaluationError("'id' is reserved for the in-distribution set; rename that OOD set")
    layers = {name: Path(path) for name, path in (layers or {}).items()}
    for name, path in layers.items():
        if not name or "[" in name or "]" in name:
            raise EvaluationError(f"layer name {name!r} must be non-empty without brackets")
        if not path.is_file():
            raise EvaluationError(f"layer bundle '{name}' ({path}) is not a file")
    main = load_bundle(bundle)
    layer_manifests = _same_network(main, layers)
    work = output / "cases"
    mc_variant = (add_mc_dropout(onnx.load_from_string(main.model_bytes), p=MC_P).SerializeToString()
                  if mc_dropout else None)

    def run(group: str, folder: Path) -> list[CaseResult]:
        # fresh engines per set: every set draws the same MC dropout masks from the same seeds
        engines = _sampling_engines(main, tta=tta, mc_variant=mc_variant, mc_passes=mc_passes, backend=backend,
                                    threads=threads)
        try:
            return run_set(main.path, folder, group, work, backend=backend, threads=threads,
                           samplers={name: sampler for name, (_, sampler) in engines.items()}, layers=layers)
        finally:
            for engine, _ in engines.values():
                engine.close()

    id_cases = run("id", Path(id_set))
    scenarios = {}
    all_cases = list(id_cases)
    for name, folder in ood_sets.items():
        ood_cases = run(name, Path(folder))
        all_cases += ood_cases
        scenarios[name] = {"rows": scenario_table(id_cases, ood_cases), "cases": ood_cases}
    spec = main.manifest.features
    layer_keys = {"mahalanobis": f"{spec.layer} (D={spec.dim})"}
    for name, manifest in layer_manifests.items():
        spec = manifest.features
        layer_keys[f"mahalanobis[{name}]"] = f"{name}: {spec.layer} (D={spec.dim})"
    ablation = (layer_ablation_table(id_cases, {k: v["cases"] for k, v in scenarios.items()}, layer_keys)
                if layers else None)
    methods = _score_methods(all_cases)
    groups = ["id", *ood_sets]
    distributions = {
        key: {g: _summary([c.scores[key] for c in all_cases if c.group == g]) for g in groups} for key in methods}
    result = {
        "bundle": str(bundle), "id_set": str(id_set), "ood_sets": {k: str(v) for k, v in ood_sets.items()},
        "scenarios": {k: v["rows"] for k, v in scenarios.items()},
        "mean_dice": {g: _mean_dice([c for c in all_cases if c.group == g]) for g in groups},
        "distributions": distributions,
        "sampled_baselines": {"tta": tta, "mc_dropout": {"passes": mc_passes, "p": MC_P} if mc_dropout else None},
    }
    if ablation is not None:
        result["layer_ablation"] = ablation
    write_text_atomic(output / "results.json", json.dumps(result, indent=2) + "\n")
    _write_cases_csv(all_cases, output / "cases.csv")
    md, body = [f"# ood-eval: {Path(bundle).name}", ""], []
    for name, s in scenarios.items():
        md += [(f"## {name} (ID: {len(id_cases)} cases, OOD: {len(s['cases'])} cases; mean Dice ID "
               f"{_fmt(result['mean_dice']['id'])}, OOD {_fmt(result['mean_dice'][name])})"), "",
               "| method | ESCE | Error | FPR | AUC |", "|---|---|---|---|---|"]
        md += [f"| {r['method']} | {_fmt(r['esce'])} | {_fmt(r['error'])} | {_fmt(r['fpr'])} | {_fmt(r['auc'])} |"
               for r in s["rows"]]
        md.append("")
        table = "".join(f"<tr><td>{html.escape(r['method'])}</td><td>{_fmt(r['esce'])}</td><td>{_fmt(r['error'])}"
                        f"</td><td>{_fmt(r['fpr'])}</td><td>{_fmt(r['auc'])}</td></tr>" for r in s["rows"])
        threshold = next(r["threshold"] for r in s["rows"] if r["method"] == "mahalanobis")
        body.append(f"<h2>{html.escape(name)}</h2><table><tr><th>method</th><th>ESCE</th><th>Error</th><th>FPR</th>"
                    f"<th>AUC</th></tr>{table}</table>{_scatter_svg(id_cases, s['cases'], threshold, name)}")
    if ablation is not None:
        head = "| feature layer | " + " | ".join(f"{n} AUC / FPR" for n in scenarios) + " |"
        lines = [f"| {r['layer']} | " + " | ".join(f"{_fmt(r[n]['auc'])} / {_fmt(r[n]['fpr'])}" for n in scenarios)
                 + " |" for r in ablation]
        md += ["## Feature-layer ablation (Mahalanobis score per layer)", "", head,
               "|---|" + "---|" * len(scenarios), *lines, ""]
        cells = "".join(f"<tr><td>{html.escape(r['layer'])}</td>" + "".join(
            f"<td>{_fmt(r[n]['auc'])} / {_fmt(r[n]['fpr'])}</td>" for n in scenarios) + "</tr>" for r in ablation)
        body.append("<h2>Feature-layer ablation</h2><table><tr><th>feature layer</th>" + "".join(
            f"<th>{html.escape(n)} AUC / FPR</th>" for n in scenarios) + f"</tr>{cells}</table>")
    md += ["## Score distributions per set (median [IQR])", "",
           "| method | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    md += [f"| {label} | " + " | ".join(
        f"{distributions[key][g]['median']:.3g} [{distributions[key][g]['q1']:.3g}–{distributions[key][g]['q3']:.3g}]"
        for g in groups) + " |" for key, label in methods.items()]
    md.append("")
    figures = []
    for key, label in methods.items():
        threshold = tpr95_threshold(_method_scores(id_cases, key))
        figures.append(_distribution_svg(
            [(g, _method_scores([c for c in all_cases if c.group == g], key)) for g in groups], threshold, label))
    body.append("<h2>Score distributions per set</h2><div>" + "".join(figures) + "</div>")
    passes = f"; MC dropout: p = {MC_P} after every encoder stage, {mc_passes} passes" if mc_dropout else ""
    md.append("Thresholds: 95 % TPR boundary of each method on the ID set. ESCE over ID + OOD cases with labels. "
              "Scatter (HTML): Dice vs Mahalanobis U, ID green, OOD red, dashed = threshold, shaded = silent "
              f"failures (Dice < 0.6 kept as in-distribution){passes}.")
    write_text_atomic(output / "report.md", "\n".join(md) + "\n")
    write_text_atomic(output / "report.html", "<!doctype html><html><head><meta charset='utf-8'><title>ood-eval</title>"
                      "<style>body{font-family:system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
                      "td,th{border:1px solid #ccc;padding:3px 8px}svg{margin:4px}</style></head><body>"
                      f"<h1>ood-eval: {html.escape(Path(bundle).name)}</h1>{''.join(body)}"
                      f"<p>{html.escape(md[-1])}</p></body></html>\n")
    return result


def _same_network(main: Bundle, layers: Mapping[str, Path]) -> dict[str, Manifest]:
    """The layer-ablation bundles' manifests, checked to be the same network and pipeline as ``main`` (tapped
    elsewhere) and calibrated."""
    def fields(m: Manifest) -> dict:
        source = {k: v for k, v in m.source.items() if k != "model_dir"}  # the folder may have moved
        return {"source": source, "labels": m.labels, "channels": m.channels, "patch_size": m.patch_size,
                "preprocessing": m.preprocessing, "tiling": m.tiling}

    expected = fields(main.manifest)
    manifests = {}
    for name, path in layers.items():
        manifest = load_bundle(path).manifest
        found = fields(manifest)
        for what in expected:
            if found[what] != expected[what]:
                raise EvaluationError(
                    f"layer bundle '{name}' ({path}) differs from {main.path.name} in its {what}: the ablation "
                    "compares feature layers of one network; export the same model folder with --layer and "
                    "calibrate it")
        if manifest.calibration is None:
            raise EvaluationError(f"layer bundle '{name}' ({path}) is not calibrated; run ood-calib on it first")
        manifests[name] = manifest
    return manifests


def _summary(values: Sequence[float]) -> dict[str, float]:
    q1, median, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "n": len(values)}


def _mean_dice(cases: list[CaseResult]) -> float | None:
    values = [c.dice for c in cases if c.dice is not None]
    return float(np.mean(values)) if values else None


def _write_cases_csv(cases: list[CaseResult], target: Path) -> None:
    keys = sorted({k for c in cases for k in c.scores})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "group", "dice", *keys])
    for c in cases:
        writer.writerow([c.case_id, c.group, "" if c.dice is None else f"{c.dice:.6f}",
                         *[f"{c.scores[k]:.6g}" for k in keys]])
    write_text_atomic(target, buffer.getvalue())
