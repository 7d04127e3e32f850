"""Reading cases the nnU-Net way and writing results atomically (SimpleITK only).

Conventions: a case is one file per channel named ``CASE_XXXX<ending>`` (``XXXX`` = channel index), or one
DICOM series (one echo of it) for single-channel models, found in a series folder or a study tree
(:mod:`segsentry.runtime.dicom`). Arrays returned here are numpy order ``(c, z, y, x)``; spacings
are numpy order ``(z, y, x)`` (SimpleITK's ``GetSpacing()`` is ``(x, y, z)``, reversed here as nnU-Net does).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry._atomic import atomic_path
from segsentry.errors import InputError, SegsentryError
from segsentry.runtime import dicom
from segsentry.runtime.validate import check_file, check_image

log = logging.getLogger(__name__)

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".hdr", ".gipl")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseInput:
    """One case to process: its id and its channel files in channel order (or one DICOM folder)."""

    case_id: str
    files: tuple[Path, ...]
    error: str | None = None  # set when the case could not be assembled (e.g. a missing channel)
    series: dicom.SeriesGroup | None = None  # a DICOM case: its series (files = its folder)


@dataclass
class LoadedCase:
    """A case in memory. ``image`` is (c, z, y, x) float32; ``reference`` carries the output geometry."""

    case_id: str
    image: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x), absolute values
    reference: sitk.Image
    files: tuple[Path, ...]
    warnings: list[str] = field(default_factory=list)
    series_uid: str | None = None  # DICOM cases
    modality: str | None = None  # DICOM cases: the series' Modality
    dicom_files: tuple[Path, ...] = ()  # DICOM cases: the files stacked, in slice order (numpy z index order)

    @property
    def output_ending(self) -> str:
        first = self.files[0]
        return ".nii.gz" if first.is_dir() else _ending(first)


def _ending(path: Path) -> str:
    name = path.name.lower()
    for ending in IMAGE_ENDINGS:
        if name.endswith(ending):
            return path.name[len(path.name) - len(ending):]
    return path.suffix


def _strip_ending(path: Path) -> str:
    return path.name[: len(path.name) - len(_ending(path))]


def is_dicom_folder(path: Path) -> bool:
    """A folder with DICOM files in it or below (a series folder, a study tree, a DICOMDIR medium)."""
    return dicom.is_dicom_tree(path)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).lstrip(".") or "case"


def _dicom_cases(roots: list[Path]) -> list[CaseInput]:
    """One case per series (per echo) under each root; ids from the shortest unique tail of the series'
    folder path (``patA/SE1`` and ``patB/SE1`` become ``patA_SE1`` and ``patB_SE1``), plus a label when one
    folder holds several series."""
    found: list[tuple[Path, dicom.SeriesGroup | None, str | None]] = []
    for root in roots:
        try:
            groups = dicom.find_series(root)
        except SegsentryError as exc:  # pydicom missing, an unreadable file: the tree fails as one case
            found.append((root, None, str(exc)))
            continue
        if not groups:
            found.append((root, None, f"{root} holds DICOM files but no image series (only DICOMDIR, reports or "
                                      "presentation states?)"))
        found += [(g.folder, g, None) for g in groups]
    parts = [folder.resolve().parts[1:] or ("root",) for folder, _, _ in found]
    depth = [1] * len(found)

    def ident(i: int) -> str:
        group = found[i][1]
        tail = "_".join(parts[i][-depth[i]:])
        return _safe(f"{tail}_{group.label}" if group is not None and group.label else tail)

    while True:
        ids = [ident(i) for i in range(len(found))]
        clash = [i for i, v in enumerate(ids) if ids.count(v) > 1 and depth[i] < len(parts[i])]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    return [CaseInput(case_id=ids[i], files=(folder,), error=error, series=group)
            for i, (folder, group, error) in enumerate(found)]


def collect_cases(inputs: Sequence[str | Path], *, num_channels: int) -> list[CaseInput]:
    """Group input files/folders into cases.

    Each input is an image file (``CASE_0000.nii.gz``; a file without the channel suffix is a single-channel
    case named after the file), a folder of such files, or a DICOM series folder (single-channel models).
    Cases with missing channels are returned with ``error`` set so a batch can report them and go on.
    """
    groups: dict[str, dict[int, Path]] = defaultdict(dict)
    problems: dict[str, str] = {}
    order: list[str] = []

    def add(path: Path) -> None:
        stem = _strip_ending(path)
        match = _CHANNEL_RE.match(stem)
        case, channel = (match["case"], int(match["channel"])) if match else (stem, 0)
        if case not in groups:
            order.append(case)
        if channel in groups[case] and groups[case][channel] != path:
            problems[case] = f"two files for channel {channel}: {groups[case][channel]} and {path}"
        groups[case][channel] = path

    dicom_roots: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists() and not path.is_symlink():
            raise InputError(f"input {path} does not exist")
        if path.is_file() or path.is_symlink() and not path.is_dir():  # a dangling link fails as its case
            add(path)
            continue
        files = sorted(p for p in path.iterdir() if (p.is_file() or p.is_symlink())  # a dangling link fails its case
                       and p.name.lower().endswith(IMAGE_ENDINGS))
        if files:
            for file in files:
                add(file)
        elif is_dicom_folder(path):
            if num_channels != 1:
                raise InputError(f"{path} is a DICOM series, but the model needs {num_channels} channels; "
                                 "convert the series to CASE_XXXX.nii.gz files, one per channel")
            dicom_roots.append(path)
        else:
            nested = [d.name for d in sorted(path.iterdir()) if d.is_dir() and d.name.startswith("images")]
            hint = f"; did you mean {path / nested[0]}?" if nested else ""
            raise InputError(f"folder {path} holds no images ({', '.join(IMAGE_ENDINGS)}) and no DICOM series{hint}")
    cases = []
    for case in order:
        channels = groups[case]
        expected = set(range(num_channels))
        error = problems.get(case)
        if error is None and set(channels) != expected:
            found = ", ".join(f"_{c:04d}" for c in sorted(channels))
            want = ", ".join(f"_{c:04d}" for c in sorted(expected))
            error = f"expected channel files {want}, found {found}"
        files = tuple(channels[c] for c in sorted(channels))
        cases.append(CaseInput(case_id=case, files=files, error=error))
    cases += _dicom_cases(dicom_roots)
    return _unique_ids(cases)


def _unique_ids(cases: list[CaseInput]) -> list[CaseInput]:
    """Two cases with one id would write the same outputs: fail both, naming each one's inputs."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, case in enumerate(cases):
        by_id[case.case_id].append(i)
    out = list(cases)
    for case_id, members in by_id.items():
        if len(members) > 1:
            sources = "; ".join(", ".join(str(f) for f in cases[i].files) for i in members)
            for i in members:
                out[i] = CaseInput(case_id, cases[i].files, error=f"case id '{case_id}' is shared by several inputs "
                                   f"({sources}); rename them so each case has its own id", series=cases[i].series)
    return out


