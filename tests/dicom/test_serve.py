"""``ood-serve`` against a real PACS: Orthanc in a private network namespace (tests/dicom/pacs.py), the node
as its own process in the same namespace, series sent with pynetdicom, results read back over Orthanc's REST
API. Everything listens and connects on 127.0.0.1 only."""

from __future__ import annotations

import io
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402

from dicom_series import ct_image, write_ct_series  # noqa: E402
from segsentry.dicom.pacs import ORTHANC_DICOM, NetNamespace, Orthanc, echo, namespace_problem  # noqa: E402
from segsentry.dicom.pacs import ServeProcess as Node  # noqa: E402
from segsentry.dicom.monitor import read_log  # noqa: E402
from segsentry.dicom.series import series_files, source_datasets  # noqa: E402
from segsentry.dicom.sr import read_verdict  # noqa: E402

_PROBLEM = namespace_problem() or (None if shutil.which("Orthanc") else "Orthanc is not installed "
                                   "(apt-get install orthanc; .ci/run does it)")
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    ns = NetNamespace()
    orthanc = None
    try:
        orthanc = Orthanc(ns, tmp_path_factory.mktemp("orthanc"))
        yield orthanc
    finally:
        if orthanc is not None:
            orthanc.stop()
        ns.close()


def _series(folder: Path, **info) -> tuple[list[Path], str, str]:
    write_ct_series(folder, **info)
    files = series_files(folder)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return files, first.StudyInstanceUID, first.SeriesInstanceUID


def test_a_series_becomes_seg_and_sr_in_orthanc(pacs, ct_pipeline, tmp_path):
    files, study, series = _series(tmp_path / "series", manufacturer="ACME", model_name="Scan 9", kernel="B30f")
    node = Node(pacs, ct_pipeline.ood_onnx, tmp_path / "work")
    try:
        assert node.send(files) == [0] * len(files)
        node.wait_answered([series])
    finally:
        assert node.stop() == 0
    found = pacs.results(study)
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
    out = tmp_path / "work" / study / series
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{series}.nii.gz")))
    assert mask.any()
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(found["SEG"][0])))
    sources = source_datasets(tmp_path / "series")
    back = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in sources], combine_segments=True)
    np.testing.assert_array_equal(back, mask)
    report = json.loads((out / f"{series}.json").read_text())
    verdict = read_verdict(pydicom.dcmread(io.BytesIO(found["SR"][0])))
    assert verdict["ood"] is report["ood"] and verdict["ood-u"] == pytest.approx(report["uncertainty"])
    entries, skipped = read_log(tmp_path / "work" / "monitor.jsonl")
    assert skipped == 0 and [e.key for e in entries] == [series]
    assert entries[0].scanner["manufacturer"] == "ACME" and entries[0].scanner["kernel"] == "B30f"
    assert entries[0].source == "ood-serve"
    assert not (tmp_path / "work" / ".incoming" / series).exists()  # received files go once answered


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the path-traversal UID below, on purpose
def test_malformed_datasets_and_a_dropped_association(pacs, ct_pipeline, tmp_path):
    files, study, series = _series(tmp_path / "series")
    node = Node(pacs, ct_pipeline.ood_onnx, tmp_path / "work", series_timeout=1.5)
    try:
        no_series = pydicom.dcmread(files[0])
        del no_series.SeriesInstanceUID
        traversal = pydicom.dcmread(files[1])
        traversal.SOPInstanceUID = "../../../etc/x"
        assert node.send(None, datasets=[no_series, traversal]) == [0xA900, 0xA900]
        assert node.send(files, abort_after=4) == [0, 0, 0, 0]  # then A-ABORT mid-series
        assert pacs.ns.call(echo) == 0  # still answering
        assert node.send(files) == [0] * len(files)  # the whole series again: duplicates replace themselves
        node.wait_answered([series])
    finally:
        assert node.stop() == 0
    state = json.loads((tmp_path / "work" / ".queue" / f"{series}.json").read_text())
    assert state["instances"] == len(files)
    found = pacs.results(study)
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
    assert not list((tmp_path / "work").rglob("x.dcm"))


def test_sigterm_keeps_the_queue_and_a_restart_answers_once(pacs, ct_pipeline, tmp_path):
    files, study, series = _series(tmp_path / "series")
    work = tmp_path / "work"
    node = Node(pacs, ct_pipeline.ood_onnx, work, series_timeout=2.0)
    try:
        node.send(files)
    finally:
        assert node.stop(signal.SIGTERM) == 0  # before the series timeout: received, not answered
    assert node.state(series) == "receiving"
    assert len(list((work / ".incoming" / series).glob("*.dcm"))) == len(files)
    assert pacs.results(study) == {"SEG": [], "SR": []}
    again = Node(pacs, ct_pipeline.ood_onnx, work, series_timeout=2.0)
    try:
        again.wait_answered([series])
    finally:
        assert again.stop() == 0
    found = pacs.results(study)
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1
    answered = [line for log in work.parent.glob("work-*.log") for line in log.read_text().splitlines()
                if f"series {series} answered" in line]
    assert len(answered) == 1, answered


@pytest.mark.slow
def test_kill_9_mid_queue_then_restart_answers_every_series_once(pacs, ct_pipeline, tmp_path):
    sent = [_series(tmp_path / f"s{i}") for i in range(6)]
    work = tmp_path / "work"
    node = Node(pacs, ct_pipeline.ood_onnx, work, series_timeout=0.5)
    try:
        for files, _, _ in sent:
            node.send(files)
        deadline = time.monotonic() + 120
        while node.state(sent[0][2]) != "done":  # kill while the rest are queued or running
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        code = node.stop(signal.SIGKILL)
    assert code == -signal.SIGKILL
    states = [node.state(s) for _, _, s in sent]
    assert states.count("done") < len(sent), states  # something was left to do
    again = Node(pacs, ct_pipeline.ood_onnx, work, series_timeout=0.5)
    try:
        again.wait_answered([s for _, _, s in sent])
    finally:
        assert again.stop() == 0
    for _, study, _ in sent:
        found = pacs.results(study)
        assert len(found["SEG"]) == 1 and len(found["SR"]) == 1, study
    entries, _ = read_log(work / "monitor.jsonl")
    assert sorted(e.key for e in entries) == sorted(s for _, _, s in sent)


def test_forwarding_retries_with_backoff_then_says_why(pacs, tmp_path, caplog):
    from segsentry.dicom.serve import ForwardTarget, ServeError, forward

    sr = tmp_path / "x.dcm"
    write_ct_series(tmp_path / "s", ct_image(shape_zyx=(2, 8, 8)))
    shutil.copy(series_files(tmp_path / "s")[0], sr)
    start = time.monotonic()
    with pytest.raises(ServeError, match="not established"):
        pacs.ns.call(forward, [sr], ForwardTarget("NOBODY", "127.0.0.1", 4999), calling_ae="SEGSENTRY",
                     retries=2, backoff_s=0.1)
    assert time.monotonic() - start >= 0.3  # 0.1 s, then 0.2 s
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2
    pacs.ns.call(forward, [sr], ForwardTarget("ORTHANC", "127.0.0.1", ORTHANC_DICOM), calling_ae="SEGSENTRY")
    assert len(pacs.get("/instances")) >= 1
    with pytest.raises(Exception, match="AE@HOST:PORT"):
        ForwardTarget.parse("ORTHANC:4242")
