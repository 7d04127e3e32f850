"""``run_batch(prefetch=True)``: the next case is read and preprocessed in one background thread, and nothing a
run writes or reports (but its timings) tells the two apart; a bad case stays a failed row in its place, and
the thread never outlives the batch."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from pathlib import Path

import pytest

from segsentry.runtime import batch
from segsentry.runtime.batch import PREFETCH_THREAD, run_batch

TIMED = {"timings_s", "seconds", "total_seconds"}


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(PREFETCH_THREAD)]


@pytest.fixture()
def inputs(ct_pipeline, tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for files in ct_pipeline.cases.values():
        for f in files:
            shutil.copy(f, folder / f.name)
    return folder


def _untimed(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMED}


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _summary_rows(out: Path) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_outputs_are_the_serial_runs_byte_for_byte(ct_pipeline, inputs, tmp_path):
    seen: dict[bool, list[str]] = {True: [], False: []}
    for prefetch in (False, True):
        run_batch(ct_pipeline.ood_onnx, [inputs], tmp_path / str(prefetch), backend="onnxruntime", threads=1,
                  prefetch=prefetch, on_case=lambda o, p=prefetch: seen[p].append(o.case_id))
    serial, ahead = _files(tmp_path / "False"), _files(tmp_path / "True")
    assert serial.keys() == ahead.keys()
    assert seen[True] == seen[False] == sorted(ct_pipeline.cases)
    for name in serial:
        if name.endswith(".json"):  # the reports name their own folder's files
            here = json.loads(ahead[name].decode().replace(str(tmp_path / "True"), str(tmp_path / "False")))
            assert _untimed(here) == _untimed(json.loads(serial[name])), name
        elif name not in ("summary.csv", "qa.html"):  # masks, maps, QA images
            assert ahead[name] == serial[name], name
    assert _summary_rows(tmp_path / "True") == _summary_rows(tmp_path / "False")
    assert any(n.endswith("_uncertainty.nii.gz") for n in serial) and any(n.endswith(".png") for n in serial)


def test_the_next_case_is_read_in_the_background_thread(ct_pipeline, inputs, tmp_path, monkeypatch):
    where: dict[bool, set[str]] = {True: set(), False: set()}
    real = batch.read_stage
    for prefetch in (False, True):
        def read_stage(*args, p=prefetch, **kwargs):
            where[p].add(threading.current_thread().name.split("_")[0])
            return real(*args, **kwargs)

        monkeypatch.setattr(batch, "read_stage", read_stage)
        run_batch(ct_pipeline.ood_onnx, [inputs], tmp_path / str(prefetch), backend="onnxruntime", threads=1,
                  qa=False, prefetch=prefetch)
    assert where == {False: {"MainThread"}, True: {PREFETCH_THREAD}}
    assert not _prefetch_threads()


def test_a_failing_middle_case_is_its_own_row_in_order(ct_pipeline, inputs, tmp_path):
    cases = sorted(ct_pipeline.cases)
    bad = cases[1]
    (inputs / f"{bad}_0000.nii.gz").write_bytes(b"not a NIfTI file")
    seen: list[str] = []
    during: list[int] = []

    def on_case(outcome):
        seen.append(outcome.case_id)
        during.append(len(_prefetch_threads()))

    result = run_batch(ct_pipeline.ood_onnx, [inputs], tmp_path / "out", backend="onnxruntime", threads=1,
                       qa=False, prefetch=True, on_case=on_case)
    assert [o.case_id for o in result.outcomes] == seen == cases
    assert [o.status for o in result.outcomes] == ["ok", "failed", "ok", "ok"]
    assert result.outcomes[1].error and result.outcomes[1].report is None
    assert [row["case"] for row in _summary_rows(tmp_path / "out")] == cases
    assert not (tmp_path / "out" / f"{bad}.json").exists()
    assert during[0] == 1  # the thread ran while the batch did ...
    assert not _prefetch_threads()  # ... and is gone after it


def test_an_unexpected_error_or_interrupt_leaves_no_thread(ct_pipeline, inputs, tmp_path, monkeypatch):
    cases = sorted(ct_pipeline.cases)
    real = batch.preprocess

    def preprocess(image, *args, **kwargs):
        if threading.current_thread().name.startswith(PREFETCH_THREAD) and len(started) == 2:
            raise RuntimeError("a bug in preprocessing")
        return real(image, *args, **kwargs)

    started: list[str] = []
    real_read = batch.read_stage

    def read_stage(case, *args, **kwargs):
        started.append(case.case_id)
        return real_read(case, *args, **kwargs)

    monkeypatch.setattr(batch, "preprocess", preprocess)
    monkeypatch.setattr(batch, "read_stage", read_stage)
    with pytest.raises(RuntimeError, match="a bug in preprocessing"):  # --debug: the bug is raised, in order
        run_batch(ct_pipeline.ood_onnx, [inputs], tmp_path / "debug", backend="onnxruntime", threads=1, qa=False,
                  prefetch=True, raise_unexpected=True)
    assert not _prefetch_threads()
    assert (tmp_path / "debug" / f"{cases[0]}.json").is_file()  # the case before it was finished and written

    def interrupt(outcome):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "preprocess", real)
    with pytest.raises(KeyboardInterrupt):
        run_batch(ct_pipeline.ood_onnx, [inputs], tmp_path / "interrupted", backend="onnxruntime", threads=1,
                  qa=False, prefetch=True, on_case=interrupt)
    assert not _prefetch_threads()
    assert sorted(p.name for p in (tmp_path / "interrupted").glob("*.json")) == [f"{cases[0]}.json"]


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-prefetch"], False)])
def test_the_cli_flag(flag, expected, ct_pipeline, inputs, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import segsentry.runtime
    from segsentry.cli import run_app

    asked: list[bool] = []

    def recording(*args, prefetch, **kwargs):
        asked.append(prefetch)
        return run_batch(*args, prefetch=prefetch, **kwargs)

    monkeypatch.setattr(segsentry.runtime, "run_batch", recording)
    result = CliRunner().invoke(run_app, [str(ct_pipeline.ood_onnx), str(inputs), "-o", str(tmp_path / "out"),
                                          "--backend", "onnxruntime", "--no-qa", *flag])
    assert result.exit_code in (0, 3), result.output
    assert asked == [expected]
