"""Cropping to the nonzero region, as nnU-Net v2.8.1 does it, with numpy and SimpleITK only.

nnU-Net (``nnunetv2.preprocessing.cropping.cropping``) takes the union over channels of ``data != 0``, fills
its holes with ``scipy.ndimage.binary_fill_holes`` (face connectivity), and crops all channels to the
half-open bounding box of that mask (``acvl_utils`` ``get_bbox_from_mask``). The hole filling here is
SimpleITK's ``BinaryFillhole`` with face connectivity: background components that do not touch the array
border are holes, which is what ``binary_fill_holes`` computes. All results are exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = ["bbox_from_mask", "crop_to_nonzero", "fill_holes", "insert_crop", "nonzero_mask"]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a 1D, 2D or 3D boolean mask like ``scipy.ndimage.binary_fill_holes``.

    A hole is a background region that is not face-connected (through background) to the array border;
    background regions touching any face of the array are kept. Returns a new bool array of the same shape.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim not in (1, 2, 3):
        raise ValueError(f"fill_holes supports masks with 1 to 3 axes, got shape {mask.shape}")
    if mask.size == 0 or mask.all():
        return mask.copy()
    if mask.ndim == 1:
        # a line: everything between the first and the last foreground sample is a hole
        filled = mask.copy()
        idx = np.flatnonzero(mask)
        if idx.size:
            filled[idx[0] : idx[-1] + 1] = True
        return filled
    # ITK's BinaryFillhole labels the background with face connectivity (fullyConnected=False) and fills
    # the components that have no pixel on the image border: the definition binary_fill_holes uses.
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask).view(np.uint8), isVector=False)
    filled = sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)
    return sitk.GetArrayFromImage(filled).astype(bool)


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Union over channels of ``data != 0`` with holes filled; ``data`` is (c, *spatial), the mask is spatial.

    Same as nnU-Net's ``create_nonzero_mask``.
    """
    data = np.asarray(data)
    if data.ndim < 2:
        raise ValueError(f"data must have shape (c, *spatial), got shape {data.shape}")
    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    return fill_holes(mask)


def bbox_from_mask(mask: np.ndarray) -> list[list[int]]:
    """Half-open bounding box ``[[start, end), ...]`` of the True voxels, one pair per axis.

    Like ``acvl_utils`` ``get_bbox_from_mask``: an axis without any True voxel (an all-False mask) spans
    the whole axis, so an empty mask gives the full box.
    """
    mask = np.asarray(mask, dtype=bool)
    box: list[list[int]] = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others)) if others else np.flatnonzero(mask)
        if hit.size:
            box.append([int(hit[0]), int(hit[-1]) + 1])
        else:
            box.append([0, int(mask.shape[axis])])
    return box


def crop_to_nonzero(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Crop (c, *spatial) ``data`` to the bounding box of its hole-filled nonzero mask.

    Returns ``(cropped, mask, bbox)``: ``cropped`` is a view ``data[:, box]`` (as in nnU-Net), ``mask`` the
    cropped filled mask as a spatial bool array (nnU-Net stores it as ``seg = where(mask, 0, -1)`` with a
    leading axis of 1), and ``bbox`` the half-open box in the spatial axes.
    """
    data = np.asarray(data)
    mask = nonzero_mask(data)
    bbox = bbox_from_mask(mask)
    box = tuple(slice(a, b) for a, b in bbox)
    return data[(slice(None), *box)], mask[box], bbox


def insert_crop(target: np.ndarray, crop: np.ndarray, bbox: Sequence[Sequence[int]]) -> np.ndarray:
    """Write ``crop`` into ``target`` at the half-open ``bbox`` (in place) and return ``target``.

    ``bbox`` covers the last ``len(bbox)`` axes of ``target``; leading axes must match between ``crop`` and
    ``target``. As in ``acvl_utils`` ``insert_crop_into_image``, only the part of the box inside ``target``
    is written, and a box entirely outside leaves ``target`` unchanged.
    """
    box = [[int(a), int(b)] for a, b in bbox]
    n_box = len(box)
    if crop.ndim < n_box or target.ndim < n_box:
        raise ValueError(f"bbox has {n_box} axes, crop has {crop.ndim} and target {target.ndim}")
    lead = target.ndim - n_box
    if target.shape[:lead] != crop.shape[:lead]:
        raise ValueError(f"leading axes differ: target {target.shape[:lead]}, crop {crop.shape[:lead]}")
    target_slices: list[slice] = [slice(None)] * lead
    crop_slices: list[slice] = [slice(None)] * lead
    for i, (lo, hi) in enumerate(box):
        size = target.shape[lead + i]
        if hi <= 0 or lo >= size:
            return target
        start, end = max(0, lo), min(hi, size)
        crop_start = max(0, -lo)
        target_slices.append(slice(start, end))
        crop_slices.append(slice(crop_start, crop_start + end - start))
    target[tuple(target_slices)] = crop[tuple(crop_slices)]
    return target
