"""ood-run on a real local Ray instance (one per module: Ray starts in seconds, not milliseconds).

Oracle: the serial run (``segsentry.runtime.run_batch``) of the same bundle, cases and engine threads. With the
same engine settings the masks and uncertainty maps must be byte-identical files, the reports identical except
their timings (and the output folder in ``outputs``), the summary identical except its seconds column.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from factory import run_with_blocked_imports, skip_without_native_bf16
from segsentry.errors import SegsentryError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray (segsentry[distributed]) "
                                "is not installed")

RAY_CPUS = 3  # logical: two engine actors of one CPU plus one CPU for the read and write tasks
THREADS = 1


@pytest.fixture(scope="module")
def ray_instance():
    from segsentry.distributed import ray_session

    with ray_session("local", num_cpus=RAY_CPUS) as ray:
        yield ray  # ray.shutdown() on exit stops exactly the processes this ray.init started


@pytest.fixture(scope="module")
def cohort(ct_pipeline, tmp_path_factory):
    """Five CT cases (the training cases and a held-out one) and one that cannot be read."""
    import shutil

    root = tmp_path_factory.mktemp("ray_cohort")
    for files in ct_pipeline.cases.values():
        for f in files:
            shutil.copy(f, root / f.name)
    (root / "broken_0000.nii.gz").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def serial(ct_pipeline, cohort, tmp_path_factory):
    from segsentry.runtime import run_batch

    out = tmp_path_factory.mktemp("serial")
    result = run_batch(ct_pipeline.ood_onnx, [cohort], out, backend="onnxruntime", threads=THREADS)
    return out, result


def _ray_run(ct_pipeline, cohort, out, **kwargs):
    from segsentry.distributed import RayOptions, run_batch_ray

    options = kwargs.pop("ray_options", RayOptions(workers=2, cpus_per_worker=THREADS))
    return run_batch_ray(ct_pipeline.ood_onnx, [cohort], out, ray_options=options, backend="onnxruntime", **kwargs)


def _without_timings(path: Path, out: Path) -> dict:
    report = json.loads(path.read_text())
    assert set(report["timings_s"]) == {"read", "preprocess", "inference", "scoring", "resample_back", "write",
                                        "total"}
    report.pop("timings_s")
    report["outputs"] = {k: str(Path(v).relative_to(out)) for k, v in report["outputs"].items()}
    return report


def _summary(out: Path) -> list[dict]:
    rows = list(csv.DictReader((out / "summary.csv").open()))
    for row in rows:
        assert float(row.pop("seconds")) >= 0
    return rows


def assert_same_outputs(serial_out: Path, ray_out: Path) -> None:
    files = sorted(p.relative_to(serial_out) for p in serial_out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ray_out) for p in ray_out.rglob("*") if p.is_file())
    assert any(f.name.endswith("_uncertainty.nii.gz") for f in files)
    for f in files:
        if f.suffix == ".json" and f.parent.name == "qa":  # the QA views' records (read back by --resume)
            assert json.loads((serial_out / f).read_text()) == json.loads((ray_out / f).read_text()), f
        elif f.suffix == ".json":
            assert _without_timings(serial_out / f, serial_out) == _without_timings(ray_out / f, ray_out), f
        elif f.name != "summary.csv":  # images, QA PNGs and the QA page
            assert (serial_out / f).read_bytes() == (ray_out / f).read_bytes(), f
    assert _summary(serial_out) == _summary(ray_out)


def test_ray_run_equals_the_serial_run(ct_pipeline, cohort, serial, ray_instance, tmp_path):
    serial_out, serial_result = serial
    result = _ray_run(ct_pipeline, cohort, tmp_path / "ray")
    assert [o.case_id for o in result.outcomes] == [o.case_id for o in serial_result.outcomes]
    assert [o.status for o in result.outcomes].count("ok") == len(ct_pipeline.cases)
    broken = [o for o in result.outcomes if o.status == "failed"]
    assert [o.case_id for o in broken] == ["broken"]
    assert broken[0].error == serial_result.failed[0].error and "cannot read" in broken[0].error
    assert result.exit_code() == serial_result.exit_code() == 1
    assert result.backend == "onnxruntime"
    assert_same_outputs(serial_out, tmp_path / "ray")


@pytest.mark.parametrize("max_retries", [2, 0])
def test_a_killed_engine_worker_loses_and_duplicates_nothing(ct_pipeline, cohort, serial, ray_instance, tmp_path,
                                                             max_retries):
    """One actor, SIGKILLed while it infers a case: Ray restarts it, the case is inferred again, every case is
    written once, no temporary folder is left, and the outputs are the serial run's. Without retries the case
    is reported failed (not retried) and the batch goes on with the restarted actor."""
    from segsentry.distributed import RayOptions

    ray = ray_instance
    killed: list[tuple[int, str]] = []
    seen: list[str] = []

    def kill_once(outcome) -> None:
        seen.append(outcome.case_id)
        if killed:
            return
        actor = ray.get_actor(f"kill-test-{max_retries}-engine-0")
        for _ in range(400):  # the next case is being inferred within moments of the previous one finishing
            pid, _, busy = ray.get(actor.status.options(concurrency_group="control").remote())
            if busy is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, busy))
                return
            time.sleep(0.005)

    out = tmp_path / "ray"
    result = _ray_run(ct_pipeline, cohort, out, on_case=kill_once,
                      ray_options=RayOptions(workers=1, cpus_per_worker=THREADS, name=f"kill-test-{max_retries}",
                                             max_retries=max_retries))
    assert len(killed) == 1, "no case was being inferred when the test tried to kill the worker"
    victim = killed[0][1]
    assert victim in ct_pipeline.cases
    assert sorted(seen) == sorted(o.case_id for o in serial[1].outcomes)  # every case reported exactly once
    assert not list(out.rglob("*.partial-*"))
    if max_retries:
        assert [o.status for o in result.outcomes].count("ok") == len(ct_pipeline.cases)
        assert_same_outputs(serial[0], out)
        return
    failed = {o.case_id: o.error for o in result.outcomes if o.status == "failed"}
    assert set(failed) == {"broken", victim}
    assert "the Ray worker running it died, 1 time(s)" in failed[victim]
    assert not list(out.glob(f"{victim}[._]*"))  # nothing written for it
    for case in set(ct_pipeline.cases) - {victim}:
        assert (out / f"{case}.nii.gz").read_bytes() == (serial[0] / f"{case}.nii.gz").read_bytes()


def test_resume_skips_complete_cases_and_reruns_incomplete_ones(ct_pipeline, cohort, serial, ray_instance, tmp_path):
    out = tmp_path / "ray"
    _ray_run(ct_pipeline, cohort, out)
    victim = sorted(ct_pipeline.cases)[0]
    (out / f"{victim}_uncertainty.nii.gz").unlink()
    result = _ray_run(ct_pipeline, cohort, out, resume=True)
    resumed = {o.case_id for o in result.outcomes if o.resumed}
    assert resumed == set(ct_pipeline.cases) - {victim}  # the failed case and the incomplete one ran again
    assert_same_outputs(serial[0], out)


def test_a_cluster_too_small_for_the_workers_is_refused(ct_pipeline, cohort, ray_instance, tmp_path):
    from segsentry.distributed import RayOptions

    with pytest.raises(SegsentryError, match="not enough for 3 worker"):
        _ray_run(ct_pipeline, cohort, tmp_path / "ray", ray_options=RayOptions(workers=3))


def _listening(pids: set[int]) -> list[str]:
    """``host:port`` of every TCP socket in the LISTEN state that one of ``pids`` holds."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                host, port = fields[1].split(":")
                raw = bytes.fromhex(host)
                if len(raw) == 4:
                    ip = socket.inet_ntop(socket.AF_INET, struct.pack("<I", int(host, 16)))
                else:
                    ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                found.append(f"{ip}:{int(port, 16)}")
    return found


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_the_local_instance_listens_on_loopback_only(ray_instance):
    listening = _listening(_descendants(os.getpid()) | {os.getpid()})
    assert len(listening) >= 3, listening  # the GCS, the raylet and the object manager at least
    assert all(a.startswith(("127.0.0.1:", "::ffff:127.0.0.1:", "::1:")) for a in listening), listening


