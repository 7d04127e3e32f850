"""DICOM SEG and SR from ``ood-run --dicom-seg``: read back with highdicom onto the source grid, checked with
dciodvfy where dicom3tools is installed."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

pytest.importorskip("highdicom")
import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402

from dicom_series import ct_image, write_ct_series  # noqa: E402
from factory import run_with_blocked_imports  # noqa: E402
from segsentry.cli import app  # noqa: E402
from segsentry.dicom.outputs import DicomResultWriter  # noqa: E402
from segsentry.dicom.seg import Producer, build_seg  # noqa: E402
from segsentry.dicom.series import series_files, source_datasets  # noqa: E402
from segsentry.dicom.sr import read_verdict  # noqa: E402
from segsentry.errors import InputError  # noqa: E402
from segsentry.runtime import run_batch  # noqa: E402

PRODUCER = Producer(bundle_name="tiny.ood.onnx", bundle_sha256="ab" * 32, weights_sha256="cd" * 32)


def test_written_series_reads_back_with_its_geometry(tmp_path):
    image = ct_image()
    folder = write_ct_series(tmp_path / "series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series_files(folder)])
    back = reader.Execute()
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    datasets = source_datasets(folder)
    assert len({d.SeriesInstanceUID for d in datasets}) == 1 and len({d.SOPInstanceUID for d in datasets}) == 12
    assert [int(d.InstanceNumber) for d in datasets] == list(range(1, 13))


def test_seg_label_map_reads_back_per_segment(tmp_path):
    """Two labels (the bundle skips value 2: segments are renumbered 1, 2) on a rotated 12-slice series."""
    datasets = source_datasets(write_ct_series(tmp_path / "series"))
    mask = np.zeros((12, 80, 70), np.uint8)
    mask[2:5, 10:30, 5:20] = 1
    mask[7:11, 40:70, 30:60] = 3
    seg = build_seg(mask, datasets, labels={"background": 0, "lesion": 1, "lung": 3}, producer=PRODUCER)
    seg = hd.seg.Segmentation.from_dataset(seg)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion", "lung"]
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Lung"
    back = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in datasets], combine_segments=True)
    expected = np.select([mask == 1, mask == 3], [1, 2], 0)
    np.testing.assert_array_equal(back, expected)
    with pytest.raises(InputError, match="label values \\[5\\]"):
        build_seg(np.where(mask == 3, 5, mask).astype(np.uint8), datasets, labels={"lesion": 1}, producer=PRODUCER)
    with pytest.raises(InputError, match="slices"):
        build_seg(mask[:-1], datasets, labels={"lesion": 1}, producer=PRODUCER)


@pytest.fixture(scope="module")
def dicom_run(ct_pipeline, tmp_path_factory):
    """The tiny CT pipeline on one DICOM series with --dicom-seg's hook: (series folder, output folder, result)."""
    root = tmp_path_factory.mktemp("dicom_run")
    series = write_ct_series(root / "ct_series", manufacturer="ACME", model_name="Scan 9", kernel="B30f")
    result = run_batch(ct_pipeline.ood_onnx, [series], root / "out", case_hooks=[DicomResultWriter(ct_pipeline.ood_onnx)],
                       qa=False, raise_unexpected=True)
    return series, root / "out", result


def test_seg_on_the_series_grid_equals_the_nifti_mask(dicom_run):
    series, out, result = dicom_run
    outcome = result.outcomes[0]
    assert outcome.status == "ok", outcome.error
    assert outcome.report.outputs["dicom_seg"] == str(out / "ct_series.seg.dcm")
    assert json.loads((out / "ct_series.json").read_text())["outputs"]["dicom_sr"] == str(out / "ct_series.sr.dcm")
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "ct_series.nii.gz")))
    assert mask.any(), "the tiny model segments something, or the comparison proves nothing"
    source = source_datasets(series)
    seg = hd.seg.segread(str(out / "ct_series.seg.dcm"))
    back = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in source], combine_segments=True)
    np.testing.assert_array_equal(back, mask)
    # same study and frame of reference, a new series, every source instance referenced
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.SeriesInstanceUID != source[0].SeriesInstanceUID
    referenced = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
                  for r in s.ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in source}


