"""The scanner model: voxel spacing and slice thickness per cohort, reconstruction kernel and noise level."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segsentry.phantoms.filters import FloatArray, gaussian_blur

_F32 = np.float32

HU_MIN, HU_MAX = -1024, 3071  # the stored CT-number range of the int16 image


@dataclass(frozen=True)
class _Acquisition:
    dx: float
    dy: float
    dz: float
    kernel: str
    kernel_sigma: float  # in-plane Gaussian sigma, voxels
    sharpen: float  # unsharp-mask amount (0: none)
    noise_std: float  # HU, after the kernel


_ID_THICKNESS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
_ID_THICKNESS_P = (0.12, 0.15, 0.18, 0.15, 0.15, 0.10, 0.15)


def _sample_acquisition(rng: np.random.Generator, cohort: str,
                        spacing_xyz: Sequence[float] | None) -> _Acquisition:
    dxy = round(float(rng.uniform(0.7, 0.9)), 4)
    if cohort == "dataset-shift":
        dz = 8.0
        if rng.random() < 0.5:
            kernel, sigma, sharpen, noise = "sharp", rng.uniform(0.35, 0.5), rng.uniform(0.9, 1.4), rng.uniform(40, 65)
        else:
            kernel, sigma, sharpen, noise = "soft", rng.uniform(1.2, 1.6), 0.0, rng.uniform(5, 9)
    else:
        dz = float(rng.choice(_ID_THICKNESS, p=_ID_THICKNESS_P))
        kernel, sigma, sharpen, noise = "standard", rng.uniform(0.55, 0.8), 0.0, rng.uniform(12, 25)
    dx = dy = dxy
    if spacing_xyz is not None:
        if len(spacing_xyz) != 3 or min(spacing_xyz) <= 0:
            raise ValueError(f"spacing_xyz must be three positive numbers (x, y, z), got {spacing_xyz!r}.")
        dx, dy, dz = (float(v) for v in spacing_xyz)
    return _Acquisition(dx, dy, dz, kernel, float(sigma), float(sharpen), float(noise))


def _apply_kernel(vol: FloatArray, acq: _Acquisition) -> FloatArray:
    """In-plane reconstruction-kernel model: Gaussian PSF, plus unsharp masking for sharp kernels."""
    out = gaussian_blur(vol, (0.0, acq.kernel_sigma, acq.kernel_sigma))
    if acq.sharpen > 0:
        low = gaussian_blur(out, (0.0, 1.5, 1.5))
        out -= low
        out *= _F32(acq.sharpen)
        out += gaussian_blur(vol, (0.0, acq.kernel_sigma, acq.kernel_sigma))
    return out


def _kernel_noise_gain(acq: _Acquisition) -> float:
    """Standard deviation of the kernel's output for unit white noise (the L2 norm of its impulse response)."""
    impulse = np.zeros((1, 31, 31), dtype=_F32)
    impulse[0, 15, 15] = 1.0
    return float(np.sqrt(np.sum(_apply_kernel(impulse, acq).astype(np.float64) ** 2)))
