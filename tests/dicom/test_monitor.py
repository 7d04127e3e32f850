"""Drift watch: the exact binomial tail against scipy, the rolling flag-rate alarm, the log and the page."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from segsentry.cli import app
from segsentry.dicom.monitor import MonitorEntry, append_entry, binomial_sf, read_log, summarise
from segsentry.errors import InputError


@pytest.mark.parametrize("n,p", [(1, 0.05), (20, 0.05), (50, 0.1), (400, 0.05), (3000, 0.01)])
def test_binomial_tail_matches_scipy(n, p):
    stats = pytest.importorskip("scipy.stats")
    for k in sorted({0, 1, 2, n // 10, n // 3, n - 1, n}):
        expected = float(stats.binom.sf(k - 1, n, p))
        assert binomial_sf(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-300), (k, n, p)


def _entry(i: int, ood: bool, scanner: str, alpha: float = 0.05) -> MonitorEntry:
    return MonitorEntry(time=f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}+00:00", case=f"c{i}", key=f"k{i}",
                        uncertainty=0.9 if ood else 0.1 + 0.001 * (i % 50), ood=ood, threshold=0.5, alpha=alpha,
                        scanner={"manufacturer": scanner, "model": "M", "kernel": "B30f", "slice_thickness": "1"})


def _drifting_log() -> list[MonitorEntry]:
    """200 cases at 5 % flags from scanner A, then 40 at 50 % from scanner B (a new protocol)."""
    return ([_entry(i, i % 20 == 19, "A") for i in range(200)]
            + [_entry(200 + i, i % 2 == 1, "B") for i in range(40)])


def test_the_rolling_rate_alarms_only_after_the_drift():
    summary = summarise(_drifting_log(), window=50, significance=0.01)
    assert summary.alpha == 0.05 and summary.n_scored == 240 and summary.flags == 10 + 20
    assert not any(p.alarm for p in summary.rolling[:200])
    first = next(p.index for p in summary.rolling if p.alarm)
    assert 200 < first < 220, first  # found within 20 cases of the change
    assert summary.rolling[-1].alarm and summary.alarm
    a, b = summary.groups
    assert (a.name, a.n, a.flags) == ("A / M / B30f / 1 mm", 200, 10) and a.p_value > 0.3
    assert (b.n, b.flags) == (40, 20) and b.p_value < 1e-8
    assert b.u_median > a.u_median


def test_alpha_comes_from_the_log_or_the_caller():
    entries = [_entry(i, False, "A", alpha=0.1) for i in range(5)]
    assert summarise(entries).alpha == 0.1
    assert summarise(entries, alpha=0.2).alpha == 0.2
    unscored = [MonitorEntry(time="t", case="c", key="k", uncertainty=None, ood=None, threshold=None, alpha=None)]
    with pytest.raises(InputError, match="pass --alpha"):
        summarise(unscored)


def test_the_log_keeps_one_line_per_key_and_skips_broken_lines(tmp_path):
    log = tmp_path / "monitor.jsonl"
    append_entry(log, _entry(0, False, "A"))
    append_entry(log, _entry(1, False, "A"))
    with open(log, "a") as handle:
        handle.write('{"half a line\n')
    append_entry(log, _entry(0, True, "A"))  # k0 answered again after a restart: the last answer counts
    entries, skipped = read_log(log)
    assert skipped == 1
    assert [(e.key, e.ood) for e in entries] == [("k1", False), ("k0", True)]


def test_monitor_command_prints_and_writes_the_page(tmp_path):
    log = tmp_path / "monitor.jsonl"
    for entry in _drifting_log():
        append_entry(log, entry)
    result = CliRunner().invoke(app, ["monitor", str(log), "-o", str(tmp_path / "drift.html")])
    text = " ".join(result.output.split())
    assert result.exit_code == 0, text
    assert "significantly above alpha" in text and "not significantly" not in text
    page = (tmp_path / "drift.html").read_text()
    assert page.count("<svg") == 2 and 'class="rate"' in page and 'class="alpha"' in page
    assert page.count('class="alarm"') > 1 and "A / M / B30f / 1 mm" in page
    missing = CliRunner().invoke(app, ["monitor", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 1 and "cannot read the monitoring log" in " ".join(missing.output.split())


def test_ood_run_appends_one_line_per_case(ct_pipeline, test_cases, tmp_path):
    files = [f for fs in test_cases["ct"].values() for f in fs]
    log = tmp_path / "logs" / "monitor.jsonl"
    result = CliRunner().invoke(app, ["run", str(ct_pipeline.ood_onnx), *map(str, files), "-o", str(tmp_path / "out"),
                                      "--no-qa", "--monitor-log", str(log)])
    assert result.exit_code in (0, 3), result.output
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["case"] for line in lines] == list(test_cases["ct"])
    reports = {c: json.loads((tmp_path / "out" / f"{c}.json").read_text()) for c in test_cases["ct"]}
    for line in lines:
        assert line["uncertainty"] == reports[line["case"]]["uncertainty"]
        assert line["ood"] == reports[line["case"]]["ood"] and line["source"] == "ood-run"
        assert line["scanner"] == {} and line["alpha"] == 0.05  # NIfTI input; the paper rule's 5 %
