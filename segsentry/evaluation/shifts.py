"""Synthetic transformation shifts (Gonzalez et al., MedIA 2022, Table 4) built with TorchIO.

Two kinds of shift, each at three levels. Every level is a *band*: parameter magnitudes are drawn
uniformly from ``[low, high]`` with a random sign, and the bands of the three levels do not overlap,
so a stronger level always perturbs the image more than a weaker one.

``artefact`` -- MR/CT acquisition artefacts, all four applied in this order, to the image only
(the label is returned unchanged):

========  ================================  ======================  ============  ==================
level     RandomGhosting                    RandomSpike             RandomBlur    RandomNoise
          (num_ghosts, intensity)           (num_spikes, intensity) (std, mm)     (std / image std)
========  ================================  ======================  ============  ==================
weak      (2, 4), (0.10, 0.25)              1, (0.10, 0.20)         (0.25, 0.50)  (0.01, 0.03)
medium    (4, 6), (0.30, 0.50)              1, (0.30, 0.60)         (0.75, 1.25)  (0.05, 0.10)
strong    (6, 10), (0.60, 0.90)             2, (0.80, 1.50)         (1.50, 2.50)  (0.15, 0.25)
========  ================================  ======================  ============  ==================

The noise standard deviation is relative to the standard deviation of the image intensities (TorchIO's
``RandomNoise`` works in absolute units, which would make a fixed value meaningless across CT and MR).

``affine`` -- ``RandomAffine`` about the image centre, applied to image (linear interpolation, padded
with the image minimum) and label (nearest neighbour, padded with 0) with the *same* parameters:

========  ======================  ===========  =================  =========
level     scale |s - 1|           degrees      translation (mm)   isotropic
========  ======================  ===========  =================  =========
weak      (0.02, 0.05)            (2, 5)       (1, 3)             yes
medium    (0.08, 0.15)            (8, 15)      (4, 8)             yes
strong    (0.20, 0.30)            (20, 30)     (8, 12)            no
========  ======================  ===========  =================  =========

Degrees and translation are drawn per axis; scales once (isotropic) or per axis. A scale band
``(a, b)`` means a zoom in ``(1 + a, 1 + b)`` or out ``(1 - b, 1 - a)``.

The transforms never change the voxel grid: the output has the size, spacing, origin and direction of the
input. Images are written as float32, labels keep their pixel type. Randomness comes only from
``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng`, so a seed gives the same shift every time and
the caller's torch RNG state is left untouched. ``torchio`` is imported lazily (the ``eval`` extra).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from segsentry._atomic import atomic_path, write_text_atomic
from segsentry.errors import MissingDependencyError
from segsentry.evaluation.metrics import EvaluationError

__all__ = ["KINDS", "LEVELS", "SHIFT_LEVELS", "apply_shift", "shift_folder"]

log = logging.getLogger(__name__)

KINDS = ("artefact", "affine")
LEVELS = ("weak", "medium", "strong")

SHIFT_LEVELS: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    "artefact": {
        "weak": {
            "ghosting": {"num_ghosts": (2, 4), "intensity": (0.10, 0.25)},
            "spike": {"num_spikes": 1, "intensity": (0.10, 0.20)},
            "blur": {"std": (0.25, 0.50)},
            "noise": {"relative_std": (0.01, 0.03)},
        },
        "medium": {
            "ghosting": {"num_ghosts": (4, 6), "intensity": (0.30, 0.50)},
            "spike": {"num_spikes": 1, "intensity": (0.30, 0.60)},
            "blur": {"std": (0.75, 1.25)},
            "noise": {"relative_std": (0.05, 0.10)},
        },
        "strong": {
            "ghosting": {"num_ghosts": (6, 10), "intensity": (0.60, 0.90)},
            "spike": {"num_spikes": 2, "intensity": (0.80, 1.50)},
            "blur": {"std": (1.50, 2.50)},
            "noise": {"relative_std": (0.15, 0.25)},
        },
    },
    "affine": {
        "weak": {"scales": (0.02, 0.05), "degrees": (2.0, 5.0), "translation": (1.0, 3.0), "isotropic": True},
        "medium": {"scales": (0.08, 0.15), "degrees": (8.0, 15.0), "translation": (4.0, 8.0), "isotropic": True},
        "strong": {"scales": (0.20, 0.30), "degrees": (20.0, 30.0), "translation": (8.0, 12.0), "isotropic": False},
    },
}


def _torchio() -> Any:
    try:
        import torchio
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("torchio", "eval", "Transformation shifts") from exc
    return torchio


def _check_kind_level(kind: str, level: str) -> Mapping[str, Any]:
    if kind not in SHIFT_LEVELS:
        raise EvaluationError(f"unknown shift kind {kind!r}; expected one of {', '.join(KINDS)}")
    if level not in SHIFT_LEVELS[kind]:
        raise EvaluationError(f"unknown shift level {level!r}; expected one of {', '.join(LEVELS)}")
    return SHIFT_LEVELS[kind][level]


def _signed_band(torch: Any, low: float, high: float) -> tuple[float, float]:
    """The range ``(low, high)`` or ``(-high, -low)``, the sign drawn from torch's RNG."""
    if bool(torch.rand(()) < 0.5):
        return (-high, -low)
    return (low, high)


