"""DICOM series as cases: found in folders and study trees, split into series, checked slice by slice, read.

SimpleITK (GDCM) stacks whatever files it is given onto one grid: a missing slice, duplicated positions, two
echoes under one SeriesInstanceUID or non-parallel slices give a wrong volume with only a warning on stderr.
So the headers are read here first (pydicom, the ``dicom`` extra; without it a DICOM case fails with a
message naming ``segsentry[dicom]``, and every other format keeps working) and each series is checked:

- one series per case: files are grouped by SeriesInstanceUID and, inside a series, by echo number (each
  echo becomes its own case); localizers (ImageType ``LOCALIZER``) are left out, with a warning;
- constant orientation (parallel slices), pixel spacing and matrix size; at least two slices;
- slice positions along the slice normal regular within :data:`POSITION_TOLERANCE`: no duplicates, no gaps
  (``allow_irregular=True`` proceeds with a warning carried in the report); gantry tilt (slices shifted
  in-plane, or a non-zero GantryDetectorTilt) is refused, since the stacked grid would be sheared;
- the Modality against what the model was trained on (CT vs MR), where the bundle says.

Geometry is LPS throughout (DICOM's patient coordinates, as SimpleITK reports them).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry.errors import InputError, MissingDependencyError

log = logging.getLogger(__name__)

POSITION_TOLERANCE = 0.05  # relative deviation of a slice step from the median step (and 0.01 mm absolute)
ORIENTATION_TOLERANCE = 1e-4  # max difference of direction cosines between slices
TILT_TOLERANCE_DEG = 0.1  # angle between the slice step and the slice normal
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
_MR_NAMES = ("MR", "MRI", "T1", "T2", "FLAIR", "PD", "ADC", "DWI", "SWI", "T1C", "T1CE", "T1GD", "T2W", "T1W")


def has_dicom_preamble(path: Path) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (``DICM`` at byte 128); needs no pydicom."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files_under(root: Path, *, limit: int | None = None) -> Iterator[Path]:
    """DICOM files in ``root`` and its subfolders (symbolic links to folders are not followed: no loops)."""
    found = 0
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file() and has_dicom_preamble(path):
                yield path
                found += 1
                if limit is not None and found >= limit:
                    return


def is_dicom_tree(path: Path) -> bool:
    """A folder holding at least one DICOM file, in itself or below."""
    return path.is_dir() and next(dicom_files_under(path, limit=1), None) is not None


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise MissingDependencyError("pydicom", "dicom", "Reading DICOM series") from None
    return pydicom


@dataclass(frozen=True)
class Slice:
    """The header fields of one DICOM file that the checks use (positions and cosines in LPS mm)."""

    path: Path
    series_uid: str
    modality: str
    echo: str
    acquisition: str
    image_type: tuple[str, ...]
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    matrix: tuple[int, int]
    frames: int
    tilt: float
    series_number: str = ""

    @property
    def localizer(self) -> bool:
        return "LOCALIZER" in self.image_type


@dataclass(frozen=True)
class SeriesGroup:
    """One series (one echo of it) found under a folder: the files that make the case, before any check."""

    folder: Path  # the deepest folder holding all its files
    series_uid: str
    slices: tuple[Slice, ...]
    label: str = ""  # what tells it apart from other series in the same folder ("" if alone)
    excluded: tuple[str, ...] = ()  # why some files of the series were left out (localizers)

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(s.path for s in self.slices)


def _floats(value) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def read_slice(path: Path) -> Slice | None:
    """The header of one file (no pixel data), or None for a DICOMDIR or a non-image object."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path, defer_size=4096)  # large values (pixel data) stay on disk, their length known
        if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
            return None
        if "Rows" not in ds or "SeriesInstanceUID" not in ds:
            return None  # a structured report, presentation state, ...: not an image slice
        _check_pixel_data(path, ds)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError) as exc:
        raise InputError(f"cannot read DICOM file {path}: {exc}; re-export the series") from exc
    try:
        tilt = float(ds.get("GantryDetectorTilt", 0) or 0)
    except (TypeError, ValueError):
        tilt = 0.0
    return Slice(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        modality=str(ds.get("Modality", "")).upper(),
        echo=str(ds.get("EchoNumbers", "") or ""),
        acquisition=str(ds.get("AcquisitionNumber", "") or ""),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        position=_floats(ds.get("ImagePositionPatient")),
        orientation=_floats(ds.get("ImageOrientationPatient")),
        pixel_spacing=_floats(ds.get("PixelSpacing")),
        matrix=(int(ds.Rows), int(ds.get("Columns", 0))),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        tilt=tilt,
        series_number=str(ds.get("SeriesNumber", "") or ""),
    )


