"""nnU-Net's Gaussian importance map for sliding-window aggregation, bit-identical, in numpy only.

nnU-Net v2.8.1 ``compute_gaussian`` filters a unit impulse at the patch centre (``i // 2`` per axis) with
``scipy.ndimage.gaussian_filter(sigma=patch * sigma_scale, mode='constant')``, scales the result so that its
maximum equals ``value_scaling_factor``, converts it to float16 with torch and replaces zeros by the smallest
nonzero value.

Filtering an impulse axis after axis leaves, at every voxel, the product of the 1D kernel values, taken in
axis order ``((k0 * k1) * k2)``; every other term scipy adds is an exact zero. The 1D kernels are built with
scipy's ``_gaussian_kernel1d`` expression (radius ``int(truncate * sigma + 0.5)``, normalised by its sum).
torch converts float64 to float16 through float32 (two roundings); that is reproduced here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["gaussian_importance_map", "gaussian_kernel1d"]

_TRUNCATE = 4.0


def gaussian_kernel1d(sigma: float, *, truncate: float = _TRUNCATE) -> np.ndarray:
    """scipy's normalised order-0 Gaussian kernel, (2 * radius + 1,) float64, radius int(truncate*sigma+0.5)."""
    radius = int(truncate * float(sigma) + 0.5)
    sigma2 = sigma * sigma
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / sigma2 * x**2)
    return phi / phi.sum()


def _impulse_response(size: int, sigma: float) -> np.ndarray:
    """1D Gaussian filter (mode 'constant') of a unit impulse at ``size // 2``: (size,) float64."""
    out = np.zeros(size, dtype=np.float64)
    if sigma <= 1e-15:  # scipy skips such axes: the impulse passes unchanged
        out[size // 2] = 1.0
        return out
    kernel = gaussian_kernel1d(sigma)
    radius = (kernel.size - 1) // 2
    offsets = np.arange(size) - size // 2
    inside = np.abs(offsets) <= radius
    out[inside] = kernel[offsets[inside] + radius]
    return out


def gaussian_importance_map(
    patch_size: Sequence[int], *, sigma_scale: float = 1.0 / 8, value_scaling_factor: float = 10.0
) -> np.ndarray:
    """The sliding-window weight map of shape ``patch_size``, float16, maximum ``value_scaling_factor``.

    Bit-identical to ``nnunetv2.inference.sliding_window_prediction.compute_gaussian(tuple(patch_size),
    sigma_scale, value_scaling_factor, dtype=torch.float16, device=cpu).numpy()``. The map contains no zeros.
    """
    size = tuple(int(p) for p in patch_size)
    if not size or any(p < 1 for p in size):
        raise ValueError(f"patch_size must be positive integers, got {tuple(patch_size)}")
    factors = [_impulse_response(p, p * sigma_scale) for p in size]
    gaussian = factors[0]
    for axis, factor in enumerate(factors[1:], start=1):
        gaussian = gaussian[..., None] * factor.reshape((1,) * axis + (factor.size,))
    gaussian = np.ascontiguousarray(gaussian, dtype=np.float64)
    gaussian /= np.max(gaussian) / value_scaling_factor
    # torch's float64 -> float16 conversion rounds to float32 first
    half = gaussian.astype(np.float32).astype(np.float16)
    zero = half == 0
    if np.any(zero):
        half[zero] = np.min(half[~zero])
    return half
