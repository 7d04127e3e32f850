"""``ood-eval``'s report as text: the markdown tables and the HTML page with its SVG figures.

Pure functions, data in and strings out; :mod:`.evaluate` computes the numbers and writes the files. Nothing here
runs a model or reads a file.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SILENT_FAILURE_DICE = 0.6  # the scatter's shaded quadrant: Dice below this, kept as in-distribution


@dataclass(frozen=True)
class ScenarioView:
    """One OOD scenario as the report shows it.

    ``rows`` are :func:`~segsentry.evaluation.evaluate.scenario_table` rows (``method``, ``esce``, ``error``,
    ``fpr``, ``auc``); ``points`` are ``(Mahalanobis U, Dice, is ID)`` of the ID and OOD cases with a Dice;
    ``threshold`` is the Mahalanobis U threshold (95 % TPR on the ID set).
    """

    name: str
    rows: Sequence[Mapping[str, Any]]
    n_id: int
    n_ood: int
    mean_dice_id: float | None
    mean_dice_ood: float | None
    points: Sequence[tuple[float, float, bool]]
    threshold: float


@dataclass(frozen=True)
class MethodDistribution:
    """One method's scores per set (paper Fig. 8): ``values`` ``(set, scores)`` in set order, ID first;
    ``summaries`` set -> ``median`` / ``q1`` / ``q3``; ``threshold`` the method's 95 % TPR threshold on ID."""

    key: str
    label: str
    values: Sequence[tuple[str, np.ndarray]]
    summaries: Mapping[str, Mapping[str, float]]
    threshold: float


@dataclass(frozen=True)
class ReportView:
    """Everything the report shows. ``ablation``: :func:`~segsentry.evaluation.evaluate.layer_ablation_table`
    rows or ``None``; ``mc_dropout``: ``(p, passes)`` when that baseline ran."""

    bundle_name: str
    groups: Sequence[str]  # "id", then the OOD sets in order
    scenarios: Sequence[ScenarioView]
    ablation: Sequence[Mapping[str, Any]] | None
    distributions: Sequence[MethodDistribution]
    mc_dropout: tuple[float, int] | None
    deployed: Sequence[Mapping[str, Any]] = ()  # deployed_table rows: the bundle's own flag per set
    deployed_rule: str = ""
    failure: Mapping[str, Any] | None = None  # failure_table: AURC / E-AURC rows and risk-coverage curves


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def fmt_ci(value: float | None, ci: Sequence[float] | None) -> str:
    """``0.912 [0.850–0.960]``: a value with its 95 % interval (just the value where there is none)."""
    if value is None or not ci:
        return fmt(value)
    return f"{value:.3f} [{ci[0]:.3f}–{ci[1]:.3f}]"


def _deployed_lines(view: ReportView) -> list[str]:
    if not view.deployed:
        return []
    md = ["## Deployed flag (the bundle's own threshold, nothing re-fitted)", "", view.deployed_rule, "",
          "| bundle | set | n | flagged | rate [95 % CI] | |", "|---|---|---|---|---|---|"]
    md += [f"| {r.get('bundle', 'mahalanobis')} | {r['set']} | {r['n']} | {r['flagged']} | "
           f"{fmt_ci(r['rate'], r['rate_ci'])} | {r['meaning']} |" for r in view.deployed]
    return md + [""]


def _failure_lines(view: ReportView) -> list[str]:
    f = view.failure
    if not f:
        return []
    md = [f"## Failure detection (risk = 1 − Dice; {f['n']} labelled cases of {', '.join(f['sets'])})", "",
          f"Random order AURC {f['random_aurc']:.3f} (the mean risk); oracle order {f['oracle_aurc']:.3f}. "
          "Lower is better.", "", "| method | AURC [95 % CI] | E-AURC [95 % CI] |", "|---|---|---|"]
    md += [f"| {r['method']} | {fmt_ci(r['aurc'], r['aurc_ci'])} | {fmt_ci(r['e_aurc'], r['e_aurc_ci'])} |"
           for r in f["rows"]]
    return md + [""]