def _check_pixel_data(path: Path, ds) -> None:  # noqa: ANN001 - a pydicom Dataset
    """The pixel data element must lie inside the file and, uncompressed, hold the whole matrix (GDCM reads a
    truncated slice without a word)."""
    try:
        raw = ds.get_item(0x7FE00010, keep_deferred=True)
    except TypeError:  # pydicom < 2.4 has no keep_deferred
        raw = ds.get_item(0x7FE00010)
    if raw is None:
        raise InputError(f"cannot read DICOM file {path}: it has no pixel data; re-export the series")
    length = getattr(raw, "length", None)
    if length is None or length == 0xFFFFFFFF:  # already read, or encapsulated (compressed): GDCM checks frames
        return
    value_tell = getattr(raw, "value_tell", None)
    size = path.stat().st_size
    if value_tell is not None and value_tell + length > size:
        raise InputError(f"cannot read DICOM file {path}: the pixel data should hold {length} bytes but the file "
                         f"ends {value_tell + length - size} bytes early (truncated transfer?); re-transfer the series")
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"):
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                    * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
        if length < expected:
            raise InputError(f"cannot read DICOM file {path}: the pixel data holds {length} bytes, the "
                             f"{ds.Rows}x{ds.Columns} matrix needs {expected}; re-export the series")


def find_series(root: Path) -> list[SeriesGroup]:
    """Every series (split by echo) among the DICOM files under ``root``, in a stable order.

    Raises :class:`MissingDependencyError` without pydicom and :class:`InputError` for an unreadable file.
    """
    by_series: dict[tuple[str, str], list[Slice]] = defaultdict(list)
    for path in dicom_files_under(root):
        slice_ = read_slice(path)
        if slice_ is not None:
            by_series[(slice_.series_uid, slice_.echo)].append(slice_)
    echoes: dict[str, int] = defaultdict(int)
    for uid, _ in by_series:
        echoes[uid] += 1
    groups = []
    for (uid, echo), slices in by_series.items():
        kept = [s for s in slices if not s.localizer]
        excluded = (f"{len(slices) - len(kept)} localizer image(s) left out",) if len(kept) < len(slices) else ()
        slices = kept or slices  # a series of localizers only is refused at read time
        folder = Path(os.path.commonpath([str(s.path.parent) for s in slices]))
        label = f"echo{echo}" if echoes[uid] > 1 else ""
        groups.append(SeriesGroup(folder=folder, series_uid=uid, slices=tuple(sorted(slices, key=lambda s: s.path)),
                                  label=label, excluded=excluded))
    per_folder: dict[Path, list[SeriesGroup]] = defaultdict(list)
    for g in groups:
        per_folder[g.folder].append(g)
    out = []
    for folder in sorted(per_folder):
        members = per_folder[folder]
        uids = {g.series_uid for g in members}
        for g in sorted(members, key=lambda g: (g.slices[0].series_number.zfill(6), g.series_uid, g.label)):
            if len(uids) > 1:  # several series in one folder: tell them apart by number (and echo)
                label = "_".join(p for p in (f"S{g.slices[0].series_number or g.series_uid[-6:]}", g.label) if p)
                g = SeriesGroup(g.folder, g.series_uid, g.slices, label, g.excluded)
            out.append(g)
    return out


@dataclass
class SeriesCheck:
    """What the checks of one series found: the files in slice order, warnings to carry in the report."""

    files: list[Path]
    modality: str
    warnings: list[str] = field(default_factory=list)


