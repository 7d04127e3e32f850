"""The report's text from a hand-built view: no model, no files."""

from __future__ import annotations

import numpy as np

from segsentry.evaluation.render import (
    MethodDistribution,
    ReportView,
    ScenarioView,
    report_html,
    report_markdown,
    scatter_svg,
)


def _view(mc_dropout=None) -> ReportView:
    rows = [{"method": "mahalanobis", "esce": 0.1234, "error": 0.25, "fpr": 0.5, "auc": 0.875, "threshold": 0.4},
            {"method": "energy", "esce": None, "error": 0.5, "fpr": 1.0, "auc": 0.5, "threshold": -3.0}]
    scenario = ScenarioView(name="a<b", rows=rows, n_id=2, n_ood=1, mean_dice_id=0.9, mean_dice_ood=None,
                            points=[(0.2, 0.3, False), (0.1, 0.95, True)], threshold=0.4)
    dist = MethodDistribution(key="mahalanobis", label="Mahalanobis U",
                              values=[("id", np.array([0.1, 0.3])), ("a<b", np.array([0.2]))],
                              summaries={"id": {"median": 0.2, "q1": 0.15, "q3": 0.25},
                                         "a<b": {"median": 0.2, "q1": 0.2, "q3": 0.2}}, threshold=0.3)
    ablation = [{"layer": "encoder.stages.3 (D=8)", "key": "mahalanobis", "a<b": {"auc": 0.75, "fpr": 0.0}}]
    return ReportView(bundle_name="m.ood.onnx", groups=["id", "a<b"], scenarios=[scenario], ablation=ablation,
                      distributions=[dist], mc_dropout=mc_dropout)


def test_markdown_tables():
    md = report_markdown(_view()).splitlines()
    assert md[0] == "# ood-eval: m.ood.onnx"
    assert md[2] == "## a<b (ID: 2 cases, OOD: 1 cases; mean Dice ID 0.900, OOD –)"
    assert "| mahalanobis | 0.123 | 0.250 | 0.500 | 0.875 |" in md
    assert "| energy | – | 0.500 | 1.000 | 0.500 |" in md
    assert "| encoder.stages.3 (D=8) | 0.750 / 0.000 |" in md
    assert "| Mahalanobis U | 0.2 [0.15–0.25] | 0.2 [0.2–0.2] |" in md
    assert md[-1].startswith("Scenario tables (the paper's protocol)") and "MC dropout" not in md[-1]
    assert report_markdown(_view((0.5, 3))).splitlines()[-1].endswith(
        "; MC dropout: p = 0.5 after every encoder stage, 3 passes.")


def test_html_escapes_names_and_draws_one_figure_per_scenario_and_method():
    page = report_html(_view())
    assert "a<b" not in page and "<h2>a&lt;b</h2>" in page
    assert page.count("<svg") == 2  # scatter + one distribution
    assert page.endswith("</body></html>\n")


def test_scatter_colours_id_and_ood_and_shades_below_the_threshold():
    svg = scatter_svg([(0.2, 0.3, False), (0.1, 0.95, True)], 0.5, "t")
    assert svg.count('fill="#d33"') == 1 and svg.count('fill="#2a7"') == 1
    assert 'width="144.0"' in svg  # shaded quadrant: U from 0 to the threshold on a 288 px axis
