"""Test DICOM series: a tiny volume written as a proper multi-slice series (one file per slice, positions from
the geometry, one Study/Series/FrameOfReference UID), with a rotated direction so orientation bugs show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from factory import ROTATED_DIRECTION, ct_volume


def ct_image(seed: int = 7, shape_zyx=(12, 80, 70), spacing_xyz=(0.8, 0.75, 4.0),
             direction=ROTATED_DIRECTION) -> sitk.Image:
    """The factory's tiny CT (the tiny CT pipeline's kind of case) as a SimpleITK image."""
    image = sitk.GetImageFromArray(ct_volume(np.random.default_rng(seed), shape_zyx))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin((10.0, -20.0, 5.0))
    image.SetDirection(direction)
    return image


def write_ct_series(folder: Path, image: sitk.Image | None = None, **info) -> Path:
    from segsentry.dicom.series import SeriesInfo, write_series

    write_series(image if image is not None else ct_image(), folder, SeriesInfo(**info))
    return folder
