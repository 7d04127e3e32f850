"""``--resume``: a case an earlier run of the same model left complete is skipped, anything else runs again."""

from __future__ import annotations

import json
import shutil

import pytest

from segsentry.runtime import run_batch


@pytest.fixture()
def first_run(ct_pipeline, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for files in ct_pipeline.cases.values():
        for f in files:
            shutil.copy(f, inputs / f.name)
    out = tmp_path / "out"
    result = run_batch(ct_pipeline.ood_onnx, [inputs], out, backend="onnxruntime", threads=1)
    assert all(o.status == "ok" for o in result.outcomes)
    return inputs, out, result


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "summary.csv"
            and p.name != "qa.html"}


def test_a_complete_run_is_skipped_and_summarised_as_before(ct_pipeline, first_run):
    inputs, out, first = first_run
    summary, page, before = (out / "summary.csv").read_text(), (out / "qa.html").read_text(), _mtimes(out)
    again = run_batch(ct_pipeline.ood_onnx, [inputs], out, backend="onnxruntime", threads=1, resume=True)
    assert [o.resumed for o in again.outcomes] == [True] * len(first.outcomes)
    assert [o.report for o in again.outcomes] == [o.report for o in first.outcomes]  # read back == written
    assert [o.qa_view for o in again.outcomes] == [o.qa_view for o in first.outcomes]
    assert _mtimes(out) == before  # nothing rewritten
    assert (out / "summary.csv").read_text() == summary
    assert (out / "qa.html").read_text() == page


def test_incomplete_or_foreign_cases_run_again(ct_pipeline, first_run):
    inputs, out, first = first_run
    a, b, c, d = sorted(ct_pipeline.cases)[:4]
    (out / "qa" / f"{a}_coronal_mask.png").unlink()  # its QA images are missing
    report = json.loads((out / f"{b}.json").read_text())
    (out / f"{b}.json").write_text(json.dumps({**report, "model_sha256": "0" * 64}))  # another model's
    (out / f"{c}.json").write_text("{ truncated")  # unreadable
    (out / f"{d}.nii.gz").unlink()  # mask gone
    again = run_batch(ct_pipeline.ood_onnx, [inputs], out, backend="onnxruntime", threads=1, resume=True)
    rerun = {o.case_id for o in again.outcomes if not o.resumed}
    assert rerun == {a, b, c, d}
    assert all(o.status == "ok" for o in again.outcomes)
    assert (out / "qa" / f"{a}_coronal_mask.png").is_file() and (out / f"{d}.nii.gz").is_file()
    assert json.loads((out / f"{b}.json").read_text())["model_sha256"] == report["model_sha256"]


def test_without_resume_every_case_runs(ct_pipeline, first_run):
    inputs, out, _ = first_run
    before = _mtimes(out)
    again = run_batch(ct_pipeline.ood_onnx, [inputs], out, backend="onnxruntime", threads=1)
    assert not any(o.resumed for o in again.outcomes)
    after = _mtimes(out)
    assert all(after[f"{case}.json"] != before[f"{case}.json"] for case in ct_pipeline.cases)


def test_the_cli_flag(ct_pipeline, first_run):
    from typer.testing import CliRunner

    from segsentry.cli import run_app

    inputs, out, _ = first_run
    before = _mtimes(out)
    result = CliRunner().invoke(run_app, [str(ct_pipeline.ood_onnx), str(inputs), "-o", str(out), "--resume",
                                          "--backend", "onnxruntime", "--json"])
    assert result.exit_code in (0, 3), result.output
    assert _mtimes(out) == before
