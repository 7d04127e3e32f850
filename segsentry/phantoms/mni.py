"""The real MNI152 T1 brain template shipped inside nilearn, as a far-OOD (brain MR) case for chest-CT models.

Nothing is downloaded: the template is the NIfTI file that the nilearn wheel carries in
``nilearn/datasets/data`` (the file behind ``nilearn.datasets.load_mni152_template``). It is read with
nibabel (a nilearn dependency) and its RAS affine is converted to SimpleITK's LPS convention by
negating the first two rows, i.e. the x and y components of the direction cosines and of the origin.

Only numpy and SimpleITK are imported at module level; nilearn/nibabel are looked up inside
:func:`load_mni152_t1`.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from segsentry.errors import InputError, MissingDependencyError
from segsentry.phantoms.phantom import Phantom

logger = logging.getLogger(__name__)

__all__ = ["MNI152_T1_FILENAME", "load_mni152_t1", "mni152_t1_path", "ras_affine_to_lps"]

MNI152_T1_FILENAME = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_PURPOSE = "The MNI152 far-OOD case"


def ras_affine_to_lps(affine: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float],
                                                   tuple[float, ...]]:
    """Split a 4x4 NIfTI (RAS) voxel-to-world affine into SimpleITK ``spacing, origin, direction`` (LPS).

    The affine maps voxel indices ``(i, j, k)`` (= x, y, z) to RAS millimetres. Spacing is the norm of each
    column, the direction the normalised columns; RAS becomes LPS by negating the first two rows.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise InputError(f"Expected a 4x4 affine, got shape {a.shape}.")
    m = a[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"Degenerate affine (zero-length column): {a.tolist()}.")
    flip = np.diag([-1.0, -1.0, 1.0])
    direction = flip @ (m / spacing)
    origin = flip @ a[:3, 3]
    return (tuple(float(v) for v in spacing), tuple(float(v) for v in origin),  # type: ignore[return-value]
            tuple(float(v) for v in direction.ravel()))


def mni152_t1_path() -> Path:
    """Path of the MNI152 T1 template packaged in the installed nilearn (never downloads).

    Raises:
        MissingDependencyError: nilearn is not installed.
        InputError: nilearn is installed but does not carry the template file.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("nilearn", "eval", _PURPOSE)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "datasets" / "data" / MNI152_T1_FILENAME
        if candidate.is_file():
            return candidate
    try:  # another nilearn layout: ask nilearn itself (a constant pointing into its package data)
        from nilearn.datasets import MNI152_FILE_PATH
    except ImportError as exc:
        raise MissingDependencyError("nilearn", "eval", _PURPOSE) from exc
    path = Path(MNI152_FILE_PATH)
    if not path.is_file():
        raise InputError(f"nilearn is installed but its packaged MNI152 template is missing: {path}.")
    return path


def load_mni152_t1() -> Phantom:
    """Load nilearn's packaged 1 mm MNI152 (ICBM 2009a symmetric) T1 template as a far-OOD :class:`Phantom`.

    ``image`` holds the template's own MR intensities (0-255, not HU) as int16, axes ``(z, y, x)``;
    ``label`` and ``lung_mask`` are all zeros; spacing/origin/direction are the LPS (SimpleITK) form of
    the file's RAS affine, so :meth:`Phantom.to_sitk` gives the same geometry as ``sitk.ReadImage``.

    Raises:
        MissingDependencyError: nilearn (or its nibabel dependency) is not installed.
    """
    path = mni152_t1_path()
    if importlib.util.find_spec("nibabel") is None:
        raise MissingDependencyError("nilearn", "eval", _PURPOSE)
    import nibabel  # a nilearn dependency; imported lazily

    nii = nibabel.load(str(path))
    data = np.asanyarray(nii.dataobj)
    if data.ndim != 3:
        raise InputError(f"Expected a 3D MNI152 template, got shape {data.shape} from {path}.")
    spacing, origin, direction = ras_affine_to_lps(nii.affine)
    image = np.ascontiguousarray(np.transpose(data, (2, 1, 0))).astype(np.int16)
    logger.debug("loaded MNI152 T1 template %s shape(zyx)=%s", path, image.shape)
    zeros = np.zeros(image.shape, dtype=np.uint8)
    meta = {
        "generator": "segsentry.phantoms.mni",
        "cohort": "far-ood",
        "region": "brain",
        "modality": "MR-T1",
        "source": "nilearn MNI152 ICBM 2009a symmetric T1 template (packaged, skull-stripped)",
        "source_path": str(path),
        "intensity_units": "MR template values 0-255 (not HU)",
        "shape_zyx": list(image.shape),
        "spacing_xyz": list(spacing),
        "lesion_count": 0,
        "lesion_kinds": [],
        "lobes": [],
        "lesions": [],
        "label_voxels": 0,
    }
    return Phantom(image=image, label=zeros, spacing_xyz=spacing, origin_xyz=origin, direction=direction, meta=meta,
                   lung_mask=zeros.astype(bool))
