"""``ood-eval``: run a bundle on an in-distribution set and named OOD sets, compare OOD scores as in the paper.

Every case goes through the runtime's ``run_batch`` (one sliding-window core), so the Mahalanobis score and the
output baselines (and, with ``tta=True``, the TTA baseline: 8 flipped passes through the same core) (max softmax at T = 1, 10, 100 — the lowest-ESCE T is reported, as the paper does —, KL from
uniform, energy) come from the same aggregated logits. Per OOD scenario, one table in the paper's layout:
methods × ESCE, detection error, FPR and AUC. The detection threshold of every method is the 95 % TPR boundary
of its scores on the in-distribution test set (the authors' rule), so methods are compared at the same TPR.
ESCE needs Dice, i.e. labels; energy is not a [0, 1] uncertainty, so it has no ESCE.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry._atomic import write_text_atomic
from segsentry.evaluation.metrics import (
    EvaluationError,
    auc,
    detection_error,
    dice,
    esce,
    fpr_at_threshold,
    tpr95_threshold,
    tpr_at_threshold,
)
from segsentry.runtime.backends import create_backend
from segsentry.runtime.batch import run_batch
from segsentry.runtime.bundle import Bundle, load_bundle
from segsentry.runtime.io import CaseInput, read_case
from segsentry.runtime.pipeline import infer_volume
from segsentry.runtime.preprocess import preprocess

SILENT_FAILURE_DICE = 0.6
METHODS = ("mahalanobis", "max_softmax", "kl_uniform", "energy")


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


def tta_uncertainty(files: Sequence[Path], bundle: Bundle, engine) -> float:
    """TTA baseline: 8 flip combinations of the preprocessed volume through the same sliding window; the
    uncertainty is the voxel mean of the standard deviation of the foreground probability (1 - P(background))."""
    m = bundle.manifest
    loaded = read_case(CaseInput("tta", tuple(files)), num_channels=m.num_channels)
    data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
    total = total_sq = None
    for axes in [c for r in range(4) for c in itertools.combinations((1, 2, 3), r)]:
        flipped = np.ascontiguousarray(np.flip(data, axes)) if axes else data
        logits = infer_volume(flipped, engine, m).logits
        logits = np.flip(logits, axes) if axes else logits
        fg = 1.0 - _softmax_background(logits)
        total = fg if total is None else total + fg
        total_sq = fg * fg if total_sq is None else total_sq + fg * fg
    mean = total / 8
    return float(np.mean(np.sqrt(np.maximum(total_sq / 8 - mean * mean, 0.0))))


def _softmax_background(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float32)
    x -= x.max(0, keepdims=True)
    np.exp(x, out=x)
    return x[0] / x.sum(0)


def run_set(bundle: Path, folder: Path, group: str, work: Path, *, backend: str, threads: int | None,
            tta: bool = False) -> list[CaseResult]:
    images, labels = _images_and_labels(folder)
    result = run_batch(bundle, [images], work / group, backend=backend, threads=threads, qa=False)
    loaded_bundle = load_bundle(bundle) if tta else None
    engine = None
    if tta:
        m = loaded_bundle.manifest
        engine = create_backend(backend, loaded_bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                                threads=threads, manifest=m)
    cases = []
    for o in result.outcomes:
        if o.status != "ok":
            raise EvaluationError(f"case {o.case_id} of set '{group}' failed: {o.error}")
        r = o.report
        if r.get("uncertainty") is None:
            raise EvaluationError("the bundle is not calibrated (no distance output); run ood-calib first")
        b = r["baselines"]
        scores = {"mahalanobis": r["uncertainty"], "kl_uniform": b["kl_uniform"], "energy": b["energy"],
                  **{f"max_softmax_T{t}": b[f"max_softmax_T{t}"] for t in (1, 10, 100)}}
        if engine is not None:
            scores["tta"] = tta_uncertainty([Path(f) for f in r["inputs"]], loaded_bundle, engine)
        case_dice = None
        if labels is not None:
            ref_path = next(iter(sorted(labels.glob(f"{o.case_id}.*"))), None)
            if ref_path is not None:
                pred = sitk.GetArrayFromImage(sitk.ReadImage(r["outputs"]["mask"]))
                ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_path)))
                case_dice = dice(pred, ref)
        cases.append(CaseResult(o.case_id, group, scores, case_dice))
    if engine is not None:
        engine.close()
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
    d = np.array([c.dice for c in with_dice])
    errors = {t: esce(_method_scores(with_dice, f"max_softmax_T{t}"), d) for t in (1, 10, 100)}
    return min(errors, key=lambda t: (errors[t], t))


def scenario_table(id_cases: list[CaseResult], ood_cases: list[CaseResult]) -> list[dict]:
    """One row per method: ESCE (over ID + OOD cases with Dice), detection error, FPR, AUC, threshold."""
    rows = []
    everything = id_cases + ood_cases
    t_best = _best_temperature(everything)
    methods = [*METHODS, "tta"] if all("tta" in c.scores for c in everything) else list(METHODS)
    for method in methods:
        key = f"max_softmax_T{t_best}" if method == "max_softmax" else method
        sid, sood = _method_scores(id_cases, key), _method_scores(ood_cases, key)
        threshold = tpr95_threshold(sid)
        tpr, fpr = tpr_at_threshold(sid, threshold), fpr_at_threshold(sood, threshold)
        with_dice = [c for c in everything if c.dice is not None]
        error_esce = None
        if with_dice and method != "energy":
            error_esce = esce(_method_scores(with_dice, key), np.array([c.dice for c in with_dice]))
        rows.append({
            "method": f"max softmax (T={t_best})" if method == "max_softmax" else
            "TTA (8 flips)" if method == "tta" else method.replace("_", " "),
            "esce": error_esce, "error": detection_error(tpr, fpr), "fpr": fpr, "auc": auc(sid, sood),
            "threshold": threshold, "tpr": tpr,
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


def evaluate(
    bundle: str | Path, id_set: str | Path, ood_sets: Mapping[str, str | Path], output: str | Path, *,
    backend: str = "auto", threads: int | None = None, tta: bool = False,
) -> dict:
    """Run everything once, then write ``output/report.md``, ``report.html``, ``cases.csv``, ``results.json``."""
    output = Path(output)
    if not ood_sets:
        raise EvaluationError("give at least one OOD set (NAME=FOLDER)")
    if "id" in ood_sets:
        raise EvaluationError("'id' is reserved for the in-distribution set; rename that OOD set")
    work = output / "cases"
    id_cases = run_set(Path(bundle), Path(id_set), "id", work, backend=backend, threads=threads, tta=tta)
    scenarios = {}
    all_cases = list(id_cases)
    for name, folder in ood_sets.items():
        ood_cases = run_set(Path(bundle), Path(folder), name, work, backend=backend, threads=threads, tta=tta)
        all_cases += ood_cases
        scenarios[name] = {"rows": scenario_table(id_cases, ood_cases), "cases": ood_cases}
    result = {
        "bundle": str(bundle), "id_set": str(id_set), "ood_sets": {k: str(v) for k, v in ood_sets.items()},
        "scenarios": {k: v["rows"] for k, v in scenarios.items()},
        "mean_dice": {g: _mean_dice([c for c in all_cases if c.group == g]) for g in ["id", *ood_sets]},
    }
    write_text_atomic(output / "results.json", json.dumps(result, indent=2) + "\n")
    _write_cases_csv(all_cases, output / "cases.csv")
    md, body = [f"# ood-eval: {Path(bundle).name}", ""], []
    for name, s in scenarios.items():
        md += [f"## {name} (ID: {len(id_cases)} cases, OOD: {len(s['cases'])} cases; mean Dice ID "
               f"{_fmt(result['mean_dice']['id'])}, OOD {_fmt(result['mean_dice'][name])})", "",
               "| method | ESCE | Error | FPR | AUC |", "|---|---|---|---|---|"]
        md += [f"| {r['method']} | {_fmt(r['esce'])} | {_fmt(r['error'])} | {_fmt(r['fpr'])} | {_fmt(r['auc'])} |"
               for r in s["rows"]]
        md.append("")
        table = "".join(f"<tr><td>{html.escape(r['method'])}</td><td>{_fmt(r['esce'])}</td><td>{_fmt(r['error'])}"
                        f"</td><td>{_fmt(r['fpr'])}</td><td>{_fmt(r['auc'])}</td></tr>" for r in s["rows"])
        threshold = next(r["threshold"] for r in s["rows"] if r["method"] == "mahalanobis")
        body.append(f"<h2>{html.escape(name)}</h2><table><tr><th>method</th><th>ESCE</th><th>Error</th><th>FPR</th>"
                    f"<th>AUC</th></tr>{table}</table>{_scatter_svg(id_cases, s['cases'], threshold, name)}")
    md.append("Thresholds: 95 % TPR boundary of each method on the ID set. ESCE over ID + OOD cases with labels. "
              "Scatter (HTML): Dice vs Mahalanobis U, ID green, OOD red, dashed = threshold, shaded = silent "
              "failures (Dice < 0.6 kept as in-distribution).")
    write_text_atomic(output / "report.md", "\n".join(md) + "\n")
    write_text_atomic(output / "report.html", "<!doctype html><html><head><meta charset='utf-8'><title>ood-eval</title>"
                      "<style>body{font-family:system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
                      "td,th{border:1px solid #ccc;padding:3px 8px}</style></head><body>"
                      f"<h1>ood-eval: {html.escape(Path(bundle).name)}</h1>{''.join(body)}"
                      f"<p>{html.escape(md[-1])}</p></body></html>\n")
    return result


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