def _read_one(path: Path, files: Sequence[Path] | None = None) -> sitk.Image:
    """Read one channel file (checked first by :func:`check_file`) or, with ``files``, a checked DICOM series."""
    try:
        if files is not None:
            image = dicom.read_series(list(files))
        else:
            check_file(path)  # header vs payload, compressed streams end to end, raw non-finite values
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[-160:]
        raise InputError(f"cannot read {path}: not a readable image ({detail})") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    check_image(path, image)
    return image


def read_case(case: CaseInput, *, num_channels: int, allow_irregular_slices: bool = False,
              expected_modality: str | None = None) -> LoadedCase:
    """Read and validate one case: 3D scalar images, the model's channel count, same grid, finite values.

    DICOM series are checked first (:func:`segsentry.runtime.dicom.check_series`): irregular slice positions
    are refused unless ``allow_irregular_slices`` (then a warning is carried), and a Modality other than
    ``expected_modality`` (``CT``/``MR``, None: no check) is refused.
    """
    if case.error:
        raise InputError(f"case {case.case_id}: {case.error}")
    if len(case.files) != num_channels:
        raise InputError(f"case {case.case_id}: the model needs {num_channels} channel(s), got {len(case.files)}")
    warnings: list[str] = []
    series_uid = modality = None
    dicom_files: tuple[Path, ...] = ()
    if case.series is not None:
        check = dicom.check_series(case.series, allow_irregular=allow_irregular_slices,
                                   expected_modality=expected_modality)
        warnings += check.warnings
        series_uid, modality, dicom_files = case.series.series_uid, check.modality, tuple(check.files)
        images = [_read_one(case.files[0], check.files)]
    else:
        images = [_read_one(f) for f in case.files]
    for path, img in zip(case.files, images):
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{path}: vector/RGB image with {img.GetNumberOfComponentsPerPixel()} components; "
                             "the model needs scalar 3D images")
        if img.GetDimension() != 3:
            raise InputError(f"{path}: {img.GetDimension()}D image of size {img.GetSize()}; the model is 3D and needs "
                             "a 3D volume")
        if min(img.GetSize()) < 1:
            raise InputError(f"{path}: empty image of size {img.GetSize()}")
        if min(img.GetSize()) < 2:
            raise InputError(f"{path}: a single slice (size {img.GetSize()}, x y z) stored as a volume; the model is 3D "
                             "and needs a volume: pass the whole series")
    first = images[0]
    for path, img in zip(case.files[1:], images[1:]):
        if img.GetSize() != first.GetSize():
            raise InputError(f"case {case.case_id}: {path.name} has size {img.GetSize()} but channel 0 has "
                             f"{first.GetSize()}; all channels must share one grid")
        if not np.allclose(img.GetSpacing(), first.GetSpacing()):
            raise InputError(f"case {case.case_id}: {path.name} has spacing {img.GetSpacing()} but channel 0 has "
                             f"{first.GetSpacing()}")
        if not (np.allclose(img.GetOrigin(), first.GetOrigin()) and
                np.allclose(img.GetDirection(), first.GetDirection())):
            warnings.append(f"{path.name}: origin/direction differ from channel 0 (nnU-Net proceeds and so do we)")
    arrays = [sitk.GetArrayViewFromImage(img) for img in images]
    image = np.stack(arrays).astype(np.float32)  # (c, z, y, x)
    if not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise InputError(f"case {case.case_id}: {bad} voxel(s) are NaN or infinite; fix the image before inference")
    spacing = tuple(abs(float(s)) for s in first.GetSpacing()[::-1])
    reference = sitk.Image(1, 1, 1, sitk.sitkUInt8)
    reference.SetSpacing(first.GetSpacing())
    reference.SetOrigin(first.GetOrigin())
    reference.SetDirection(first.GetDirection())
    for warning in warnings:
        log.warning(warning)
    return LoadedCase(case_id=case.case_id, image=image, spacing=spacing, reference=reference,  # type: ignore[arg-type]
                      files=case.files, warnings=warnings, series_uid=series_uid, modality=modality,
                      dicom_files=dicom_files)