def _affine_transform(tio: Any, torch: Any, params: Mapping[str, Any]) -> Any:
    s_low, s_high = params["scales"]
    n_scales = 1 if params["isotropic"] else 3
    scales: list[float] = []
    for _ in range(n_scales):
        lo, hi = _signed_band(torch, s_low, s_high)
        scales += [1.0 + lo, 1.0 + hi]
    degrees: list[float] = []
    translation: list[float] = []
    for _ in range(3):
        degrees += list(_signed_band(torch, *params["degrees"]))
    for _ in range(3):
        translation += list(_signed_band(torch, *params["translation"]))
    return tio.RandomAffine(
        scales=tuple(scales),
        degrees=tuple(degrees),
        translation=tuple(translation),
        isotropic=bool(params["isotropic"]),
        center="image",
        default_pad_value="minimum",
        default_pad_label=0,
        image_interpolation="linear",
        label_interpolation="nearest",
    )


def _artefact_transform(tio: Any, params: Mapping[str, Any], image_std: float) -> Any:
    noise_low, noise_high = params["noise"]["relative_std"]
    scale = image_std if image_std > 0 else 1.0
    return tio.Compose(
        [
            tio.RandomGhosting(**params["ghosting"]),
            tio.RandomSpike(**params["spike"]),
            tio.RandomBlur(**params["blur"]),
            tio.RandomNoise(mean=0.0, std=(noise_low * scale, noise_high * scale)),
        ]
    )


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5, atol=1e-6)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=1e-5, atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5)
    )