def footnote(view: ReportView) -> str:
    passes = ""
    if view.mc_dropout is not None:
        p, n = view.mc_dropout
        passes = f"; MC dropout: p = {p} after every encoder stage, {n} passes"
    return ("Scenario tables (the paper's protocol): each method's threshold re-fitted at the 95 % TPR boundary "
            "of the ID set, so FPR and error there flatter every method; the deployed table shows the bundle's own "
            "flag. Intervals: 95 % percentile bootstrap, each set resampled on its own (flag rates: Wilson). "
            "ESCE over ID + OOD cases with labels. "
            "Scatter (HTML): Dice vs Mahalanobis U, ID green, OOD red, dashed = threshold, shaded = silent "
            f"failures (Dice < {SILENT_FAILURE_DICE} kept as in-distribution){passes}.")


def report_markdown(view: ReportView) -> str:
    """``report.md``: per scenario the methods table, the layer ablation, the score distributions."""
    names = [s.name for s in view.scenarios]
    md = [f"# ood-eval: {view.bundle_name}", ""]
    for s in view.scenarios:
        md += [(f"## {s.name} (ID: {s.n_id} cases, OOD: {s.n_ood} cases; mean Dice ID {fmt(s.mean_dice_id)}, "
                f"OOD {fmt(s.mean_dice_ood)})"), "",
               "| method | ESCE | Error (re-fitted) | FPR (re-fitted) | AUC |", "|---|---|---|---|---|"]
        md += [f"| {r['method']} | {fmt(r['esce'])} | {fmt_ci(r['error'], r.get('error_ci'))} | "
               f"{fmt_ci(r['fpr'], r.get('fpr_ci'))} | {fmt_ci(r['auc'], r.get('auc_ci'))} |" for r in s.rows]
        md.append("")
    md += _deployed_lines(view)
    md += _failure_lines(view)
    if view.ablation is not None:
        md += ["## Feature-layer ablation (Mahalanobis score per layer)", "",
               "| feature layer | " + " | ".join(f"{n} AUC / FPR" for n in names) + " |",
               "|---|" + "---|" * len(names)]
        md += [f"| {r['layer']} | " + " | ".join(f"{fmt(r[n]['auc'])} / {fmt(r[n]['fpr'])}" for n in names) + " |"
               for r in view.ablation]
        md.append("")
    md += ["## Score distributions per set (median [IQR])", "",
           "| method | " + " | ".join(view.groups) + " |", "|---|" + "---|" * len(view.groups)]
    md += [f"| {d.label} | " + " | ".join(
        f"{d.summaries[g]['median']:.3g} [{d.summaries[g]['q1']:.3g}–{d.summaries[g]['q3']:.3g}]"
        for g in view.groups) + " |" for d in view.distributions]
    md += ["", footnote(view)]
    return "\n".join(md) + "\n"


def report_html(view: ReportView) -> str:
    """``report.html``: the same tables, a Dice-vs-U scatter per scenario and one distribution figure per method."""
    names = [s.name for s in view.scenarios]
    body = []
    for s in view.scenarios:
        table = "".join(f"<tr><td>{html.escape(r['method'])}</td><td>{fmt(r['esce'])}</td>"
                        f"<td>{fmt_ci(r['error'], r.get('error_ci'))}</td><td>{fmt_ci(r['fpr'], r.get('fpr_ci'))}"
                        f"</td><td>{fmt_ci(r['auc'], r.get('auc_ci'))}</td></tr>" for r in s.rows)
        body.append(f"<h2>{html.escape(s.name)}</h2><table><tr><th>method</th><th>ESCE</th><th>Error (re-fitted)"
                    f"</th><th>FPR (re-fitted)</th><th>AUC</th></tr>{table}</table>"
                    f"{scatter_svg(s.points, s.threshold, s.name)}")
    if view.deployed:
        cells = "".join(f"<tr><td>{html.escape(r.get('bundle', 'mahalanobis'))}</td>"
                        f"<td>{html.escape(r['set'])}</td><td>{r['n']}</td><td>{r['flagged']}</td>"
                        f"<td>{fmt_ci(r['rate'], r['rate_ci'])}</td><td>{r['meaning']}</td></tr>"
                        for r in view.deployed)
        body.append(f"<h2>Deployed flag</h2><p>{html.escape(view.deployed_rule)}</p><table><tr><th>bundle</th><th>set</th>"
                    f"<th>n</th><th>flagged</th><th>rate [95 % CI]</th><th></th></tr>{cells}</table>")
    if view.failure:
        f = view.failure
        cells = "".join(f"<tr><td>{html.escape(r['method'])}</td><td>{fmt_ci(r['aurc'], r['aurc_ci'])}</td>"
                        f"<td>{fmt_ci(r['e_aurc'], r['e_aurc_ci'])}</td></tr>" for r in f["rows"])
        body.append(f"<h2>Failure detection (risk = 1 − Dice, {f['n']} cases)</h2><p>random AURC "
                    f"{f['random_aurc']:.3f}, oracle {f['oracle_aurc']:.3f}</p><table><tr><th>method</th>"
                    f"<th>AURC</th><th>E-AURC</th></tr>{cells}</table>"
                    f"{risk_coverage_svg(f['curves'], f['random_aurc'])}")
    if view.ablation is not None:
        cells = "".join(f"<tr><td>{html.escape(r['layer'])}</td>" + "".join(
            f"<td>{fmt(r[n]['auc'])} / {fmt(r[n]['fpr'])}</td>" for n in names) + "</tr>" for r in view.ablation)
        body.append("<h2>Feature-layer ablation</h2><table><tr><th>feature layer</th>" + "".join(
            f"<th>{html.escape(n)} AUC / FPR</th>" for n in names) + f"</tr>{cells}</table>")
    figures = "".join(distribution_svg(d.values, d.threshold, d.label) for d in view.distributions)
    body.append(f"<h2>Score distributions per set</h2><div>{figures}</div>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>ood-eval</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:24px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px}svg{margin:4px}</style></head><body>"
            f"<h1>ood-eval: {html.escape(view.bundle_name)}</h1>{''.join(body)}"
            f"<p>{html.escape(footnote(view))}</p></body></html>\n")