def input_fingerprints(case: CaseInput) -> list[dict[str, str]]:
    """What identifies each input of a case in its report: a file's sha256 (with its data file's for
    ``.hdr``/``.mhd`` pairs), or a DICOM series' SeriesInstanceUID and file count."""
    if case.series is not None:
        return [{"path": str(case.files[0]), "series_instance_uid": case.series.series_uid,
                 "n_files": str(len(case.series.files))}]
    out = []
    for path in case.files:
        entry = {"path": str(path), "sha256": sha256_file(path)}
        for suffix in (".img", ".raw", ".img.gz", ".zraw"):
            companion = path.with_name(_strip_ending(path) + suffix)
            if companion != path and companion.is_file() and path.name.lower().endswith((".hdr", ".mhd")):
                entry["data_sha256"] = sha256_file(companion)
        out.append(entry)
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_image(array: np.ndarray, reference: sitk.Image, target: Path) -> None:
    """Write a (z, y, x) array with the reference's spacing/origin/direction, atomically, compressed."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(reference.GetSpacing())
    image.SetOrigin(reference.GetOrigin())
    image.SetDirection(reference.GetDirection())
    with atomic_path(target) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def guard_outputs(output_dir: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output folder that is one of the input folders (outputs must never replace inputs)."""
    out = output_dir.resolve()
    for path in inputs:
        resolved = Path(os.path.realpath(path))  # never raises, not even for a symbolic link loop
        folder = resolved if resolved.is_dir() else resolved.parent
        if folder == out:
            raise InputError(f"output folder {output_dir} is also an input folder; choose another -o so inputs "
                             "are never overwritten")


LABEL_MAP_MAX_VALUES = 16  # an image with at most this many distinct integer values is a label map, not a scan


def label_map_reason(image: np.ndarray) -> str | None:
    """Why ``image`` (any shape) looks like a segmentation label map rather than a scan, or None: every voxel
    an integer and at most :data:`LABEL_MAP_MAX_VALUES` distinct values (scans have hundreds)."""
    values = np.unique(image)
    if values.size > LABEL_MAP_MAX_VALUES or not np.array_equal(values, np.round(values)):
        return None
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
    return f"only {values.size} distinct integer value(s) ({shown}): a label map, not an image"


def orientation_code(direction: Sequence[float]) -> str:
    """The three-letter orientation code of a 3D direction matrix, ITK/DICOM convention (``LPS``: the array's
    x axis runs towards the patient's left, y posterior, z superior), as ``DICOMOrientImageFilter`` names it."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines([float(v) for v in direction])


def case_orientation(case: CaseInput) -> str | None:
    """The orientation code of a case's channel 0 from its header only (no pixel data), or None if unreadable."""
    path = case.series.files[0] if case.series is not None else case.files[0]
    if case.error or path.is_dir():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    direction = reader.GetDirection()
    return orientation_code(direction) if len(direction) == 9 else None


def orientation_warning(loaded: LoadedCase, expected: str | None) -> str | None:
    """A warning when ``loaded`` is stored in another orientation than the training images (``expected``):
    nnU-Net works in array order, so the same anatomy stored differently gives another mask and score."""
    if not expected:
        return None
    code = orientation_code(loaded.reference.GetDirection())
    if code == expected:
        return None
    return (f"stored in orientation {code}, the training images in {expected}: the network sees the voxel array "
            f"as stored, so the mask and the OOD score may differ from the same scan stored as {expected} "
            f"(reorient it to {expected}, e.g. SimpleITK DICOMOrient, if that is what the model expects)")
