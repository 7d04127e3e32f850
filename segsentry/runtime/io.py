"""Reading cases the nnU-Net way and writing results atomically (SimpleITK only).

Conventions: a case is one file per channel named ``CASE_XXXX<ending>`` (``XXXX`` = channel index), or one
DICOM series folder for single-channel models. Arrays returned here are numpy order ``(c, z, y, x)``; spacings
are numpy order ``(z, y, x)`` (SimpleITK's ``GetSpacing()`` is ``(x, y, z)``, reversed here as nnU-Net does).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry._atomic import atomic_path
from segsentry.errors import InputError
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


@dataclass
class LoadedCase:
    """A case in memory. ``image`` is (c, z, y, x) float32; ``reference`` carries the output geometry."""

    case_id: str
    image: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x), absolute values
    reference: sitk.Image
    files: tuple[Path, ...]
    warnings: list[str] = field(default_factory=list)

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
    if not path.is_dir():
        return False
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on every non-DICOM folder
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


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

    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise InputError(f"input {path} does not exist")
        if path.is_file():
            add(path)
        elif is_dicom_folder(path):
            if num_channels != 1:
                raise InputError(f"{path} is a DICOM series, but the model needs {num_channels} channels; "
                                 "convert the series to CASE_XXXX.nii.gz files, one per channel")
            order.append(path.name)
            groups[path.name][0] = path
        else:
            files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_ENDINGS))
            if not files:
                raise InputError(f"folder {path} holds no images ({', '.join(IMAGE_ENDINGS)}) and no DICOM series")
            for file in files:
                add(file)
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
    return cases


def _read_one(path: Path) -> sitk.Image:
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if len(series) != 1:
                raise InputError(f"DICOM folder {path} holds {len(series)} series; pass a folder with exactly one")
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
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


def read_case(case: CaseInput, *, num_channels: int) -> LoadedCase:
    """Read and validate one case: 3D scalar images, the model's channel count, same grid, finite values."""
    if case.error:
        raise InputError(f"case {case.case_id}: {case.error}")
    if len(case.files) != num_channels:
        raise InputError(f"case {case.case_id}: the model needs {num_channels} channel(s), got {len(case.files)}")
    images = [_read_one(f) for f in case.files]
    warnings: list[str] = []
    for path, img in zip(case.files, images):
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{path}: vector/RGB image with {img.GetNumberOfComponentsPerPixel()} components; "
                             "the model needs scalar 3D images")
        if img.GetDimension() != 3:
            raise InputError(f"{path}: {img.GetDimension()}D image of size {img.GetSize()}; the model is 3D and needs "
                             "a 3D volume")
        if min(img.GetSize()) < 1:
            raise InputError(f"{path}: empty image of size {img.GetSize()}")
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
                      files=case.files, warnings=warnings)


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
        resolved = Path(path).resolve()
        folder = resolved if resolved.is_dir() else resolved.parent
        if folder == out:
            raise InputError(f"output folder {output_dir} is also an input folder; choose another -o so inputs "
                             "are never overwritten")
