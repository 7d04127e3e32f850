"""The drift-watch page of ``segsentry monitor``: one self-contained HTML file with inline SVG plots."""

from __future__ import annotations

import html
from pathlib import Path

from segsentry._atomic import write_text_atomic
from segsentry.dicom.monitor import DriftSummary

WIDTH, HEIGHT, PAD = 640, 220, 40


def rolling_svg(summary: DriftSummary) -> str:
    """Rolling flag rate (line), α (dashed), windows significantly above α (red dots), over case order."""
    points = summary.rolling
    if not points:
        return "<p>no scored case in the log</p>"
    top = max(0.2, 1.2 * max(p.rate for p in points), 1.5 * summary.alpha)
    last = max(1, len(points) - 1)

    def xy(i: int, rate: float) -> tuple[float, float]:
        return (PAD + (WIDTH - 2 * PAD) * i / last, HEIGHT - PAD - (HEIGHT - 2 * PAD) * min(rate, top) / top)

    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(p.index, p.rate) for p in points))
    alarms = "".join(f'<circle class="alarm" cx="{xy(p.index, p.rate)[0]:.1f}" cy="{xy(p.index, p.rate)[1]:.1f}" '
                     f'r="3" fill="#d22"><title>case {p.index + 1}: {p.flags}/{p.n} flagged, '
                     f'p = {p.p_value:.2g}</title></circle>' for p in points if p.alarm)
    _, ya = xy(0, summary.alpha)
    ticks = "".join(f'<text x="{PAD - 6}" y="{xy(0, v)[1] + 3:.1f}" font-size="10" text-anchor="end">'
                    f'{100 * v:.0f} %</text>' for v in (0.0, top / 2, top))
    return (
        f'<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="rolling flag rate">'
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#444" />'
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#444" />{ticks}'
        f'<line class="alpha" x1="{PAD}" y1="{ya:.1f}" x2="{WIDTH - PAD}" y2="{ya:.1f}" stroke="#000" '
        f'stroke-dasharray="4,3" /><text x="{WIDTH - PAD + 2}" y="{ya + 3:.1f}" font-size="10">α</text>'
        f'<polyline class="rate" fill="none" stroke="#26c" stroke-width="1.5" points="{line}" />{alarms}'
        f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT - 8}" font-size="11" text-anchor="middle">case (log order); '
        f'rate over the last {summary.window} scored cases</text></svg>')


def groups_svg(summary: DriftSummary) -> str:
    """U of each scanner group as a strip of ticks on [0, 1], one row per group."""
    if not summary.groups:
        return ""
    row, left = 24, 260
    height = row * len(summary.groups) + 30

    def x(u: float) -> float:
        return left + (WIDTH - left - 20) * min(max(u, 0.0), 1.0)

    rows = []
    for i, g in enumerate(summary.groups):
        y = 16 + i * row
        ticks = "".join(f'<line x1="{x(u):.1f}" y1="{y - 7}" x2="{x(u):.1f}" y2="{y + 7}" stroke="#26c" />'
                        for u in g.uncertainties)
        rows.append(f'<text x="{left - 8}" y="{y + 4}" font-size="11" text-anchor="end">{html.escape(g.name)}'
                    f'</text><line x1="{x(0)}" y1="{y}" x2="{x(1)}" y2="{y}" stroke="#bbb" />{ticks}'
                    f'<line x1="{x(g.u_median):.1f}" y1="{y - 10}" x2="{x(g.u_median):.1f}" y2="{y + 10}" '
                    f'stroke="#000" stroke-width="2" />')
    return (f'<svg width="{WIDTH}" height="{height}" xmlns="http://www.w3.org/2000/svg" role="img" '
            f'aria-label="U per scanner">{"".join(rows)}'
            f'<text x="{x(0)}" y="{height - 4}" font-size="10">U = 0</text>'
            f'<text x="{x(1) - 24:.1f}" y="{height - 4}" font-size="10">U = 1</text></svg>')


def write_monitor_page(summary: DriftSummary, page: Path, *, log_name: str) -> Path:
    verdict = (f'<b class="alarm">flag rate significantly above α</b> (p = {summary.p_value:.2g} &lt; '
               f'{summary.significance:g})' if summary.alarm else
               f'<b class="ok">no significant excess</b> (p = {summary.p_value:.2g})')
    rows = "".join(
        f"<tr><td>{html.escape(g.name)}</td><td>{g.n}</td><td>{g.flags} ({100 * g.flags / g.n:.1f} %)</td>"
        f"<td>{g.u_median:.3f}</td><td>{g.u_mean:.3f}</td><td>{g.u_min:.3f} – {g.u_max:.3f}</td>"
        f"<td>{g.p_value:.2g}</td></tr>" for g in summary.groups)
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>segsentry drift watch — {html.escape(log_name)}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; }}
.alarm {{ color: #c00; }} .ok {{ color: #080; }}</style></head><body>
<h1>segsentry drift watch</h1>
<p>Log <code>{html.escape(log_name)}</code>: {summary.n_cases} case(s), {summary.n_scored} scored,
{summary.flags} flagged ({100 * summary.rate:.1f} %) against α = {summary.alpha:g}: {verdict}.
Binomial test: the probability of at least this many flags if every case were in distribution.</p>
<h2>Rolling flag rate</h2>{rolling_svg(summary)}
<h2>U per scanner / protocol</h2>{groups_svg(summary)}
<table><tr><th>manufacturer / model / kernel / slice thickness</th><th>cases</th><th>flagged</th>
<th>median U</th><th>mean U</th><th>range</th><th>binomial p</th></tr>{rows}</table>
</body></html>
"""
    write_text_atomic(page, doc)
    return page