def test_without_ray_the_error_names_the_extra(ct_pipeline, tmp_path):
    done = run_with_blocked_imports(["ray"], f"""
        from typer.testing import CliRunner
        from segsentry.cli import run_app
        result = CliRunner().invoke(run_app, [{str(ct_pipeline.ood_onnx)!r}, {str(ct_pipeline.images)!r},
                                              "-o", {str(tmp_path / 'out')!r}, "--ray", "local"])
        print("EXIT", result.exit_code)
        print(result.output)
    """)
    assert "EXIT 1" in done.stdout, done.stdout + done.stderr
    assert "segsentry[distributed]" in done.stdout and "ray" in done.stdout


@pytest.mark.parametrize("address", ["", "nowhere", "  "])
def test_an_address_that_is_none_is_refused_before_ray_starts(address):
    from segsentry.distributed import ray_session

    with pytest.raises(SegsentryError, match="give 'local'"):
        with ray_session(address):
            pass


def test_a_gpu_backend_reserves_a_gpu_per_worker(ct_pipeline, cohort, ray_instance, tmp_path):
    from segsentry.distributed import RayOptions, run_batch_ray

    with pytest.raises(SegsentryError, match=r"0 GPU\(s\): not enough for 1 worker\(s\) × 1 CPU × 1 GPU"):
        run_batch_ray(ct_pipeline.ood_onnx, [cohort], tmp_path / "ray", backend="tensorrt",
                      ray_options=RayOptions(workers=1))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="needs a backend that is not installed")
def test_an_engine_that_cannot_be_built_stops_the_batch_with_its_reason(ct_pipeline, cohort, ray_instance, tmp_path):
    from segsentry.distributed import RayOptions, run_batch_ray

    with pytest.raises(SegsentryError, match=r"engine cannot be built on a Ray worker: .*segsentry\[trt\]"):
        run_batch_ray(ct_pipeline.ood_onnx, [cohort], tmp_path / "ray", backend="tensorrt",
                      ray_options=RayOptions(workers=1, gpus_per_worker=0))
    assert not (tmp_path / "ray" / "summary.csv").exists()


def test_the_precision_reaches_the_engine_workers(ct_pipeline, ray_instance, tmp_path):
    """--precision goes to the actors' engines: OpenVINO bf16 is named in the report's notes, as in a serial run."""
    skip_without_native_bf16()
    from segsentry.distributed import RayOptions, run_batch_ray

    case = next(iter(ct_pipeline.cases.values()))
    result = run_batch_ray(ct_pipeline.ood_onnx, case, tmp_path / "ray", backend="openvino", precision="bf16",
                           ray_options=RayOptions(workers=1, cpus_per_worker=THREADS), qa=False)
    (outcome,) = result.outcomes
    assert outcome.status == "ok", outcome.error
    assert any("the network ran in bf16" in note for note in outcome.report.notes), outcome.report.notes