_CURVE_COLOURS = ("#c0392b", "#2471a3", "#239b56", "#b9770e", "#7d3c98", "#17a589", "#566573", "#d35400")


def risk_coverage_svg(curves: Mapping[str, Mapping[str, Any]], random_risk: float) -> str:
    """Selective risk against coverage per method (lower is better), the random order's flat line dashed."""
    w, h, pad = 420, 280, 40
    top = max([random_risk, *(max(c["risk"]) for c in curves.values())] + [1e-6]) * 1.05

    def xy(cov: float, risk: float) -> tuple[float, float]:
        return pad + cov * (w - 2 * pad), h - pad - risk / top * (h - 2 * pad)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-size='10'>",
             f"<rect x='{pad}' y='{pad}' width='{w - 2 * pad}' height='{h - 2 * pad}' fill='none' stroke='#999'/>",
             f"<text x='{w / 2}' y='{h - 8}' text-anchor='middle'>coverage</text>",
             f"<text x='10' y='{pad - 8}'>selective risk (1 − Dice), max {top:.3f}</text>"]
    y = xy(0, random_risk)[1]
    parts.append(f"<line x1='{pad}' y1='{y:.1f}' x2='{w - pad}' y2='{y:.1f}' stroke='#555' stroke-dasharray='4 3'/>")
    for i, (key, c) in enumerate(curves.items()):
        colour = _CURVE_COLOURS[i % len(_CURVE_COLOURS)]
        points = " ".join("%.1f,%.1f" % xy(cv, r) for cv, r in zip(c["coverage"], c["risk"]))
        parts.append(f"<polyline points='{points}' fill='none' stroke='{colour}' stroke-width='1.5'/>")
        parts.append(f"<text x='{w - pad + 4 - 120}' y='{pad + 12 + 12 * i}' fill='{colour}'>"
                     f"{html.escape(str(c['label']))}</text>")
    parts.append("</svg>")
    return "".join(parts)


def scatter_svg(points: Sequence[tuple[float, float, bool]], threshold: float, title: str) -> str:
    """Dice vs Mahalanobis U of ``points`` ``(U, Dice, is ID)`` with the threshold line; the silent-failure
    quadrant (Dice < :data:`SILENT_FAILURE_DICE`, U below the threshold) shaded."""
    w, h, pad = 360, 260, 36

    def x(u: float) -> float:
        return pad + (w - 2 * pad) * min(max(u, 0), 1)

    def y(d: float) -> float:
        return h - pad - (h - 2 * pad) * min(max(d, 0), 1)

    dots = "".join(f'<circle cx="{x(u):.1f}" cy="{y(d):.1f}" r="4" fill="{"#2a7" if is_id else "#d33"}" '
                   f'fill-opacity="0.7"><title>U {u:.3f}, Dice {d:.3f}</title></circle>' for u, d, is_id in points)
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


def distribution_svg(groups: Sequence[tuple[str, np.ndarray]], threshold: float, title: str) -> str:
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