def apply_shift(
    image: sitk.Image,
    label: sitk.Image | None,
    *,
    kind: str,
    level: str,
    seed: int,
) -> tuple[sitk.Image, sitk.Image | None]:
    """Apply the ``kind``/``level`` shift of :data:`SHIFT_LEVELS` to a 3-D image and (optionally) its label.

    Spatial (``affine``) shifts move image and label together, the label with nearest-neighbour
    interpolation so its values stay a subset of the input's (0 fills the padding); ``artefact``
    shifts only touch the image. The output keeps the input's voxel grid (size, spacing, origin,
    direction); the image comes back as float32, the label in its input pixel type.
    """
    params = _check_kind_level(kind, level)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise EvaluationError(
            f"apply_shift needs a scalar 3-D image, got {image.GetDimension()}-D "
            f"with {image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    if label is not None and not _same_grid(image, label):
        raise EvaluationError("image and label do not share the same voxel grid (size/spacing/origin/direction)")
    tio = _torchio()
    import torch

    image_f = sitk.Cast(image, sitk.sitkFloat32)
    subject_items: dict[str, Any] = {"image": tio.ScalarImage.from_sitk(image_f)}
    if label is not None:
        subject_items["label"] = tio.LabelMap.from_sitk(label)
    subject = tio.Subject(**subject_items)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if kind == "affine":
            transform = _affine_transform(tio, torch, params)
        else:
            image_std = float(np.std(sitk.GetArrayViewFromImage(image_f)))
            transform = _artefact_transform(tio, params, image_std)
        shifted = transform(subject)

    out_image = sitk.Cast(shifted["image"].as_sitk(), sitk.sitkFloat32)
    if out_image.GetSize() != image.GetSize():  # pragma: no cover - the transforms keep the grid
        raise EvaluationError(f"shift changed the image size from {image.GetSize()} to {out_image.GetSize()}")
    out_image.CopyInformation(image)  # exact geometry (the RAS round trip is only float-accurate)

    out_label: sitk.Image | None = None
    if label is not None:
        if kind == "affine":
            out_label = shifted["label"].as_sitk()
            array = np.rint(sitk.GetArrayViewFromImage(out_label)).astype(
                sitk.GetArrayViewFromImage(label).dtype, copy=False
            )
            out_label = sitk.GetImageFromArray(array)
        else:
            out_label = sitk.Image(label)
        out_label.CopyInformation(label)
    return out_image, out_label


# ------------------------------------------------------------------------------------------------ folders


def _case_seed(seed: int, case: str) -> int:
    """A per-case seed that depends only on ``seed`` and the case name (stable across runs and orders)."""
    return (int(seed) * 1_000_003 + zlib.crc32(case.encode("utf-8"))) % (2**63)


def _check_output_folder(in_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == in_dir.resolve():
        raise EvaluationError(f"refusing to overwrite the input folder {in_dir}: give a different output folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise EvaluationError(f"output folder {out_dir} exists and is not empty")


def shift_folder(in_dir: Path, out_dir: Path, *, kind: str, level: str, seed: int = 0) -> list[str]:
    """Write a shifted copy of an nnU-Net raw dataset folder.

    Reads ``in_dir/imagesTr/CASE_XXXX<ending>`` (all channels), the optional ``in_dir/labelsTr/CASE<ending>``
    and ``in_dir/dataset.json`` (``file_ending`` defaults to ``.nii.gz``), and writes the same layout to
    ``out_dir``. All channels and the label of a case share one seed (derived from ``seed`` and the case
    name), so spatial shifts move them identically. ``dataset.json`` is copied with a ``description`` of the
    shift and ``numTraining`` set to the number of cases written. Every file is written atomically.

    A case that cannot be read, shifted or written is logged and skipped (nothing of it is left in
    ``out_dir``); the others go on.

    Returns:
        The names of the cases that failed (empty when all were written).

    Raises:
        EvaluationError: unknown kind/level, ``out_dir`` is ``in_dir`` or exists and is not empty, or
            ``in_dir`` has no ``imagesTr`` folder.
    """
    _check_kind_level(kind, level)
    _torchio()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    _check_output_folder(in_dir, out_dir)
    images_dir = in_dir / "imagesTr"
    if not images_dir.is_dir():
        raise EvaluationError(f"{in_dir} is not an nnU-Net raw dataset folder: {images_dir} is missing")

    dataset_json = in_dir / "dataset.json"
    dataset: dict[str, Any] | None = None
    if dataset_json.is_file():
        try:
            dataset = json.loads(dataset_json.read_text())
        except (OSError, ValueError) as exc:
            raise EvaluationError(f"cannot read {dataset_json}: {exc}") from exc
        if not isinstance(dataset, dict):
            raise EvaluationError(f"{dataset_json} does not hold a JSON object")
    else:
        log.warning("%s has no dataset.json; writing images and labels only", in_dir)
    ending = str((dataset or {}).get("file_ending", ".nii.gz"))

    cases: dict[str, list[Path]] = {}
    for path in sorted(images_dir.iterdir()):
        name = path.name
        if not path.is_file() or not name.endswith(ending):
            continue
        stem = name[: -len(ending)]
        case, sep, channel = stem.rpartition("_")
        if not sep or len(channel) != 4 or not channel.isdigit():
            log.warning("skipping %s: not named CASE_XXXX%s", path, ending)
            continue
        cases.setdefault(case, []).append(path)

    out_dir.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    written = 0
    for case, channel_paths in cases.items():
        label_path = in_dir / "labelsTr" / f"{case}{ending}"
        case_seed = _case_seed(seed, case)
        outputs: list[tuple[Path, sitk.Image]] = []
        try:
            label = sitk.ReadImage(str(label_path)) if label_path.is_file() else None
            for index, path in enumerate(channel_paths):
                image = sitk.ReadImage(str(path))
                shifted, shifted_label = apply_shift(
                    image, label if index == 0 else None, kind=kind, level=level, seed=case_seed
                )
                outputs.append((out_dir / "imagesTr" / path.name, shifted))
                if index == 0 and shifted_label is not None:
                    outputs.append((out_dir / "labelsTr" / label_path.name, shifted_label))
            done: list[Path] = []
            try:
                for target, result in outputs:
                    with atomic_path(target) as tmp:
                        sitk.WriteImage(result, str(tmp), True)
                    done.append(target)
            except BaseException:
                for target in done:
                    target.unlink(missing_ok=True)
                raise
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
            log.error("case %s: %s shift (%s) failed: %s", case, kind, level, exc)
            failed.append(case)
            continue
        written += 1

    if dataset is not None:
        out_dataset = dict(dataset)
        original = str(dataset.get("description", "")).strip()
        shift = f"Transformation shift: {kind} ({level}), seed {seed} (segsentry.evaluation.shifts, TorchIO)"
        out_dataset["description"] = f"{shift}. Original: {original}" if original else shift
        if "numTraining" in dataset:
            out_dataset["numTraining"] = written
        write_text_atomic(out_dir / "dataset.json", json.dumps(out_dataset, indent=4) + "\n")
    if failed:
        log.warning("%d of %d case(s) failed: %s", len(failed), len(cases), ", ".join(failed))
    return failed