def check_series(group: SeriesGroup, *, allow_irregular: bool = False,
                 expected_modality: str | None = None) -> SeriesCheck:
    """Check one series (see the module docstring); return its files sorted along the slice normal."""
    where = f"DICOM series {group.series_uid} in {group.folder}"
    slices = list(group.slices)
    warnings = list(group.excluded)
    if all(s.localizer for s in slices):
        raise InputError(f"{where}: holds only localizer images; pass the diagnostic series")
    multi = [s for s in slices if s.frames > 1]
    if multi:
        raise InputError(f"{where}: multi-frame (enhanced) DICOM ({multi[0].frames} frames in {multi[0].path.name}) "
                         "is not supported; convert the series to NIfTI (e.g. dcm2niix) first")
    if len(slices) < 2:
        raise InputError(f"{where}: a single slice ({slices[0].path.name}); the model needs a 3D volume, pass the "
                         "whole series")
    modality = slices[0].modality
    modalities = sorted({s.modality for s in slices})
    if len(modalities) > 1:
        raise InputError(f"{where}: mixed modalities {modalities} in one series; pass one series per case")
    if expected_modality and modality and _modality_family(modality) != expected_modality:
        raise InputError(f"{where}: Modality {modality}, but the model was trained on {expected_modality} "
                         f"images; pass a {expected_modality} series or use a model trained on {modality}")
    missing = [s.path.name for s in slices if s.position is None or s.orientation is None or len(s.orientation) != 6
               or s.pixel_spacing is None]
    if missing:
        raise InputError(f"{where}: {len(missing)} slice(s) lack ImagePositionPatient/ImageOrientationPatient/"
                         f"PixelSpacing (e.g. {missing[0]}); the volume's geometry is undefined")
    orientation = np.array(slices[0].orientation)
    if any(np.abs(np.array(s.orientation) - orientation).max() > ORIENTATION_TOLERANCE for s in slices):
        distinct = sorted({tuple(round(v, 3) for v in s.orientation) for s in slices})
        raise InputError(f"{where}: the slices are not parallel ({len(distinct)} orientations, e.g. "
                         f"{list(distinct[0])} and {list(distinct[1])}); pass one stack per case")
    for attribute, what in (("pixel_spacing", "pixel spacing"), ("matrix", "matrix size")):
        values = sorted({tuple(np.round(getattr(s, attribute), 6)) for s in slices})
        if len(values) > 1:
            raise InputError(f"{where}: the {what} changes between slices ({values[:3]}); pass one series of one "
                             "geometry per case")
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    duplicates = [(slices[i].path.name, slices[i + 1].path.name) for i in np.flatnonzero(steps < 1e-3)]
    if duplicates:
        acquisitions = sorted({s.acquisition for s in slices})
        hint = (f" (acquisitions {acquisitions}: several acquisitions share this SeriesInstanceUID)"
                if len(acquisitions) > 1 else "")
        raise InputError(f"{where}: {len(duplicates)} duplicated slice position(s), e.g. {duplicates[0][0]} and "
                         f"{duplicates[0][1]} at {along[np.flatnonzero(steps < 1e-3)[0]]:.2f} mm{hint}; pass each "
                         "acquisition as its own series")
    tilted = max((s.tilt for s in slices), key=abs)
    in_plane = positions[1:] - positions[:-1] - np.outer(steps, normal)
    shear_deg = float(np.degrees(np.arctan2(np.linalg.norm(in_plane, axis=1), steps)).max())
    if shear_deg > TILT_TOLERANCE_DEG or abs(tilted) > TILT_TOLERANCE_DEG:
        raise InputError(f"{where}: gantry tilt detected (slices shifted in-plane by {shear_deg:.2f}°, "
                         f"GantryDetectorTilt {tilted:g}°): stacked as is the volume would be sheared; resample it "
                         "onto an orthogonal grid (e.g. dcm2niix corrects tilt) first")
    median = float(np.median(steps))
    deviation = np.abs(steps - median)
    irregular = np.flatnonzero(deviation > max(POSITION_TOLERANCE * median, 0.01))
    if irregular.size:
        i = int(irregular[0])
        problem = (f"irregular slice positions: step {steps[i]:.3f} mm between {slices[i].path.name} and "
                   f"{slices[i + 1].path.name} where the series steps {median:.3f} mm ({irregular.size} irregular "
                   "step(s): a missing slice?)")
        if not allow_irregular:
            raise InputError(f"{where}: {problem}; complete the series, or pass --allow-irregular-slices to "
                             "process it on a regular grid anyway (the report then carries a warning)")
        warnings.append(f"{problem}; processed anyway (--allow-irregular-slices): the volume is stacked on a "
                        f"regular {median:.3f} mm grid, so positions past the gap are off")
    return SeriesCheck(files=[s.path for s in slices], modality=modality, warnings=warnings)


def _modality_family(modality: str) -> str:
    return "MR" if modality.upper() in ("MR", "MRI") else modality.upper()


def expected_modality(channel_names: dict[str, str], normalization_schemes: list[str]) -> str | None:
    """``CT`` or ``MR`` when the bundle's channel 0 says which (its nnU-Net channel name, or CT normalisation),
    else None (no check)."""
    name = str(channel_names.get("0", "")).strip().upper()
    if name == "CT" or (normalization_schemes and normalization_schemes[0] == "CTNormalization"):
        return "CT"
    if name in _MR_NAMES or name.startswith(("MR", "T1", "T2")):
        return "MR"
    return None


def read_series(files: list[Path]) -> sitk.Image:
    """Stack checked files (in slice order) with SimpleITK's series reader."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return reader.Execute()
