"""Separable convolution and Gaussian blur in numpy (no scipy), for arrays of any dimension."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["FloatArray", "convolve1d", "gaussian_blur", "gaussian_kernel1d"]

_F32 = np.float32

FloatArray = npt.NDArray[np.float32]


def gaussian_kernel1d(sigma: float, *, truncate: float = 3.0) -> npt.NDArray[np.float64]:
    """Normalised 1D Gaussian taps of standard deviation ``sigma`` (in samples).

    The radius is ``int(truncate * sigma + 0.5)`` as in ``scipy.ndimage.gaussian_filter1d``;
    ``sigma <= 0`` gives the identity kernel ``[1.0]``.
    """
    if sigma <= 0:
        return np.ones(1)
    radius = max(1, int(truncate * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def convolve1d(array: npt.ArrayLike, kernel: npt.ArrayLike, *, axis: int) -> FloatArray:
    """Convolve ``array`` with an odd-length, symmetric 1D ``kernel`` along ``axis``.

    Borders repeat the edge sample (scipy's ``mode='nearest'``). Works for any number of dimensions and
    returns a new float32 array of the same shape.
    """
    a = np.asarray(array, dtype=_F32)
    k = np.asarray(kernel, dtype=np.float64).ravel()
    if k.size % 2 != 1:
        raise ValueError(f"convolve1d needs an odd-length kernel, got {k.size} taps.")
    radius = k.size // 2
    if radius == 0:
        return a * _F32(k[0])
    axis = axis % a.ndim
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    out = np.zeros(a.shape, dtype=_F32)
    tmp = np.empty_like(out)
    index: list[slice] = [slice(None)] * a.ndim
    for t in range(k.size):
        index[axis] = slice(t, t + n)
        np.multiply(padded[tuple(index)], _F32(k[::-1][t]), out=tmp)
        out += tmp
    return out


def gaussian_blur(array: npt.ArrayLike, sigma: Sequence[float], *, truncate: float = 3.0) -> FloatArray:
    """Separable Gaussian blur; ``sigma`` holds one standard deviation (in voxels) per array axis.

    For a ``(z, y, x)`` volume pass ``(sigma_z, sigma_y, sigma_x)``; axes with ``sigma <= 0`` are skipped.
    """
    out = np.asarray(array, dtype=_F32)
    if len(sigma) != out.ndim:
        raise ValueError(f"gaussian_blur got {len(sigma)} sigmas for a {out.ndim}-D array.")
    copied = False
    for axis, s in enumerate(sigma):
        if s > 0:
            out = convolve1d(out, gaussian_kernel1d(float(s), truncate=truncate), axis=axis)
            copied = True
    return out if copied else out.copy()