def test_sr_carries_the_verdict(dicom_run, ct_pipeline):
    series, out, result = dicom_run
    report = result.outcomes[0].report
    sr = pydicom.dcmread(out / "ct_series.sr.dcm")
    seg = pydicom.dcmread(out / "ct_series.seg.dcm")
    verdict = read_verdict(sr)
    assert report.ood is not None and verdict["ood"] is report.ood
    assert verdict["ood-u"] == pytest.approx(report.uncertainty, rel=1e-12)
    assert verdict["ood-threshold"] == pytest.approx(report.threshold, rel=1e-12)
    assert verdict["ood-top-patch"] == pytest.approx(report.top_patches[0].distance, rel=1e-6)
    np.testing.assert_allclose(verdict["ood-top-patch-point"], report.top_patches[0].centre_mm, atol=1e-4)
    text = sr.to_json()
    sha = ct_pipeline.ood_onnx.read_bytes()
    import hashlib

    assert f"bundle sha256 {hashlib.sha256(sha).hexdigest()}" in text
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == source_datasets(series)[0].StudyInstanceUID
    assert len({sr.SeriesInstanceUID, seg.SeriesInstanceUID, source_datasets(series)[0].SeriesInstanceUID}) == 3
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in evidence


def test_uids_are_stable_across_runs(dicom_run, ct_pipeline, tmp_path):
    """A series answered twice (restart after a crash) gives the same SOP instances, which replace themselves
    in the PACS instead of appearing twice."""
    series, out, _ = dicom_run
    again = run_batch(ct_pipeline.ood_onnx, [series], tmp_path / "again",
                      case_hooks=[DicomResultWriter(ct_pipeline.ood_onnx)], qa=False)
    for name in ("ct_series.seg.dcm", "ct_series.sr.dcm"):
        first, second = pydicom.dcmread(out / name), pydicom.dcmread(tmp_path / "again" / name)
        assert first.SOPInstanceUID == second.SOPInstanceUID and first.SeriesInstanceUID == second.SeriesInstanceUID
    assert again.outcomes[0].status == "ok"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
def test_dciodvfy_finds_no_errors(dicom_run):
    _, out, _ = dicom_run
    for name, iod in (("ct_series.seg.dcm", "Segmentation"), ("ct_series.sr.dcm", "Comprehensive3DSR")):
        run = subprocess.run(["dciodvfy", str(out / name)], capture_output=True, text=True, timeout=60)
        lines = (run.stdout + run.stderr).splitlines()
        assert lines and lines[0].strip() == iod, lines[:3]
        errors = [line for line in lines if line.startswith("Error")]
        assert errors == [], errors


def test_cli_writes_seg_and_sr_and_refuses_nifti(ct_pipeline, test_cases, tmp_path):
    series = write_ct_series(tmp_path / "series")
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(ct_pipeline.ood_onnx), str(series), "-o", str(tmp_path / "out"),
                                 "--dicom-seg", "--no-qa"])
    assert result.exit_code in (0, 3), result.output
    assert (tmp_path / "out" / "series.seg.dcm").is_file() and (tmp_path / "out" / "series.sr.dcm").is_file()
    nifti = next(iter(test_cases["ct"].values()))[0]
    refused = runner.invoke(app, ["run", str(ct_pipeline.ood_onnx), str(nifti), "-o", str(tmp_path / "n"),
                                  "--dicom-seg"])
    assert refused.exit_code == 2
    assert "needs DICOM series folders" in " ".join(refused.output.split())
    assert not (tmp_path / "n").exists()


def test_a_missing_highdicom_names_the_extra(tmp_path):
    series = write_ct_series(tmp_path / "series")
    run = run_with_blocked_imports(["highdicom"], f"""
        import numpy as np
        from segsentry.dicom.seg import Producer, build_seg
        from segsentry.dicom.series import source_datasets
        from segsentry.errors import MissingDependencyError
        try:
            build_seg(np.zeros((12, 80, 70), np.uint8), source_datasets({str(series)!r}), labels={{"a": 1}},
                      producer=Producer("b", "c", "d"))
        except MissingDependencyError as exc:
            print(exc)
    """)
    assert "pip install 'segsentry[dicom]'" in run.stdout, run.stderr
