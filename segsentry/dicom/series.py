"""DICOM series on disk: the source datasets of a series in the runtime's slice order, and a writer that turns
a SimpleITK volume into a proper multi-slice CT/MR series (tests, benchmarks, trying ``ood-serve``).

Slice order: :func:`source_datasets` returns the files in the order SimpleITK's series reader stacks them
(``GetGDCMSeriesFileNames``, the order ``segsentry.runtime.io`` reads), so dataset ``k`` is the mask's
numpy slice ``k`` (arrays are ``(z, y, x)``; DICOM rows are ``y``, columns ``x``).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry import __version__
from segsentry._atomic import atomic_path
from segsentry.dicom import require
from segsentry.errors import InputError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
STORAGE_CLASSES = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}


def series_files(folder: Path) -> list[Path]:
    """The files of the one series in ``folder``, in SimpleITK's stacking order."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise InputError(f"DICOM folder {folder} holds {len(ids)} series; pass a folder with exactly one")
    return [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])]


def source_datasets(folder: Path, *, files: Sequence[Path] | None = None) -> list:
    """The series' pydicom datasets (pixel data included, highdicom needs it), in the stacked volume's slice
    order: ``files`` as the reader stacked them (localizers left out, one echo) or, without it, SimpleITK's
    order of ``folder``."""
    pydicom = require("pydicom", "Writing DICOM SEG/SR")
    try:
        return [pydicom.dcmread(str(f)) for f in (files if files is not None else series_files(folder))]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"cannot read the DICOM series in {folder}: {exc}") from exc


@dataclass(frozen=True)
class SeriesInfo:
    """Identifiers and scanner description written into a generated series (all optional but the modality)."""

    modality: str = "CT"
    patient_id: str = "SEGSENTRY-PHANTOM"
    patient_name: str = "Phantom^Segsentry"
    study_uid: str | None = None  # None: a new one
    series_uid: str | None = None
    series_number: int = 1
    manufacturer: str = "segsentry phantom"
    model_name: str = "procedural"
    kernel: str | None = None  # ConvolutionKernel (CT)


def write_series(image: sitk.Image, folder: str | Path, info: SeriesInfo = SeriesInfo()) -> list[Path]:
    """Write a 3D scalar ``image`` as one slice file per z index (``IM0000.dcm``...), CT or MR Image Storage.

    Geometry comes from the image: ImageOrientationPatient from the direction's first two columns, per-slice
    ImagePositionPatient from the physical point of voxel ``(0, 0, k)`` (both LPS, like SimpleITK), spacing
    as PixelSpacing (row, column) = (y, x) and SliceThickness = z. Pixels are stored as int16 with a rescale
    that keeps the values exactly when they are integers in int16's range (CT in HU).
    """
    pydicom = require("pydicom", "Writing a DICOM series")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"a DICOM series needs a 3D scalar image, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    modality = info.modality.upper()
    if modality not in STORAGE_CLASSES:
        raise InputError(f"modality {info.modality!r}: only {', '.join(STORAGE_CLASSES)} series can be written")
    array = sitk.GetArrayFromImage(image).astype(np.float64)  # (z, y, x)
    lo, hi = float(array.min()), float(array.max())
    integral = np.array_equal(array, np.round(array)) and lo >= -32768 and hi <= 32767
    slope = 1.0 if integral else max((hi - lo) / 65000.0, 1e-12)
    intercept = 0.0 if integral else lo + 32500.0 * slope
    stored = np.round((array - intercept) / slope).astype(np.int16)
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = image.GetSpacing()
    study_uid = info.study_uid or generate_uid()
    series_uid = info.series_uid or generate_uid()
    frame_uid = generate_uid()
    now = _dt.datetime.now()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = STORAGE_CLASSES[modality]
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = info.manufacturer
        ds.ManufacturerModelName = info.model_name
        ds.SoftwareVersions = f"segsentry {__version__}"
        ds.ReferringPhysicianName = ""
        ds.PatientName = info.patient_name
        ds.PatientID = info.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.PatientPosition = "HFS"
        ds.Laterality = ""
        ds.AcquisitionNumber = 1
        ds.SeriesNumber = info.series_number
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [float(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.SliceThickness = float(spacing[2])
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        if modality == "CT":
            ds.KVP = 120
            ds.ConvolutionKernel = info.kernel or "STANDARD"
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 10.0, 500.0, 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept = f"{intercept:.6g}" if not integral else "0"
        ds.RescaleSlope = f"{slope:.6g}" if not integral else "1"
        ds.RescaleType = "HU" if modality == "CT" else "US"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        target = folder / f"IM{k:04d}.dcm"
        with atomic_path(target) as tmp:
            ds.save_as(str(tmp), enforce_file_format=True)
        written.append(target)
    return written
