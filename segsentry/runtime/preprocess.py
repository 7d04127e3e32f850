"""nnU-Net v2 preprocessing and export geometry, reproduced in numpy.

Order (nnunetv2 2.8.1 ``DefaultPreprocessor.run_case_npy``): float32 -> ``transpose_forward`` -> crop to the
nonzero bounding box (holes filled) -> normalise per channel -> resample to the configuration spacing.
The inverse (``to_input_geometry``) resamples network-space maps back to the cropped shape, pastes them into
the bounding box and applies ``transpose_backward``, as nnU-Net's export does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from segsentry.errors import BundleError, InputError
from segsentry.manifest import Preprocessing
from segsentry.runtime.crop import crop_to_nonzero, insert_crop
from segsentry.runtime.resample import compute_new_shape, resample_to_shape


@dataclass(frozen=True)
class Geometry:
    """How a preprocessed volume maps back to the input image (all shapes in transposed numpy order)."""

    shape_before_cropping: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]
    shape_after_cropping: tuple[int, ...]
    spacing_transposed: tuple[float, ...]  # input spacing after transpose_forward
    target_spacing: tuple[float, ...]
    shape_preprocessed: tuple[int, ...]


def _normalize_channel(
    image: np.ndarray, mask: np.ndarray, *, scheme: str, use_mask: bool, properties: Mapping[str, float]
) -> np.ndarray:
    """One channel, float32 in place where nnU-Net works in place (its numerics are mirrored exactly)."""
    eps = 1e-8
    if scheme == "CTNormalization":
        missing = {"mean", "std", "percentile_00_5", "percentile_99_5"} - set(properties)
        if missing:
            raise BundleError(f"CTNormalization needs intensity properties {sorted(missing)} in the manifest")
        np.clip(image, properties["percentile_00_5"], properties["percentile_99_5"], out=image)
        image -= properties["mean"]
        image /= max(properties["std"], eps)
        return image
    if scheme == "ZScoreNormalization":
        if use_mask:
            values = image[mask]
            mean = values.mean()
            std = values.std()
            image[mask] = (image[mask] - mean) / (max(std, eps))
        else:
            mean = image.mean()
            std = image.std()
            image -= mean
            image /= max(std, eps)
        return image
    if scheme == "NoNormalization":
        return image
    if scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
        return image
    if scheme == "RGBTo0_1Normalization" or scheme == "RGBTo01Normalization":
        if image.min() < 0 or image.max() > 255:
            raise InputError(f"{scheme} expects 8-bit RGB values in [0, 255], found [{image.min()}, {image.max()}]")
        image /= 255.0
        return image
    raise BundleError(f"normalisation scheme '{scheme}' is not supported by the segsentry runtime")


def preprocess(image: np.ndarray, spacing: Sequence[float], spec: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """Preprocess one case.

    ``image`` is ``(c, z, y, x)`` numpy order (as read by SimpleITK), ``spacing`` is ``(z, y, x)``.
    Returns the network-space volume ``(c, Z, Y, X)`` float32 (transposed order) and its :class:`Geometry`.
    """
    if len(spec.normalization_schemes) != image.shape[0]:
        raise InputError(f"the model expects {len(spec.normalization_schemes)} channel(s), got {image.shape[0]}")
    data = np.array(image, dtype=np.float32)  # our own copy: inputs are never modified
    forward = list(spec.transpose_forward)
    data = data.transpose([0, *[i + 1 for i in forward]])
    spacing_t = tuple(float(spacing[i]) for i in forward)
    shape_before = tuple(int(s) for s in data.shape[1:])
    data, mask, bbox = crop_to_nonzero(data)
    shape_cropped = tuple(int(s) for s in data.shape[1:])
    target = tuple(float(s) for s in spec.spacing)
    new_shape = tuple(int(s) for s in compute_new_shape(shape_cropped, spacing_t, target))
    if min(new_shape) < 1:
        raise InputError(f"the image content ({shape_cropped} voxels at {tuple(round(s, 4) for s in spacing_t)} mm, "
                         f"network axis order) is thinner than one voxel at the model's spacing {target} mm: nothing "
                         "is left to segment; pass the whole volume")
    data = np.ascontiguousarray(data)
    for c in range(data.shape[0]):
        data[c] = _normalize_channel(
            data[c], mask, scheme=spec.normalization_schemes[c], use_mask=bool(spec.use_mask_for_norm[c]),
            properties=spec.intensity_properties.get(str(c), {}),
        )
    kwargs = spec.resampling_data
    data = resample_to_shape(
        data, new_shape, spacing_t, target, order=int(kwargs["order"]), order_z=int(kwargs["order_z"]),
        force_separate_z=kwargs.get("force_separate_z"), anisotropy_threshold=spec.anisotropy_threshold,
    )
    geometry = Geometry(
        shape_before_cropping=shape_before,
        bbox=tuple((int(a), int(b)) for a, b in bbox),
        shape_after_cropping=shape_cropped,
        spacing_transposed=spacing_t,
        target_spacing=target,
        shape_preprocessed=new_shape,
    )
    return data, geometry


def resample_to_cropped(maps: np.ndarray, geometry: Geometry, spec: Preprocessing) -> np.ndarray:
    """Resample network-space maps ``(k, Z, Y, X)`` to the cropped input grid (nnU-Net's probability resampling).

    The output dtype is the input dtype (nnU-Net resamples its float16 logits into float16).
    """
    kwargs = spec.resampling_probabilities
    return resample_to_shape(
        maps, geometry.shape_after_cropping, geometry.target_spacing, geometry.spacing_transposed,
        order=int(kwargs["order"]), order_z=int(kwargs["order_z"]),
        force_separate_z=kwargs.get("force_separate_z"), anisotropy_threshold=spec.anisotropy_threshold,
    )


def to_input_geometry(cropped: np.ndarray, geometry: Geometry, spec: Preprocessing, *, fill: float = 0) -> np.ndarray:
    """Paste a cropped-grid map ``(z', y', x')`` (transposed order) into the full grid and undo the transpose.

    Returns a ``(z, y, x)`` array in the input image's numpy order. When nothing was cropped (a CT's air is
    not zero) ``cropped`` itself is used, not copied into a second volume: the result may share its memory.
    """
    if tuple(cropped.shape) == tuple(geometry.shape_before_cropping):
        full = cropped
    else:
        full = np.full(geometry.shape_before_cropping, fill, dtype=cropped.dtype)
        full = insert_crop(full, cropped, [list(b) for b in geometry.bbox])
    return np.ascontiguousarray(full.transpose(spec.transpose_backward))
