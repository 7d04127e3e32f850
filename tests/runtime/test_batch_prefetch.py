"""``run_batch(prefetch=True, write_behind=True)``: the next case is read and preprocessed in one background
thread, the last one written in another, and nothing a run writes or reports (but its timings) tells them from
a serial run; a bad case stays a failed row in its place, and no thread outlives the batch."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from pathlib import Path

import pytest

from segsentry.runtime import batch
from segsentry.runtime.batch import PREFETCH_THREAD, WRITER_THREAD, run_batch

TIMED = {"timings_s", "seconds", "total_seconds"}


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(PREFETCH_THREAD)]


def _batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith((PREFETCH_THREAD, WRITER_THREAD))]


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


OVERLAPS = {"serial": (False, False), "prefetch": (True, False), "write-behind": (False, True), "both": (True, True)}


def test_outputs_are_the_serial_runs_byte_for_byte(ct_pipeline, inputs, tmp_path):
    seen: dict[str, list[str]] = {}
    for name in ("serial", "write-behind", "both"):
        prefetch, write_behind = OVERLAPS[name]
        seen[name] = []
        run_batch(ct_pipeline.ood_onnx, [inputs], tmp_path / name, backend="onnxruntime", threads=1,
                  prefetch=prefetch, write_behind=write_behind, on_case=lambda o, n=name: seen[n].append(o.case_id))
    serial = _files(tmp_path / "serial")
    assert any(n.endswith("_uncertainty.nii.gz") for n in serial) and any(n.endswith(".png") for n in serial)
    for name in ("write-behind", "both"):
        overlapped = _files(tmp_path / name)
        assert overlapped.keys() == serial.keys(), name
        assert seen[name] == seen["serial"] == sorted(ct_pipeline.cases)
        for file in serial:
            if file.endswith(".json"):  # the reports name their own folder's files
                here = json.loads(overlapped[file].decode().replace(str(tmp_path / name), str(tmp_path / "serial")))
                assert _untimed(here) == _untimed(json.loads(serial[file])), (name, file)
            elif file not in ("summary.csv", "qa.html"):  # masks, maps, QA images
                assert overlapped[file] == serial[file], (name, file)
        assert _summary_rows(tmp_path / name) == _summary_rows(tmp_path / "serial")
    assert not _batch_threads()


def test_the_next_case_is_read_in_the_background_thread(ct_pipeline, inputs, tmp_path, monkeypatch):
    where: dict[bool, set[str]] = {True: set(), False: set()}
    real = batch.read_stage
    for prefetch in (False, True):
        def read_stage(*args, p=prefetch, **kwargs):
            where[p].add(threading.current_thread().name.split("_")[0])
            return real(*args, **kwargs)

        monkeypatch.setattr(batch, "read_stage", read_stage)
        run_batch(ct_pipeline.ood_onnx, [inputs], tmp_path / str(prefetch), backend="onnxruntime", threads=1,
                  qa=False, prefetch=prefetch, write_behind=False)
    assert where == {False: {"MainThread"}, True: {PREFETCH_THREAD}}
    assert not _prefetch_threads()


def test_a_case_is_written_in_the_writer_thread_while_the_next_is_inferred(ct_pipeline, inputs, tmp_path,
                                                                           monkeypatch):
    cases = sorted(ct_pipeline.cases)
    inferring = {case: threading.Event() for case in cases}
    real_infer, real_write = batch.infer_volume_for_case, batch.write_case
    order: list[str] = []

    def infer_volume_for_case(*args, **kwargs):
        current = cases[sum(e.is_set() for e in inferring.values())]
        inferring[current].set()
        order.append(f"infer {current}")
        return real_infer(*args, **kwargs)

    def write_case(case, *args, **kwargs):
        order.append(f"write {case.case_id} in {threading.current_thread().name.split('_')[0]}")
        following = cases.index(case.case_id) + 1
        if following < len(cases):  # the next case's inference starts while this one is still being written
            assert inferring[cases[following]].wait(timeout=60), f"{cases[following]} waited for {case.case_id}"
        return real_write(case, *args, **kwargs)

    monkeypatch.setattr(batch, "infer_volume_for_case", infer_volume_for_case)
    monkeypatch.setattr(batch, "write_case", write_case)
    result = run_batch(ct_pipeline.ood_onnx, [inputs], tmp_path / "out", backend="onnxruntime", threads=1,
                       qa=False, prefetch=False, write_behind=True)
    assert [o.status for o in result.outcomes] == ["ok"] * len(cases)
    assert [o.case_id for o in result.outcomes] == cases
    assert sorted(order, key=lambda e: e.split()[0] == "write") == [f"infer {c}" for c in cases] + [
        f"write {c} in {WRITER_THREAD}" for c in cases]
    assert order[:3] == [f"infer {cases[0]}", f"infer {cases[1]}", f"write {cases[0]} in {WRITER_THREAD}"] or \
        order[:3] == [f"infer {cases[0]}", f"write {cases[0]} in {WRITER_THREAD}", f"infer {cases[1]}"]
    assert not _batch_threads()


def test_a_failing_write_is_its_own_row_in_order(ct_pipeline, inputs, tmp_path):
    cases = sorted(ct_pipeline.cases)
    seen: list[str] = []

    def hook(written):
        if written.case.case_id == cases[1]:
            raise OSError("disk full")
        return {}

    result = run_batch(ct_pipeline.ood_onnx, [inputs], tmp_path / "out", backend="onnxruntime", threads=1,
                       qa=False, write_behind=True, case_hooks=[hook], on_case=lambda o: seen.append(o.case_id))
    assert [o.case_id for o in result.outcomes] == seen == cases
    assert [o.status for o in result.outcomes] == ["ok", "failed", "ok", "ok"]
    assert "disk full" in result.outcomes[1].error
    out = tmp_path / "out"
    assert not any(p.name.startswith(cases[1]) for p in out.iterdir())  # nothing of the failed case ...
    assert not any(p.name.startswith(f".{cases[1]}") for p in out.iterdir())  # ... not even its stage folder
    assert all((out / f"{c}.json").is_file() for c in cases if c != cases[1])
    assert not _batch_threads()


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
                  qa=False, prefetch=True, write_behind=True, on_case=interrupt)
    assert not _batch_threads()
    # the first case was written; the second was inferred meanwhile but never written, not even in part
    assert sorted(p.name for p in (tmp_path / "interrupted").iterdir()) == sorted(
        f"{cases[0]}{ending}" for ending in (".json", ".nii.gz", "_uncertainty.nii.gz"))


@pytest.mark.parametrize(("flag", "expected"), [
    ([], (True, False)), (["--no-prefetch"], (False, False)), (["--write-behind"], (True, True))])
def test_the_cli_flags(flag, expected, ct_pipeline, inputs, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import segsentry.runtime
    from segsentry.cli import run_app

    asked: list[tuple[bool, bool]] = []

    def recording(*args, prefetch, write_behind, **kwargs):
        asked.append((prefetch, write_behind))
        return run_batch(*args, prefetch=prefetch, write_behind=write_behind, **kwargs)

    monkeypatch.setattr(segsentry.runtime, "run_batch", recording)
    result = CliRunner().invoke(run_app, [str(ct_pipeline.ood_onnx), str(inputs), "-o", str(tmp_path / "out"),
                                          "--backend", "onnxruntime", "--no-qa", *flag])
    assert result.exit_code in (0, 3), result.output
    assert asked == [expected]
