"""``ood-run --dicom-seg``: the per-case hook that writes ``CASE.seg.dcm`` and ``CASE.sr.dcm`` beside the usual
outputs, for cases read from a DICOM series folder."""

from __future__ import annotations

from pathlib import Path

from segsentry.dicom import require
from segsentry.dicom.seg import Producer, build_seg, write_dataset
from segsentry.dicom.series import source_datasets
from segsentry.dicom.sr import build_sr
from segsentry.errors import InputError
from segsentry.runtime.batch import WrittenCase


class DicomResultWriter:
    """A :data:`segsentry.runtime.batch.CaseHook`: SEG + SR for one case, on the source series' geometry.

    Raises :class:`InputError` for a case that is not a DICOM series (a NIfTI file has no SOP instances to
    reference). The bundle file's hash is the one the batch recorded in the case's report.
    """

    def __init__(self, bundle_path: str | Path) -> None:
        require("highdicom", "Writing DICOM SEG/SR (--dicom-seg)")  # before any case runs
        self.bundle_path = Path(bundle_path)

    def producer(self, written: WrittenCase) -> Producer:
        return Producer(bundle_name=self.bundle_path.name, bundle_sha256=written.report.bundle_sha256,
                        weights_sha256=written.manifest.weights_sha256)

    def __call__(self, written: WrittenCase) -> dict[str, Path]:
        source = written.case.files[0]
        if not source.is_dir():
            raise InputError(f"case {written.case.case_id}: --dicom-seg needs a DICOM series folder as input, got "
                             f"{source.name}; DICOM SEG/SR reference the source SOP instances, which a "
                             f"{source.suffix or 'non-DICOM'} file does not have")
        datasets = source_datasets(source, files=written.dicom_files or None)
        producer = self.producer(written)
        seg = build_seg(written.mask, datasets, labels=written.manifest.labels, producer=producer)
        sr = build_sr(written.report, datasets, producer=producer, seg=seg)
        case_id = written.case.case_id
        return {"dicom_seg": write_dataset(seg, written.output_dir / f"{case_id}.seg.dcm"),
                "dicom_sr": write_dataset(sr, written.output_dir / f"{case_id}.sr.dcm")}
