"""Tiny DICOM series built from a real CT slice (pydicom's CT_small.dcm, 128 x 128) with correct positions and
UIDs; every argument bends one thing a hospital export gets wrong."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

STEP_MM = 2.5


def base_slice(name: str = "CT_small.dcm"):
    return pydicom.dcmread(get_testdata_file(name))


def write_series(folder: Path, *, n: int = 6, step: float = STEP_MM, positions: Sequence[float] | None = None,
                 uid: str | None = None, name: str = "CT_small.dcm", prefix: str = "IM",
                 edit: Callable[[int, object], None] | None = None) -> list[Path]:
    """Write ``n`` slices along the base slice's normal; ``edit(i, ds)`` changes slice ``i`` before saving."""
    folder.mkdir(parents=True, exist_ok=True)
    base = base_slice(name)
    uid = uid or generate_uid()
    x, y, z = (float(v) for v in base.ImagePositionPatient)
    zs = list(positions) if positions is not None else [z + i * step for i in range(n)]
    paths = []
    for i, zi in enumerate(zs):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = uid
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [x, y, zi]
        ds.SliceLocation = zi
        ds.SliceThickness = step
        if edit is not None:
            edit(i, ds)
        path = folder / f"{prefix}{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicomdir(folder: Path) -> Path:
    """A DICOMDIR (Media Storage Directory) file with no records: a medium's index, not an image."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.DirectoryRecordSequence = []
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "DICOMDIR", enforce_file_format=True)
    return folder / "DICOMDIR"
