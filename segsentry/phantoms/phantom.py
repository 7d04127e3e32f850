"""The :class:`Phantom` result type: one synthetic CT volume, its label and its SimpleITK geometry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

__all__ = ["IDENTITY_DIRECTION", "Phantom"]

IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(eq=False)
class Phantom:
    """One synthetic CT volume with its lesion label.

    Attributes:
        image: CT numbers in HU, ``int16``, axes ``(z, y, x)``.
        label: ``uint8`` segmentation, axes ``(z, y, x)``: 0 background, 1 lesion (or, for the
            diagnostic-shift cohort, the abnormality); all zeros for far-OOD cases.
        spacing_xyz: voxel size in mm, SimpleITK order ``(x, y, z)``.
        origin_xyz: physical position (mm) of voxel ``(0, 0, 0)``, order ``(x, y, z)``.
        direction: 3x3 direction cosines, 9 row-major floats as in SimpleITK.
        meta: JSON-serialisable description (cohort, seed, acquisition, patient, lesions...).
        lung_mask: boolean lung-field mask ``(z, y, x)`` (aerated lung plus any pleural fluid), or ``None``.
    """

    image: npt.NDArray[np.int16]
    label: npt.NDArray[np.uint8]
    spacing_xyz: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    direction: tuple[float, ...] = IDENTITY_DIRECTION
    meta: dict[str, Any] = field(default_factory=dict)
    lung_mask: npt.NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        if self.image.ndim != 3:
            raise ValueError(f"Phantom image must be 3D (z, y, x), got shape {self.image.shape}.")
        if self.label.shape != self.image.shape:
            raise ValueError(f"label shape {self.label.shape} differs from image shape {self.image.shape}.")
        if self.lung_mask is not None and self.lung_mask.shape != self.image.shape:
            raise ValueError(f"lung_mask shape {self.lung_mask.shape} differs from image shape {self.image.shape}.")
        if len(self.spacing_xyz) != 3 or len(self.origin_xyz) != 3 or len(self.direction) != 9:
            raise ValueError("spacing_xyz and origin_xyz need 3 values and direction 9.")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        z, y, x = self.image.shape
        return int(z), int(y), int(x)

    def to_sitk(self) -> tuple[sitk.Image, sitk.Image]:
        """Return ``(image, label)`` as SimpleITK images sharing size, spacing, origin and direction."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.image))
        image.SetSpacing(tuple(float(v) for v in self.spacing_xyz))
        image.SetOrigin(tuple(float(v) for v in self.origin_xyz))
        image.SetDirection(tuple(float(v) for v in self.direction))
        label = sitk.GetImageFromArray(np.ascontiguousarray(self.label))
        label.CopyInformation(image)
        return image, label
