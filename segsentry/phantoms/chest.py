"""Procedural, seeded chest-CT phantoms (and an abdominal far-OOD counterpart) built with numpy only.

The phantoms stand in for the COVID-19 lung-lesion CT data of the OOD-detection study (Gonzalez et al.):
an in-distribution cohort (``"id"``), an acquisition shift (``"dataset-shift"``: 8 mm slices, another noise
level and reconstruction kernel, other patient sizes -- the Mosmed/Radiopaedia analogue), a diagnostic
shift (``"diagnostic-shift"``: fibrotic reticulation, solid nodules and pleural effusions instead of
COVID-19 ground glass and consolidation) and a far-OOD cohort (``"far-ood"``: an abdomen without lungs).

Anatomy
    Every structure is defined analytically in an adult-sized patient frame ("real" millimetres:
    ``X`` towards the patient's left, ``Y`` towards the back, ``Z`` towards the head, origin at the carina
    for the chest and at the liver dome for the abdomen) and rasterised onto the voxel grid. The anatomy is
    scaled to the in-plane field of view, so a 160-voxel grid at 0.8 mm (128 mm across) holds a ~1:3
    miniature of an adult chest sampled at clinical voxel spacing; ``meta["scale"]`` is the ratio (image mm
    per adult mm). The same isotropic ratio is applied along ``z``, so thick slices really hold fewer,
    partial-volumed slices through the lungs. ``shape=(n, 512, 512)`` gives a life-size phantom.

Arrays and geometry
    numpy arrays are indexed ``(z, y, x)``; ``spacing_xyz``, ``origin_xyz`` and ``direction`` follow
    SimpleITK (``x, y, z`` order, direction as 9 row-major floats). With the default identity direction
    the index axes point to the patient's left, back and head (DICOM LPS): row 0 of an axial slice is
    anterior, column 0 is the patient's right, slice 0 is the most caudal.

Only numpy and SimpleITK are imported; blurring uses the small separable convolution helpers below.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

logger = logging.getLogger(__name__)

__all__ = [
    "COHORTS",
    "IDENTITY_DIRECTION",
    "Phantom",
    "convolve1d",
    "gaussian_blur",
    "gaussian_kernel1d",
    "make_chest_ct",
]

COHORTS: tuple[str, ...] = ("id", "dataset-shift", "diagnostic-shift", "far-ood")
IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
DEFAULT_INPLANE = 160
GENERATOR_VERSION = 1

_COHORT_KEYS = {name: i for i, name in enumerate(COHORTS)}
_F32 = np.float32
HU_MIN, HU_MAX = -1024, 3071

FloatArray = npt.NDArray[np.float32]
Box = tuple[slice, slice, slice]


# --------------------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# numpy filtering helpers (no scipy)
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Rendering grid and analytic shape helpers (all distances in "real" adult millimetres)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    """Sample positions of the render grid in real mm: ``x`` (nx,), ``y`` (ny,), ``z`` (nz_render,)."""

    x: FloatArray
    y: FloatArray
    z: FloatArray
    h: float  # in-plane sample distance (real mm), the width of soft edges

    @property
    def X(self) -> FloatArray:  # noqa: N802 - coordinate arrays read best capitalised
        return self.x[None, None, :]

    @property
    def Y(self) -> FloatArray:  # noqa: N802
        return self.y[None, :, None]

    @property
    def Z(self) -> FloatArray:  # noqa: N802
        return self.z[:, None, None]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.z.size, self.y.size, self.x.size

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Box | None:
        """Index box (z, y, x slices) of the samples inside the real-mm bounds ``lo..hi`` (x, y, z).

        The sample positions along each axis are evenly spaced and increasing.
        """
        out = []
        for v, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            n = v.size
            step = float(v[1] - v[0]) if n > 1 else 1.0
            i0 = max(0, math.ceil((a - float(v[0])) / step - 1e-6))
            i1 = min(n, math.floor((b - float(v[0])) / step + 1e-6) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def sub(self, box: Box) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Broadcastable coordinate arrays ``(X, Y, Z)`` of a box."""
        bz, by, bx = box
        return self.x[bx][None, None, :], self.y[by][None, :, None], self.z[bz][:, None, None]


def _inside(sdf: npt.ArrayLike, h: float) -> FloatArray:
    """Soft membership (0..1, partial volume over ~one voxel) of a signed distance (negative inside)."""
    return np.clip(_F32(0.5) - np.asarray(sdf, dtype=_F32) / _F32(h), 0.0, 1.0)


def _blend(target: FloatArray, weight: npt.ArrayLike, value: npt.ArrayLike) -> None:
    """In place ``target += weight * (value - target)``."""
    tmp = np.subtract(value, target, dtype=_F32)
    tmp *= weight
    target += tmp


def _ellipse(dx: npt.ArrayLike, dy: npt.ArrayLike, a: float, b_neg: float,
             b_pos: float | None = None) -> tuple[FloatArray, FloatArray]:
    """Normalised radius ``rho`` and local radius ``reff`` of an (asymmetric) ellipse.

    ``b_neg``/``b_pos`` are the semi-axes towards negative/positive ``dy``. ``(rho - c) * reff`` approximates
    the signed distance (mm) to the ellipse scaled by ``c`` about its centre.
    """
    dx = np.asarray(dx, dtype=_F32)
    dy = np.asarray(dy, dtype=_F32)
    if b_pos is None:
        b: npt.ArrayLike = _F32(b_neg)
        bmin = bmax = b_neg
    else:
        b = np.where(dy < 0, _F32(b_neg), _F32(b_pos))
        bmin, bmax = min(b_neg, b_pos), max(b_neg, b_pos)
    u = dx / _F32(a)
    v = dy / b
    rho = np.sqrt(u * u + v * v)
    grad = np.sqrt((u / _F32(a)) ** 2 + (v / b) ** 2)
    reff = np.clip(rho / np.maximum(grad, _F32(1e-12)), min(a, bmin), max(a, bmax))
    return rho, reff.astype(_F32)


def _ellipsoid_sdf(X: npt.ArrayLike, Y: npt.ArrayLike, Z: npt.ArrayLike,  # noqa: N803
                   c: Sequence[float], r: Sequence[float], angle: float = 0.0) -> FloatArray:
    """Approximate signed distance (mm) to an ellipsoid (scaled by its smallest radius).

    The ellipsoid is rotated by ``angle`` (radians) about the z axis, from +x towards +y.
    """
    dx = np.asarray(X, dtype=_F32) - _F32(c[0])
    dy = np.asarray(Y, dtype=_F32) - _F32(c[1])
    if angle:
        ca, sa = _F32(math.cos(angle)), _F32(math.sin(angle))
        dx, dy = dx * ca + dy * sa, dy * ca - dx * sa
    u = (dx / _F32(r[0])) ** 2 + (dy / _F32(r[1])) ** 2
    w = ((np.asarray(Z, dtype=_F32) - _F32(c[2])) / _F32(r[2])) ** 2
    return (np.sqrt(u + w) - _F32(1.0)) * _F32(min(r))


def _segment_distance(X: FloatArray, Y: FloatArray, Z: FloatArray,  # noqa: N803
                      p0: npt.NDArray[np.float64], p1: npt.NDArray[np.float64]) -> FloatArray:
    """Distance (mm) from broadcastable points to the segment ``p0``-``p1``."""
    d = (p1 - p0).astype(np.float64)
    ax, ay, az = X - _F32(p0[0]), Y - _F32(p0[1]), Z - _F32(p0[2])
    length2 = float(d @ d)
    if length2 < 1e-12:
        return np.sqrt(ax * ax + ay * ay + az * az)
    t = (ax * _F32(d[0] / length2) + ay * _F32(d[1] / length2)) + az * _F32(d[2] / length2)
    np.clip(t, 0.0, 1.0, out=t)
    ex = ax - t * _F32(d[0])
    ey = ay - t * _F32(d[1])
    ez = az - t * _F32(d[2])
    return np.sqrt(ex * ex + ey * ey + ez * ez)


def _render_tubes(g: _Grid, segments: npt.NDArray[np.float64], out: FloatArray, *, pad: float = 0.0,
                  weight: FloatArray | None = None) -> None:
    """Max-accumulate the partial-volume occupancy of tubes into ``out`` (render-grid shaped).

    ``segments`` rows are ``x0, y0, z0, x1, y1, z1, radius`` in real mm; ``pad`` is added to every radius
    (tube walls). Tubes wider than two voxels get a one-voxel soft edge; thinner ones a Gaussian profile
    whose cross-section integral equals ``pi r**2``, so small vessels fade instead of growing.
    """
    h = g.h
    for row in segments:
        p0, p1, r = row[:3], row[3:6], float(row[6]) + pad
        if r <= 0:
            continue
        thin = r < 2.0 * h
        sigma2 = 0.5 * r * r + (0.42 * h) ** 2
        m = 2.6 * math.sqrt(sigma2) if thin else r + 1.5 * h
        box = g.box(np.minimum(p0, p1) - m, np.maximum(p0, p1) + m)
        if box is None:
            continue
        X, Y, Z = g.sub(box)  # noqa: N806
        dist = _segment_distance(X, Y, Z, p0, p1)
        if thin:
            occ = np.exp(dist * dist * _F32(-0.5 / sigma2)) * _F32(min(1.0, r * r / (2.0 * sigma2)))
        else:
            occ = np.clip((_F32(r) - dist) / _F32(h) + _F32(0.5), 0.0, 1.0)
        if weight is not None:
            occ *= weight[box]
        np.maximum(out[box], occ, out=out[box])


def _waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> npt.NDArray[np.float64]:
    """``n`` random plane waves as rows ``kx, ky, kz, phase`` with wavelengths drawn from ``wavelength`` (mm)."""
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = 2 * np.pi / rng.uniform(*wavelength, size=n)
    return np.column_stack([dirs * k[:, None], rng.uniform(0, 2 * np.pi, size=n)])


def _wave_field(waves: npt.NDArray[np.float64], X: npt.ArrayLike, Y: npt.ArrayLike,  # noqa: N803
                Z: npt.ArrayLike) -> FloatArray:
    """Mean of ``sin(k . p + phase)`` over the waves: smooth noise in ``[-1, 1]``."""
    acc: FloatArray | None = None
    for kx, ky, kz, ph in waves:
        s = np.sin((np.asarray(X, dtype=_F32) * _F32(kx) + np.asarray(Y, dtype=_F32) * _F32(ky))
                   + (np.asarray(Z, dtype=_F32) * _F32(kz) + _F32(ph)))
        acc = s if acc is None else acc + s
    assert acc is not None
    return acc / _F32(len(waves))


def _unit(v: npt.ArrayLike) -> npt.NDArray[np.float64]:
    a = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(a, axis=-1, keepdims=True)
    return a / np.maximum(n, 1e-12)


def _territory_tree(rng: np.random.Generator, start: Sequence[float], points: npt.NDArray[np.float64], *,
                    r0: float, n_min: int, r_min: float = 0.0, jitter: float = 0.12,
                    ) -> npt.NDArray[np.float64]:
    """Grow a space-filling branching tree from ``start`` into the cloud ``points`` (``(n, 3)`` real mm).

    Constructive territory splitting: a branch heads part-way towards the centroid of its territory (the
    points it supplies), the territory is cut across its longest principal axis at a random quantile and each
    half feeds one child. Radii follow Murray's law (``r**3`` proportional to the territory size), so the
    tree tapers from ``r0`` to its terminal branches; a branch with fewer than ``n_min`` points or a radius
    below ``r_min`` ends at its territory's centroid. Returns rows ``x0, y0, z0, x1, y1, z1, radius``.
    """
    n_total = len(points)
    rows: list[list[float]] = []
    if n_total == 0:
        return np.zeros((0, 7))
    stack: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], bool]] = [
        (np.asarray(start, dtype=np.float64), points, True)]
    while stack:
        p, terr, root = stack.pop()
        n = len(terr)
        r = r0 * (n / n_total) ** (1.0 / 3.0)
        c = terr.mean(axis=0)
        if n < n_min or r < r_min:
            rows.append([*p, *c, max(r, 1e-3)])
            continue
        dist = float(np.linalg.norm(c - p))
        f = rng.uniform(0.3, 0.45) if root else rng.uniform(0.4, 0.7)
        e = p + f * (c - p) + rng.normal(0.0, jitter * dist, 3)
        rows.append([*p, *e, r])
        centred = terr - c
        cov = centred.T @ centred
        _w, vecs = np.linalg.eigh(cov)
        axis = _unit(vecs[:, -1] + rng.normal(0.0, 0.25, 3))
        proj = centred @ axis
        split = int(rng.uniform(0.3, 0.7) * n)
        split = max(1, min(n - 1, split))
        order = np.argpartition(proj, split)
        for part in (terr[order[:split]], terr[order[split:]]):
            stack.append((e, part, False))
    return np.asarray(rows, dtype=np.float64)


# --------------------------------------------------------------------------------------------------------
# Acquisition
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Shared patient parts: table, body wall, ribs, spine
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Body:
    a: float  # half width
    b_ant: float
    b_post: float
    fat: float  # subcutaneous fat thickness
    muscle: float  # muscle layer thickness (anterior/lateral)
    a_cav: float  # cavity (inside ribs) semi-axes
    bc_ant: float
    bc_post: float
    z_neck: float  # above this the body narrows
    fat_hu: float
    muscle_hu: float

    @property
    def y_back(self) -> float:
        return 0.93 * self.b_post

    def scale(self, Z: npt.ArrayLike) -> FloatArray:  # noqa: N803
        return (1.0 - 0.18 * np.clip((np.asarray(Z, dtype=_F32) - _F32(self.z_neck)) / _F32(120.0), 0.0, 1.0) ** 2
                ).astype(_F32)


def _sample_body(rng: np.random.Generator, *, a: float, fat: float, ap_ratio: float, back_muscle: float,
                 z_neck: float) -> _Body:
    b_ant = a * ap_ratio
    b_post = b_ant * rng.uniform(0.86, 0.93)
    muscle = rng.uniform(9.0, 14.0)
    a_cav = a - fat - muscle - 10.0
    bc_ant = b_ant - fat - muscle - 8.0
    bc_post = b_post - fat - back_muscle
    return _Body(a=a, b_ant=b_ant, b_post=b_post, fat=fat, muscle=muscle, a_cav=a_cav, bc_ant=bc_ant,
                 bc_post=bc_post, z_neck=z_neck, fat_hu=rng.uniform(-110, -85), muscle_hu=rng.uniform(38, 55))


def _table_2d(g: _Grid, body: _Body, rng: np.random.Generator) -> FloatArray:
    """Air plus the patient table (carbon skins around a foam core) under the back, shape (ny, nx)."""
    X, Y = g.x[None, :], g.y[:, None]  # noqa: N806
    top = body.y_back + rng.uniform(0.5, 4.0) - (X**2) / _F32(2 * 650.0)
    depth = Y - top
    half_w = 230.0
    inside_w = _inside(np.abs(X) - _F32(half_w), g.h)
    skin = _inside(np.abs(depth - _F32(1.2)) - _F32(1.2), g.h) + _inside(np.abs(depth - _F32(34.0)) - _F32(1.2), g.h)
    core = _inside(np.abs(depth - _F32(17.6)) - _F32(15.2), g.h)
    out = np.full(g.shape[1:], -1000.0, dtype=_F32)
    _blend(out, core * inside_w, _F32(-995.0))
    _blend(out, np.minimum(skin, 1.0) * inside_w, _F32(rng.uniform(150, 350)))
    return out


def _body_layers(g: _Grid, body: _Body, hu: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Blend skin/subcutaneous fat and the muscle layer into ``hu``; return body and cavity sdf (mm, 3D)."""
    X, Y, Z = g.X, g.Y, g.Z  # noqa: N806
    cz = body.scale(Z)
    rho, reff = _ellipse(X, Y, body.a, body.b_ant, body.b_post)
    sdf_body = np.maximum((rho - cz) * reff, (Y - _F32(body.y_back)))
    _blend(hu, _inside(sdf_body, g.h), _F32(body.fat_hu))
    rho_m, reff_m = _ellipse(X, Y, body.a - body.fat, body.b_ant - body.fat, body.b_post - body.fat)
    sdf_muscle = np.maximum((rho_m - cz) * reff_m, (Y - _F32(body.y_back - body.fat)))
    _blend(hu, _inside(sdf_muscle, g.h), _F32(body.muscle_hu))
    rho_c, reff_c = _ellipse(X, Y, body.a_cav, body.bc_ant, body.bc_post)
    sdf_cav = (rho_c - cz) * reff_c
    return sdf_body, sdf_cav


@dataclass
class _Ribs:
    z0: float  # posterior centre height of rib 0
    pitch: float
    drop: float  # how far a rib descends from its back to its front end
    half_height: float
    half_thick: float
    offset: float  # centre distance outside the cavity wall
    psi_end: tuple[float, ...]  # bone end angle per rib (0 = spine, pi = sternum)
    psi_cart: tuple[float, ...]  # cartilage end angle per rib
    cortex_hu: float
    marrow_hu: float
    cartilage_hu: float


def _ribs(g: _Grid, ribs: _Ribs, sdf_cav: FloatArray, hu: FloatArray) -> None:
    """Blend the ribs (oblique bone arcs with a cortical shell) and costal cartilages into ``hu``."""
    psi = np.arctan2(np.abs(g.x)[None, :], g.y[:, None]).astype(_F32)  # (ny, nx), 0 posterior
    band = np.abs(sdf_cav - _F32(ribs.offset)) < _F32(ribs.half_thick + 2 * g.h)
    if not band.any():
        return
    zz, yy, xx = np.nonzero(band)
    z = g.z[zz]
    ps = psi[yy, xx]
    dz_cav = sdf_cav[zz, yy, xx] - _F32(ribs.offset)
    k_real = (_F32(ribs.z0) - _F32(ribs.drop) * (ps / _F32(np.pi)) - z) / _F32(ribs.pitch)
    k = np.rint(k_real)
    dzr = (k_real - k) * _F32(ribs.pitch)
    n = len(ribs.psi_end)
    valid = (k >= 0) & (k < n)
    ki = np.clip(k, 0, n - 1).astype(np.intp)
    psi_end = np.asarray(ribs.psi_end, dtype=_F32)[ki]
    psi_cart = np.asarray(ribs.psi_cart, dtype=_F32)[ki]
    rho = np.sqrt((dzr / _F32(ribs.half_height)) ** 2 + (dz_cav / _F32(ribs.half_thick)) ** 2)
    memb = _inside((rho - _F32(1.0)) * _F32(ribs.half_thick), g.h)
    bone = valid & (ps > _F32(0.1 * np.pi)) & (ps < psi_end)
    cart = valid & (ps >= psi_end) & (ps < psi_cart)
    value = np.where(cart, _F32(ribs.cartilage_hu),
                     _F32(ribs.marrow_hu) + _F32(ribs.cortex_hu - ribs.marrow_hu)
                     * np.clip((rho - _F32(0.45)) / _F32(0.35), 0.0, 1.0))
    w = memb * (bone | cart)
    vals = hu[zz, yy, xx]
    hu[zz, yy, xx] = vals + w * (value - vals)


@dataclass
class _Spine:
    x: float
    y: float  # vertebral body centre
    radius: float
    pitch: float  # vertebral level height
    disc: float  # disc height
    phase: float
    canal_r: float
    spinous: float  # spinous process length
    transverse: float  # transverse process reach
    cancellous_hu: float
    cortex_hu: float
    disc_hu: float

    @property
    def canal_y(self) -> float:
        return self.y + self.radius + self.canal_r + 2.5


def _spine(g: _Grid, sp: _Spine, hu: FloatArray, rng: np.random.Generator) -> None:
    """Blend vertebral bodies (cancellous core, cortical rim, discs) and posterior elements into ``hu``."""
    reach = max(sp.radius + 6.0, sp.transverse + 8.0)
    box = g.box((sp.x - reach, sp.y - sp.radius - 6.0, -1e9),
                (sp.x + reach, sp.canal_y + sp.canal_r + sp.spinous + 8.0, 1e9))
    if box is None:
        return
    X, Y, Z = g.sub(box)  # noqa: N806
    view = hu[box]
    h = g.h
    # level structure along z (1D)
    frac = np.mod((Z - _F32(sp.phase)) / _F32(sp.pitch), 1.0)
    dist_disc = (np.abs(frac - _F32(0.5)) * _F32(sp.pitch)) - _F32(sp.disc / 2)
    disc_w = _inside(dist_disc, max(h, float(g.z[1] - g.z[0]) if g.z.size > 1 else h))  # 1 inside a disc
    post_w = ((frac > 0.62) | (frac < 0.04)).astype(_F32)  # posterior elements in part of each level
    # vertebral body
    rho, reff = _ellipse(X - _F32(sp.x), Y - _F32(sp.y), sp.radius * 1.12, sp.radius * 0.95, sp.radius)
    sdf_b = (rho - _F32(1.0)) * reff  # (1, ny, nx)
    texture = _F32(35.0) * _wave_field(_waves(rng, 3, (4.0, 9.0)), X, Y, Z)
    core = _F32(sp.cancellous_hu) + texture
    rim = np.clip((sdf_b + _F32(2.8)) / _F32(1.2), 0.0, 1.0)
    body_val = core + rim * (_F32(sp.cortex_hu) - core)
    body_val = body_val + disc_w * (_F32(sp.disc_hu) - body_val)
    _blend(view, _inside(sdf_b, h), body_val)
    # canal, arch, spinous and transverse processes
    cy = sp.canal_y
    dcan = np.sqrt((X - _F32(sp.x)) ** 2 + (Y - _F32(cy)) ** 2)
    arch = _inside(np.abs(dcan - _F32(sp.canal_r + 2.5)) - _F32(2.5), h)
    arch = arch * _inside(_F32(cy - sp.canal_r * 0.6) - Y, h)
    sp_seg = np.array([[sp.x, cy + sp.canal_r, 0.0], [sp.x, cy + sp.canal_r + sp.spinous, 0.0]])
    spin = _inside(_segment_distance(X, Y, _F32(0.0) * X, sp_seg[0], sp_seg[1]) - _F32(3.0), h)
    trans = np.zeros_like(spin)
    for s in (-1.0, 1.0):
        p0 = np.array([sp.x + s * (sp.canal_r + 3.0), cy - 1.0, 0.0])
        p1 = np.array([sp.x + s * sp.transverse, cy + 5.0, 0.0])
        trans = np.maximum(trans, _inside(_segment_distance(X, Y, _F32(0.0) * X, p0, p1) - _F32(4.0), h))
    post = np.maximum(arch, np.maximum(spin, trans)) * post_w + arch * (_F32(1.0) - post_w) * _F32(0.9)
    _blend(view, post, _F32(sp.cortex_hu * 0.8))
    _blend(view, _inside(dcan - _F32(sp.canal_r), h), _F32(25.0))


# --------------------------------------------------------------------------------------------------------
# Chest anatomy
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Chest:
    body: _Body
    spine: _Spine
    ribs: _Ribs
    xm: float  # mediastinum centre x
    w_med: float  # mediastinum half width (lower)
    heart_c: tuple[float, float, float]
    heart_r: tuple[float, float, float]
    heart_angle: float
    z_dome_r: float
    z_dome_l: float
    dia_lat: float
    dia_post: float
    lung_cx: float
    lung_a: float
    lung_cy: float
    lung_b: float
    z_apex: float
    z_sh: float
    apex_h: float
    apex_a: float
    apex_b: float
    apex_y: float
    fissure_z0: float
    fissure_k: float
    lung_hu: float
    lung_grad: float
    trachea_y: float
    aorta: tuple[float, float, float]  # descending aorta x, y, radius
    z_top: float
    z_bot: float

    def w_med_z(self, Z: npt.ArrayLike, Y: npt.ArrayLike | None = None) -> FloatArray:  # noqa: N803
        """Mediastinum half width: wider in the upper mediastinum (great vessels), narrow anteriorly."""
        w = _F32(self.w_med) + _F32(9.0) * np.clip((np.asarray(Z, dtype=_F32) + _F32(30.0)) / _F32(40.0), 0, 1)
        if Y is not None:
            front = np.clip((np.asarray(Y, dtype=_F32) + _F32(self.body.bc_ant)) / _F32(0.7 * self.body.bc_ant), 0, 1)
            w = w * (_F32(0.4) + _F32(0.6) * front * front * (_F32(3.0) - _F32(2.0) * front))
        return np.asarray(w, dtype=_F32)

    def apex(self, X: npt.ArrayLike, Y: npt.ArrayLike) -> FloatArray:  # noqa: N803
        """Height of the lung apex surface (a dome over each lung, highest slightly posterior)."""
        xl = np.abs(np.asarray(X, dtype=_F32) - _F32(self.xm))
        u = (xl - _F32(self.lung_cx)) / _F32(self.apex_a)
        v = (np.asarray(Y, dtype=_F32) - _F32(self.apex_y)) / _F32(self.apex_b)
        return _F32(self.z_apex) - _F32(self.apex_h) * (u * u + v * v)

    def taper(self, Z: npt.ArrayLike) -> FloatArray:  # noqa: N803
        t = np.clip((np.asarray(Z, dtype=_F32) - _F32(self.z_sh)) / _F32(self.z_apex - self.z_sh), 0.0, 1.0)
        return np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0)).astype(_F32)

    def cavity_scale(self, Z: npt.ArrayLike) -> FloatArray:  # noqa: N803
        t = np.clip((np.asarray(Z, dtype=_F32) - _F32(self.z_sh)) / _F32(self.z_apex + 40.0 - self.z_sh), 0.0, 1.0)
        return (1.0 - 0.28 * t * t).astype(_F32)

    def diaphragm(self, X: npt.ArrayLike, Y: npt.ArrayLike) -> FloatArray:  # noqa: N803
        """Height of the diaphragm surface under each lung (domes, deeper posterior recesses)."""
        X = np.asarray(X, dtype=_F32)  # noqa: N806
        Y = np.asarray(Y, dtype=_F32)  # noqa: N806
        lat = (np.abs(X - _F32(self.xm)) - _F32(self.lung_cx * 0.95)) / _F32(self.lung_a)
        ydome = -0.15 * self.body.bc_ant
        post = np.clip((Y - _F32(ydome)) / _F32(self.body.bc_post - ydome), 0.0, None)
        ant = np.clip((_F32(ydome) - Y) / _F32(self.body.bc_ant + ydome), 0.0, None)
        top = np.where(X > _F32(self.xm), _F32(self.z_dome_l), _F32(self.z_dome_r))
        return top - _F32(self.dia_lat) * lat * lat - _F32(self.dia_post) * post * post - _F32(25.0) * ant * ant

    def fissure(self, Y: npt.ArrayLike) -> FloatArray:  # noqa: N803
        """Height of the oblique fissure (upper lobe above, lower lobe below); higher at the back."""
        return _F32(self.fissure_z0) + _F32(self.fissure_k) * np.asarray(Y, dtype=_F32)

    def lung_sdf(self, X: npt.ArrayLike, Y: npt.ArrayLike, Z: npt.ArrayLike) -> FloatArray:  # noqa: N803
        """Approximate signed distance (mm) to the lung surface (both lungs), for grids or point lists."""
        X = np.asarray(X, dtype=_F32)  # noqa: N806
        Y = np.asarray(Y, dtype=_F32)  # noqa: N806
        Z = np.asarray(Z, dtype=_F32)  # noqa: N806
        b = self.body
        xl = np.abs(X - _F32(self.xm))
        rho, reff = _ellipse(xl - _F32(self.lung_cx), Y - _F32(self.lung_cy), self.lung_a, self.lung_b)
        d = (rho - self.taper(Z)) * reff
        rho_c, reff_c = _ellipse(X, Y, b.a_cav, b.bc_ant, b.bc_post)
        d = np.maximum(d, (rho_c - self.cavity_scale(Z)) * reff_c + _F32(1.5))
        d = np.maximum(d, Z - self.apex(X, Y))
        d = np.maximum(d, self.w_med_z(Z, Y) - xl)
        d = np.maximum(d, _F32(3.0) - _ellipsoid_sdf(X, Y, Z, self.heart_c, self.heart_r, self.heart_angle))
        ax, ay, ar = self.aorta
        d = np.maximum(d, _F32(ar + 3.0) - np.sqrt((X - _F32(ax)) ** 2 + (Y - _F32(ay)) ** 2))
        sp = self.spine
        rho_s, reff_s = _ellipse(X - _F32(sp.x), Y - _F32(sp.y), sp.radius + 7.0, sp.radius + 7.0, sp.radius + 30.0)
        d = np.maximum(d, (_F32(1.0) - rho_s) * reff_s)
        d = np.maximum(d, self.diaphragm(X, Y) - Z)
        return d


def _sample_chest(rng: np.random.Generator, cohort: str) -> _Chest:
    if cohort == "dataset-shift":
        if rng.random() < 0.5:
            a, fat = rng.uniform(125, 145), rng.uniform(3, 10)
        else:
            a, fat = rng.uniform(185, 205), rng.uniform(24, 42)
    else:
        a, fat = rng.uniform(148, 178), rng.uniform(6, 22)
    z_apex = rng.uniform(100, 130)
    body = _sample_body(rng, a=a, fat=fat, ap_ratio=rng.uniform(0.64, 0.74), back_muscle=rng.uniform(26, 32),
                        z_neck=z_apex + 10)
    xm = rng.uniform(-3, 6)
    w_med = rng.uniform(15, 22)
    z_dome_r = rng.uniform(-125, -95)
    z_dome_l = z_dome_r - rng.uniform(8, 20)
    rv = rng.uniform(15, 19)
    yv = body.bc_post - rv * 1.1
    spine = _Spine(x=0.0, y=yv, radius=rv, pitch=rng.uniform(24, 28), disc=rng.uniform(4, 6),
                   phase=rng.uniform(0, 30), canal_r=rng.uniform(6.5, 8.0), spinous=rng.uniform(16, 22),
                   transverse=rng.uniform(26, 32), cancellous_hu=rng.uniform(350, 450),
                   cortex_hu=rng.uniform(800, 1000), disc_hu=rng.uniform(70, 100))
    ribs = _Ribs(z0=z_apex - rng.uniform(0, 12), pitch=rng.uniform(24, 28), drop=rng.uniform(140, 170),
                 half_height=rng.uniform(4.5, 5.5), half_thick=rng.uniform(3.2, 4.2), offset=5.5,
                 psi_end=(0.62 * np.pi,) + (0.8 * np.pi,) * 6 + (0.72 * np.pi,) * 3 + (0.5 * np.pi, 0.42 * np.pi),
                 psi_cart=(0.9 * np.pi,) + (0.95 * np.pi,) * 6 + (0.88 * np.pi,) * 3 + (0.5 * np.pi, 0.42 * np.pi),
                 cortex_hu=rng.uniform(800, 1100), marrow_hu=rng.uniform(200, 320), cartilage_hu=rng.uniform(90, 160))
    lung_cx = (w_med + body.a_cav) / 2
    hr = (rng.uniform(60, 72), rng.uniform(44, 52), rng.uniform(52, 62))
    heart_c = (xm + rng.uniform(18, 28), -0.38 * body.bc_ant + 5.0, z_dome_r + hr[2] * rng.uniform(0.45, 0.65))
    lung_bottom = min(z_dome_r, z_dome_l) - rng.uniform(35, 55) - rng.uniform(55, 80)
    return _Chest(
        body=body, spine=spine, ribs=ribs, xm=xm, w_med=w_med, heart_c=heart_c, heart_r=hr,
        heart_angle=-rng.uniform(0.5, 0.8),
        z_dome_r=z_dome_r, z_dome_l=z_dome_l, dia_lat=rng.uniform(35, 55), dia_post=rng.uniform(55, 80),
        lung_cx=lung_cx, lung_a=(body.a_cav - w_med) / 2 + 18.0, lung_cy=(body.bc_post - body.bc_ant) / 2,
        lung_b=(body.bc_ant + body.bc_post) / 2 + 15.0, z_apex=z_apex, z_sh=z_apex - rng.uniform(110, 140),
        apex_h=rng.uniform(60, 90), apex_a=(body.a_cav - w_med) / 2, apex_b=0.9 * (body.bc_ant + body.bc_post) / 2,
        apex_y=rng.uniform(0.0, 0.3) * body.bc_post,
        fissure_z0=rng.uniform(-45, -25), fissure_k=rng.uniform(0.5, 0.7), lung_hu=rng.uniform(-905, -870),
        lung_grad=rng.uniform(25, 45), trachea_y=yv - rv - rng.uniform(24, 30),
        aorta=(xm + rng.uniform(17, 22), yv - rv + rng.uniform(0, 4), rng.uniform(10, 13)),
        z_top=z_apex + rng.uniform(15, 40), z_bot=lung_bottom - rng.uniform(5, 25),
    )


def _lung_cloud(rng: np.random.Generator, c: _Chest, side: float, n: int, margin: float = 3.0,
                ) -> npt.NDArray[np.float64]:
    """``n`` uniform random points at least ``margin`` mm inside one lung (``side`` +1 left, -1 right)."""
    b = c.body
    lo = np.array([c.xm + min(0.0, side) * (b.a_cav + 5), -b.bc_ant, c.z_bot])
    hi = np.array([c.xm + max(0.0, side) * (b.a_cav + 5), b.bc_post, c.z_apex])
    found: list[npt.NDArray[np.float64]] = []
    total = 0
    for _ in range(20):
        pts = rng.uniform(lo, hi, size=(4 * n, 3))
        pts = pts[c.lung_sdf(pts[:, 0], pts[:, 1], pts[:, 2]) < -margin]
        found.append(pts)
        total += len(pts)
        if total >= n:
            break
    return np.concatenate(found)[:n]


def _chest_trees(rng: np.random.Generator, c: _Chest) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Pulmonary arteries/veins (with the great vessels) and airways as tube segments."""
    xm, yt = c.xm, c.trachea_y
    hc, hr = c.heart_c, c.heart_r
    vessels: list[npt.NDArray[np.float64]] = []
    airways: list[npt.NDArray[np.float64]] = []
    # great vessels: ascending aorta, arch, descending aorta, pulmonary trunk, SVC, arch branches, oesophagus
    ya = -0.45 * c.body.bc_ant
    ax, ay, ar = c.aorta
    z_arch = rng.uniform(22, 38)
    great = [
        (xm - 8, ya + 8, hc[2] + hr[2] * 0.4, xm - 8, ya, z_arch, ar + 3),
        (xm - 8, ya, z_arch, ax, ay, z_arch, ar + 1),
        (ax, ay, z_arch, ax - 4, ay - 2, c.z_bot - 40, ar),
        (xm + 14, ya - 6, hc[2] + hr[2] * 0.6, xm + 6, yt - 12, -8, 13),
        (xm - 24, ya + 12, c.z_top + 40, xm - 21, ya + 16, hc[2] + hr[2] * 0.5, 10),
        (xm - 6, ya + 4, z_arch, xm - 10, ya + 8, c.z_top + 40, 6),
        (xm + 2, ya + 10, z_arch, xm + 1, ya + 14, c.z_top + 40, 5),
        (xm + 12, ya + 18, z_arch, xm + 16, ya + 22, c.z_top + 40, 5),
        (xm - 1, c.spine.y - c.spine.radius - 9, c.z_top + 40, xm + 3, c.spine.y - c.spine.radius - 8,
         c.z_bot - 40, 6.5),
    ]
    vessels.append(np.array(great, dtype=np.float64))
    # trachea and main bronchi
    carina = np.array([xm - 3, yt, 0.0])
    airways.append(np.array([[xm - 3, yt - 4, c.z_top + 40, *carina, rng.uniform(8, 10)]]))
    for side in (-1.0, 1.0):
        w = float(c.w_med_z(-20.0))
        hil_b = np.array([xm + side * (w + 2), yt + 8, -22.0 if side < 0 else -32.0])
        airways.append(np.array([[*carina, *hil_b, 6.5 if side < 0 else 6.0]]))
        hil_a = hil_b + np.array([side * 1.0, -12.0, 6.0])
        vessels.append(np.array([[xm + 6, yt - 12, -8, *hil_a, 10.5]]))
        hil_v = np.array([xm + side * (w + 1), hc[1] + hr[1] * 0.3, hc[2] + hr[2] * 0.6])
        vessels.append(np.array([[hc[0] - 10, hc[1] + hr[1] * 0.3, hc[2] + hr[2] * 0.3, *hil_v, 8.0]]))
        vessels.append(_territory_tree(rng, hil_a, _lung_cloud(rng, c, side, 1100), r0=rng.uniform(6.2, 7.2), n_min=4))
        vessels.append(_territory_tree(rng, hil_v, _lung_cloud(rng, c, side, 900), r0=rng.uniform(5.5, 6.5), n_min=4))
        airways.append(_territory_tree(rng, hil_b, _lung_cloud(rng, c, side, 800), r0=5.5, n_min=12, r_min=1.8,
                                       jitter=0.06))
    return np.concatenate(vessels), np.concatenate(airways)


@dataclass
class _Lesion:
    kind: str
    lobe: str
    center: npt.NDArray[np.float64]  # real mm x, y, z
    radii: npt.NDArray[np.float64]  # real mm
    hu: float
    soft: float  # edge width, real mm
    irregular: float
    waves: npt.NDArray[np.float64]


def _lung_points(rng: np.random.Generator, c: _Chest, n: int = 6000) -> dict[str, npt.NDArray[Any]]:
    """Random points well inside the lungs with side, lobe and a peripheral/dependent preference weight."""
    b = c.body
    lo = np.array([c.xm - b.a_cav, -b.bc_ant, c.z_bot])
    hi = np.array([c.xm + b.a_cav, b.bc_post, c.z_apex])
    pts = rng.uniform(lo, hi, size=(n, 3))
    d = c.lung_sdf(pts[:, 0], pts[:, 1], pts[:, 2])
    pts = pts[d < -4.0]
    rho_c, reff_c = _ellipse(pts[:, 0], pts[:, 1], b.a_cav, b.bc_ant, b.bc_post)
    dcav = ((rho_c - c.cavity_scale(pts[:, 2])) * reff_c).astype(np.float64)
    side = np.where(pts[:, 0] > c.xm, "left", "right")
    part = np.where(pts[:, 2] < c.fissure(pts[:, 1]), "lower", "upper")
    weight = np.exp(dcav / 15.0) * np.exp(pts[:, 1] / 80.0)
    return {"pts": pts, "side": side, "part": part, "weight": weight, "dcav": dcav}


def _pick_point(rng: np.random.Generator, cand: dict[str, npt.NDArray[Any]], side: str | None, part: str | None,
                peripheral: bool) -> tuple[npt.NDArray[np.float64], str]:
    sel = np.ones(len(cand["pts"]), dtype=bool)
    if side is not None:
        sel &= cand["side"] == side
    if part is not None:
        sel &= cand["part"] == part
    if not sel.any():
        sel[:] = True
    idx = np.flatnonzero(sel)
    w = cand["weight"][idx] if peripheral else np.ones(idx.size)
    i = int(rng.choice(idx, p=w / w.sum()))
    return cand["pts"][i].copy(), f"{cand['side'][i]}-{cand['part'][i]}"


def _sample_covid_lesions(rng: np.random.Generator, c: _Chest, n: int) -> list[_Lesion]:
    if n == 0:
        return []
    cand = _lung_points(rng, c)
    out = []
    for _ in range(n):
        ggo = rng.random() < 0.65
        side = str(rng.choice(["left", "right"]))
        part = str(rng.choice(["upper", "lower"], p=[0.35, 0.65]))
        center, lobe = _pick_point(rng, cand, side, part, peripheral=True)
        base = rng.uniform(14, 34) if ggo else rng.uniform(8, 18)
        radii = base * rng.uniform(0.7, 1.3, size=3)
        out.append(_Lesion(
            kind="ggo" if ggo else "consolidation", lobe=lobe, center=center, radii=radii,
            hu=rng.uniform(-700, -300) if ggo else rng.uniform(-100, 50),
            soft=rng.uniform(4, 8) if ggo else 1.0,
            irregular=rng.uniform(0.15, 0.3) if ggo else rng.uniform(0.05, 0.15),
            waves=_waves(rng, 3, (0.6 * base, 1.4 * base)),
        ))
    return out


def _render_lesion(g: _Grid, les: _Lesion, hu: FloatArray, lung: FloatArray, labels: FloatArray,
                   rng: np.random.Generator) -> None:
    """Blend one blob-like lesion into ``hu`` (restricted to the lung) and max it into ``labels``."""
    ext = les.radii * (1.0 + les.irregular) + les.soft + 2 * g.h
    box = g.box(les.center - ext, les.center + ext)
    if box is None:
        return
    X, Y, Z = g.sub(box)  # noqa: N806
    q = np.sqrt(((X - _F32(les.center[0])) / _F32(les.radii[0])) ** 2
                + ((Y - _F32(les.center[1])) / _F32(les.radii[1])) ** 2
                + ((Z - _F32(les.center[2])) / _F32(les.radii[2])) ** 2)
    q = q * (_F32(1.0) + _F32(les.irregular) * _wave_field(les.waves, X, Y, Z))
    r_mean = float(np.mean(les.radii))
    m = np.clip((_F32(1.0) - q) * _F32(r_mean / max(les.soft, g.h)) + _F32(0.5), 0.0, 1.0)
    m *= lung[box]
    value: npt.ArrayLike = _F32(les.hu)
    if les.kind == "ggo":
        value = _F32(les.hu) + _F32(60.0) * _wave_field(_waves(rng, 3, (5.0, 12.0)), X, Y, Z)
    _blend(hu[box], m, value)
    np.maximum(labels[box], m, out=labels[box])


def _cell_edges(rng: np.random.Generator, pts: npt.NDArray[np.float32], cell: float,
                ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Worley cellular noise on points ``(n, 3)``: distance to the nearest jittered seed and ``F2 - F1``.

    One seed per cubic cell of side ``cell``; ``F2 - F1`` is ~0 on the walls between neighbouring cells,
    which draws a polygonal mesh (reticulation / honeycombing).
    """
    lo = np.floor(pts.min(axis=0) / cell).astype(np.int64) - 1
    hi = np.floor(pts.max(axis=0) / cell).astype(np.int64) + 2
    jit = rng.uniform(0.1, 0.9, size=(*(hi - lo), 3)).astype(_F32)
    base = np.floor(pts / cell).astype(np.int64)
    f1 = np.full(len(pts), np.inf, dtype=_F32)
    f2 = np.full(len(pts), np.inf, dtype=_F32)
    for oz in (-1, 0, 1):
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                ci = base + np.array([ox, oy, oz])
                rel = ci - lo
                seed = (ci + jit[rel[:, 0], rel[:, 1], rel[:, 2]]) * _F32(cell)
                d = np.sqrt(np.sum((pts - seed) ** 2, axis=1, dtype=_F32))
                f2 = np.minimum(f2, np.maximum(f1, d))
                f1 = np.minimum(f1, d)
    return f1, f2 - f1


def _render_fibrosis(g: _Grid, c: _Chest, side: str, hu: FloatArray, lung: FloatArray, labels: FloatArray,
                     rng: np.random.Generator) -> dict[str, Any]:
    """Basal, subpleural reticulation: a mesh of thin dense lines (with a few honeycomb cysts) over faint
    ground glass in one lower lobe."""
    b = c.body
    sgn = 1.0 if side == "left" else -1.0
    height = rng.uniform(60, 110)  # extent above the diaphragm
    depth = rng.uniform(15, 28)  # subpleural depth
    lo = (c.xm + min(0.0, sgn) * (b.a_cav + 10), -b.bc_ant, c.z_bot)
    hi = (c.xm + max(0.0, sgn) * (b.a_cav + 10), b.bc_post, max(c.z_dome_l, c.z_dome_r) + height + 10)
    box = g.box(lo, hi)
    if box is None:
        return {}
    X, Y, Z = g.sub(box)  # noqa: N806
    rho_c, reff_c = _ellipse(X, Y, b.a_cav, b.bc_ant, b.bc_post)
    dcav = (rho_c - c.cavity_scale(Z)) * reff_c
    above = Z - c.diaphragm(X, Y)
    env = _inside(-(dcav + _F32(depth)), 8.0) * np.clip(_F32(1.0) - above / _F32(height), 0.0, 1.0) * _F32(1.6)
    env = env * np.clip(_F32(0.7) + _F32(0.8) * _wave_field(_waves(rng, 3, (50, 120)), X, Y, Z), 0, 1)
    env = np.clip(env, 0, 1) * lung[box]
    sel = np.nonzero(env > 0.02)
    if sel[0].size == 0:
        return {}
    pts = np.stack([np.broadcast_to(X, env.shape)[sel], np.broadcast_to(Y, env.shape)[sel],
                    np.broadcast_to(Z, env.shape)[sel]], axis=1).astype(_F32)
    cell = rng.uniform(11, 16)
    f1, edge = _cell_edges(rng, pts, cell)
    width = 0.9
    amp = min(1.0, 2.5 * width / g.h)
    lines = np.exp(_F32(-0.5) * (edge / _F32(max(width, 0.3 * g.h))) ** 2) * _F32(amp)
    cyst = _inside(f1 - _F32(0.3 * cell), g.h) * _inside(-(dcav[sel] + _F32(6.0)), 3.0)  # subpleural honeycombs
    base = _F32(rng.uniform(-720, -600))
    value = base + lines * (_F32(rng.uniform(-120, 0)) - base)
    value = value + cyst * (1 - lines) * (_F32(-960.0) - value)
    sub = hu[box]
    w = env[sel]
    sub[sel] = sub[sel] + w * (value - sub[sel])
    lab = labels[box]
    lab[sel] = np.maximum(lab[sel], w)
    return {"kind": "fibrosis", "lobe": f"{side}-lower", "depth_mm": round(float(depth), 1),
            "cell_mm": round(float(cell), 1)}


def _render_effusion(g: _Grid, c: _Chest, side: str, hu: FloatArray, lung: FloatArray, labels: FloatArray,
                     rng: np.random.Generator) -> dict[str, Any]:
    """Pleural fluid layering in the dependent (posterior) lung base, with a rim of compressed lung."""
    b = c.body
    sgn = 1.0 if side == "left" else -1.0
    thick = rng.uniform(20, 50)
    z_low = c.z_bot
    z_high = (c.z_dome_l if side == "left" else c.z_dome_r) + rng.uniform(10, 60)
    box = g.box((c.xm + min(0.0, sgn) * (b.a_cav + 10), 0.0, z_low - 10),
                (c.xm + max(0.0, sgn) * (b.a_cav + 10), b.bc_post + 5, z_high + 10))
    if box is None:
        return {}
    X, Y, Z = g.sub(box)  # noqa: N806
    t = _F32(thick) * np.clip((_F32(z_high) - Z) / _F32(z_high - z_low), 0.0, 1.0) ** _F32(0.6)
    level = _F32(b.bc_post) - t + _F32(0.004) * (np.abs(X - _F32(c.xm)) - _F32(c.lung_cx)) ** 2
    fluid = _inside(level - Y, g.h) * lung[box] * (t > 0.5)
    atel = _inside(level - _F32(6.0) - Y, g.h) * lung[box] * (t > 0.5) - fluid
    _blend(hu[box], np.clip(atel, 0, 1), _F32(rng.uniform(-150, -50)))
    _blend(hu[box], fluid, _F32(rng.uniform(0, 20)))
    np.maximum(labels[box], fluid, out=labels[box])
    return {"kind": "effusion", "lobe": f"{side}-lower", "max_depth_mm": round(thick, 1)}


def _render_chest(g: _Grid, c: _Chest, cohort: str, rng: np.random.Generator, n_lesions: int | None,
                  ) -> tuple[FloatArray, FloatArray, FloatArray, list[dict[str, Any]]]:
    """Render the chest into (hu, lung membership, label membership, lesion descriptions) on the render grid."""
    X, Y, Z = g.X, g.Y, g.Z  # noqa: N806
    b = c.body
    h = g.h
    hu = np.empty(g.shape, dtype=_F32)
    hu[...] = _table_2d(g, b, rng)[None]
    _sdf_body, sdf_cav = _body_layers(g, b, hu)
    cav = _inside(sdf_cav, h)
    # cavity contents: liver/spleen tissue by default, mediastinal fat above the diaphragm
    _blend(hu, cav, _F32(rng.uniform(48, 62)))
    xl = np.abs(X - _F32(c.xm))
    above = _inside(c.diaphragm(X, Y) - Z + _F32(15.0), 4 * h)
    med = cav * _inside(xl - c.w_med_z(Z, Y) - _F32(4.0), h) * above
    _blend(hu, med, _F32(b.fat_hu + 10))
    # heart in its pericardial fat
    hext = np.array([max(c.heart_r[:2]), max(c.heart_r[:2]), c.heart_r[2]]) + 12.0
    hbox = g.box(np.subtract(c.heart_c, hext), np.add(c.heart_c, hext))
    if hbox is not None:
        Xh, Yh, Zh = g.sub(hbox)  # noqa: N806
        sdf_h = _ellipsoid_sdf(Xh, Yh, Zh, c.heart_c, c.heart_r, c.heart_angle)
        _blend(hu[hbox], _inside(sdf_h - _F32(rng.uniform(3, 7)), h) * cav[hbox], _F32(b.fat_hu + 5))
        _blend(hu[hbox], _inside(sdf_h, h), _F32(rng.uniform(35, 48)))
    # stomach bubble under the left dome
    st_c = np.array([c.xm + c.lung_cx * 0.9, -0.25 * b.bc_ant, c.z_dome_l - 45.0])
    st_r = np.array([40.0, 32.0, 32.0])
    sbox = g.box(st_c - st_r - 5, st_c + st_r + 5)
    if sbox is not None:
        Xs, Ys, Zs = g.sub(sbox)  # noqa: N806
        sdf_s = _ellipsoid_sdf(Xs, Ys, Zs, st_c, st_r)
        _blend(hu[sbox], _inside(sdf_s, h) * cav[sbox], _F32(15.0))
        _blend(hu[sbox], _inside(sdf_s + _F32(3.0), h) * _inside(Ys - _F32(st_c[1] - 8.0), h), _F32(-1000.0))
    # bones
    _ribs(g, c.ribs, sdf_cav, hu)
    st_y = -b.bc_ant - 5.5
    sternum_z = _inside(np.abs(Z - _F32((c.z_apex - 30 + c.z_dome_r) / 2)) - _F32((c.z_apex - 30 - c.z_dome_r) / 2), h)
    rho_st, reff_st = _ellipse(X - _F32(c.xm * 0.5), Y - _F32(st_y), 16.0, 5.5)
    sdf_st = (rho_st - _F32(1.0)) * reff_st
    st_val = _F32(c.ribs.marrow_hu) + np.clip(sdf_st + _F32(2.5), 0, 1) * _F32(c.ribs.cortex_hu - c.ribs.marrow_hu)
    _blend(hu, _inside(sdf_st, h) * sternum_z, st_val)
    _spine(g, c.spine, hu, rng)
    # lungs
    lung = _inside(c.lung_sdf(X, Y, Z), h)
    lung_val = _F32(c.lung_hu) + _F32(c.lung_grad) * (Y - _F32(c.lung_cy)) / _F32(c.lung_b)
    lung_val = lung_val + _F32(8.0) * _wave_field(_waves(rng, 4, (20, 60)), X, Y, Z)
    _blend(hu, lung, lung_val)
    # oblique fissures: faint thin lines
    cos_a = 1.0 / math.sqrt(1.0 + c.fissure_k**2)
    fis = np.exp(_F32(-0.5) * (((Z - c.fissure(Y)) * _F32(cos_a)) / _F32(max(0.8, 0.3 * h))) ** 2)
    hu += lung * fis * _F32(130.0 * min(1.0, 2.0 / h))
    labels = np.zeros(g.shape, dtype=_F32)
    findings: list[dict[str, Any]] = []
    covid: list[_Lesion] = []
    if cohort in ("id", "dataset-shift"):
        n = n_lesions if n_lesions is not None else int(rng.choice(7, p=[0.08, 0.17, 0.2, 0.2, 0.15, 0.12, 0.08]))
        covid = _sample_covid_lesions(rng, c, n)
        for les in covid:
            if les.kind == "ggo":
                _render_lesion(g, les, hu, lung, labels, rng)
    diag_kinds: list[str] = []
    if cohort == "diagnostic-shift":
        while not diag_kinds:
            diag_kinds = [k for k in ("fibrosis", "nodules", "effusion") if rng.random() < 0.55]
        if "fibrosis" in diag_kinds:
            for side in (["left", "right"] if rng.random() < 0.7 else [str(rng.choice(["left", "right"]))]):
                info = _render_fibrosis(g, c, side, hu, lung, labels, rng)
                if info:
                    findings.append(info)
    # vessels and great vessels
    vessels, airways = _chest_trees(rng, c)
    occ = np.zeros(g.shape, dtype=_F32)
    _render_tubes(g, vessels, occ, weight=cav)
    _blend(hu, occ, _F32(rng.uniform(35, 48)))
    for les in covid:
        if les.kind == "consolidation":
            _render_lesion(g, les, hu, lung, labels, rng)
    if "nodules" in diag_kinds:
        cand = _lung_points(rng, c)
        for _ in range(int(rng.integers(2, 9))):
            center, lobe = _pick_point(rng, cand, None, None, peripheral=False)
            r = rng.uniform(4, 9)
            les = _Lesion(kind="nodule", lobe=lobe, center=center, radii=np.full(3, r) * rng.uniform(0.9, 1.1, 3),
                          hu=rng.uniform(10, 60), soft=1.0, irregular=rng.uniform(0.0, 0.08),
                          waves=_waves(rng, 3, (0.8 * r, 2 * r)))
            _render_lesion(g, les, hu, lung, labels, rng)
            findings.append({"kind": "nodule", "lobe": lobe, "radius_mm": round(r, 1), "hu": round(les.hu, 1)})
    # airways: soft-tissue walls, air lumen
    occ[...] = 0
    walls = airways.copy()
    walls[:, 6] += np.maximum(0.8, 0.22 * airways[:, 6])
    _render_tubes(g, walls, occ, weight=cav)
    _blend(hu, occ, _F32(30.0))
    occ[...] = 0
    _render_tubes(g, airways, occ, weight=cav)
    _blend(hu, occ, _F32(-1000.0))
    if "effusion" in diag_kinds:
        for side in (["left", "right"] if rng.random() < 0.5 else [str(rng.choice(["left", "right"]))]):
            info = _render_effusion(g, c, side, hu, lung, labels, rng)
            if info:
                findings.append(info)
    for les in covid:
        findings.append({"kind": les.kind, "lobe": les.lobe, "center_real_mm": les.center,
                         "radii_real_mm": les.radii, "hu": round(les.hu, 1)})
    return hu, lung, labels, findings


# --------------------------------------------------------------------------------------------------------
# Abdomen (far-OOD)
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Abdomen:
    body: _Body
    spine: _Spine
    ribs: _Ribs
    z_top: float
    z_bot: float


def _sample_abdomen(rng: np.random.Generator) -> _Abdomen:
    a = rng.uniform(150, 185)
    body = _sample_body(rng, a=a, fat=rng.uniform(14, 38), ap_ratio=rng.uniform(0.7, 0.8),
                        back_muscle=rng.uniform(34, 42), z_neck=1e6)
    rv = rng.uniform(20, 25)
    spine = _Spine(x=0.0, y=body.bc_post - rv * 0.9, radius=rv, pitch=rng.uniform(30, 34), disc=rng.uniform(7, 10),
                   phase=rng.uniform(0, 30), canal_r=rng.uniform(7, 9), spinous=rng.uniform(20, 26),
                   transverse=rng.uniform(34, 42), cancellous_hu=rng.uniform(330, 430),
                   cortex_hu=rng.uniform(800, 1000), disc_hu=rng.uniform(70, 100))
    ribs = _Ribs(z0=rng.uniform(170, 200), pitch=rng.uniform(25, 28), drop=rng.uniform(60, 80),
                 half_height=rng.uniform(5.0, 6.5), half_thick=rng.uniform(3.2, 4.2), offset=5.5,
                 psi_end=(0.8 * np.pi,) * 7 + (0.72 * np.pi,) * 3 + (0.55 * np.pi, 0.45 * np.pi),
                 psi_cart=(0.95 * np.pi,) * 7 + (0.9 * np.pi,) * 3 + (0.55 * np.pi, 0.45 * np.pi),
                 cortex_hu=rng.uniform(800, 1100), marrow_hu=rng.uniform(200, 320), cartilage_hu=rng.uniform(90, 160))
    return _Abdomen(body=body, spine=spine, ribs=ribs, z_top=rng.uniform(10, 30), z_bot=-rng.uniform(280, 330))


def _organ(g: _Grid, hu: FloatArray, solid: FloatArray | None, center: Sequence[float], radii: Sequence[float],
           value: float, *, within: FloatArray | None = None, rng: np.random.Generator | None = None,
           lobulation: float = 0.0) -> None:
    c = np.asarray(center, dtype=np.float64)
    r = np.asarray(radii, dtype=np.float64)
    box = g.box(c - r * (1 + lobulation) - 3 * g.h, c + r * (1 + lobulation) + 3 * g.h)
    if box is None:
        return
    X, Y, Z = g.sub(box)  # noqa: N806
    sdf = _ellipsoid_sdf(X, Y, Z, c, r)
    if lobulation > 0 and rng is not None:
        sdf = sdf - _F32(lobulation * min(r)) * _wave_field(_waves(rng, 3, (0.5 * min(r), 1.5 * max(r))), X, Y, Z)
    m = _inside(sdf, g.h)
    if within is not None:
        m *= within[box]
    _blend(hu[box], m, _F32(value))
    if solid is not None:
        np.maximum(solid[box], m, out=solid[box])


def _bowel_path(rng: np.random.Generator, start: npt.NDArray[np.float64], steps: int, step: float,
                ok: Callable[[npt.NDArray[np.float64]], bool]) -> npt.NDArray[np.float64]:
    pts = [start]
    d = _unit(rng.normal(size=3))
    for _ in range(steps):
        for _try in range(8):
            nd = _unit(d + 0.9 * rng.normal(size=3))
            cand = pts[-1] + step * nd
            if ok(cand):
                pts.append(cand)
                d = nd
                break
        else:
            break
    return np.array(pts)


def _render_abdomen(g: _Grid, ab: _Abdomen, rng: np.random.Generator) -> tuple[FloatArray, list[str]]:
    """Render an abdomen (liver, spleen, kidneys, stomach, bowel, vessels, spine; no lungs)."""
    b = ab.body
    h = g.h
    hu = np.empty(g.shape, dtype=_F32)
    hu[...] = _table_2d(g, b, rng)[None]
    _sdf_body, sdf_cav = _body_layers(g, b, hu)
    cav = _inside(sdf_cav, h)
    _blend(hu, cav, _F32(b.fat_hu + rng.uniform(0, 15)))  # intra-abdominal fat
    solid = np.zeros(g.shape, dtype=_F32)
    ac, ba, bp = b.a_cav, b.bc_ant, b.bc_post
    sp = ab.spine
    liver = rng.uniform(50, 66)
    _organ(g, hu, solid, (-0.42 * ac, -0.1 * ba, -80), (0.62 * ac, 0.8 * ba, 90), liver, within=cav, rng=rng,
           lobulation=0.05)
    _organ(g, hu, solid, (-0.05 * ac, -0.5 * ba, -45), (0.45 * ac, 0.35 * ba, 48), liver, within=cav)
    _organ(g, hu, solid, (-0.25 * ac, -0.55 * ba, -135), (14, 14, 28), rng.uniform(0, 20), within=cav)
    _organ(g, hu, solid, (0.62 * ac, 0.3 * bp, -70), (24, 0.45 * (ba + bp) / 2, 50), rng.uniform(40, 52), within=cav)
    kid_hu = rng.uniform(28, 40)
    for s, dz in ((-1.0, -12.0), (1.0, 8.0)):
        kc = (s * (sp.radius + 42), sp.y - 8, -150 + dz)
        _organ(g, hu, solid, kc, (24, 27, 55), kid_hu, within=cav, rng=rng, lobulation=0.04)
        _organ(g, hu, None, (kc[0] - s * 12, kc[1] - 6, kc[2]), (9, 12, 30), b.fat_hu + 30)
        _organ(g, hu, None, (kc[0] - s * 16, kc[1] - 6, kc[2]), (5, 6, 12), 10.0)
    # pancreas, aorta, IVC, psoas
    tubes = np.array([
        [0.45 * ac, 0.1 * bp, -95, 0.0, -0.15 * ba, -105, 11],
        [0.0, -0.15 * ba, -105, -0.22 * ac, -0.1 * ba, -120, 13],
        [12.0, sp.y - sp.radius - 12, ab.z_top + 30, 10.0, sp.y - sp.radius - 12, ab.z_bot - 30, 11],
        [-22.0, sp.y - sp.radius - 10, ab.z_top + 30, -20.0, sp.y - sp.radius - 8, ab.z_bot - 30, 12],
    ])
    occ = np.zeros(g.shape, dtype=_F32)
    _render_tubes(g, tubes, occ)
    _blend(hu, occ, _F32(rng.uniform(38, 48)))
    np.maximum(solid, occ, out=solid)
    for s in (-1.0, 1.0):
        occ[...] = 0
        psoas = np.array([[s * (sp.radius + 6), sp.y + 2, -110, s * (sp.radius + 22), sp.y - 4, ab.z_bot - 20, 0.0]])
        n_seg = 8
        zs = np.linspace(0, 1, n_seg + 1)
        segs = []
        for z0, z1 in zip(zs[:-1], zs[1:], strict=True):
            p0 = psoas[0, :3] + z0 * (psoas[0, 3:6] - psoas[0, :3])
            p1 = psoas[0, :3] + z1 * (psoas[0, 3:6] - psoas[0, :3])
            segs.append([*p0, *p1, 6 + 16 * (z0 + z1) / 2])
        _render_tubes(g, np.array(segs), occ)
        _blend(hu, occ, _F32(b.muscle_hu))
        np.maximum(solid, occ, out=solid)
    # stomach with an air-fluid level
    st_c = np.array([0.35 * ac, -0.4 * ba, -55.0])
    st_r = np.array([42.0, 32.0, 42.0])
    sbox = g.box(st_c - st_r - 5, st_c + st_r + 5)
    if sbox is not None:
        Xs, Ys, Zs = g.sub(sbox)  # noqa: N806
        sdf_s = _ellipsoid_sdf(Xs, Ys, Zs, st_c, st_r)
        free = (1 - solid[sbox]) * cav[sbox]
        _blend(hu[sbox], _inside(sdf_s, h) * free, _F32(40.0))
        _blend(hu[sbox], _inside(sdf_s + _F32(4.0), h) * free, _F32(rng.uniform(5, 25)))
        _blend(hu[sbox], _inside(sdf_s + _F32(4.0), h) * _inside(Ys - _F32(st_c[1] - rng.uniform(0, 15)), h) * free,
               _F32(-1000.0))
    # bowel: small-bowel loops and the colon frame, walls then contents (fluid, air-fluid levels, stool)
    y_back = sp.y - sp.radius - 18

    def in_belly(p: npt.NDArray[np.float64]) -> bool:
        rho, _ = _ellipse(p[0], p[1], ac - 20, ba - 18, bp - 20)
        return bool(rho < 1.0) and p[1] < y_back and ab.z_bot + 15 < p[2] < -150

    paths: list[tuple[npt.NDArray[np.float64], float, str]] = []
    for _ in range(int(rng.integers(5, 8))):
        for _try in range(50):
            low = np.array([-ac * 0.6, -ba * 0.7, ab.z_bot + 20])
            high = np.array([ac * 0.6, y_back, -160.0])
            start = rng.uniform(np.minimum(low, high), np.maximum(low, high))  # short/flat abdomens invert a bound
            if in_belly(start):
                break
        paths.append((_bowel_path(rng, start, 28, 14.0, in_belly), rng.uniform(9, 13), "small"))
    cr = rng.uniform(17, 23)
    colon = np.array([
        [-0.68 * ac, -0.05 * ba, ab.z_bot + 30], [-0.7 * ac, -0.1 * ba, -150], [-0.4 * ac, -0.55 * ba, -160],
        [0.0, -0.65 * ba, -175], [0.4 * ac, -0.5 * ba, -150], [0.7 * ac, -0.05 * ba, -115],
        [0.7 * ac, 0.05 * ba, ab.z_bot + 40],
    ]) + rng.normal(0, 6, size=(7, 3))
    fine = []
    for p0, p1 in zip(colon[:-1], colon[1:], strict=True):
        n = max(1, int(np.linalg.norm(p1 - p0) / 25))
        for t in np.arange(n) / n:
            fine.append(p0 + t * (p1 - p0) + rng.normal(0, 3, 3))
    fine.append(colon[-1])
    paths.append((np.array(fine), cr, "colon"))
    free = (1 - solid) * cav
    wall = np.zeros(g.shape, dtype=_F32)
    for pts, r, _kind in paths:
        segs = np.column_stack([pts[:-1], pts[1:], np.full(len(pts) - 1, r + 2.5)])
        _render_tubes(g, segs, wall)
    wall *= free
    _blend(hu, wall, _F32(40.0))
    lumen = np.zeros(g.shape, dtype=_F32)
    content = np.zeros(g.shape, dtype=_F32)
    stool = _waves(rng, 4, (6, 14))
    for pts, r, kind in paths:
        for p0, p1 in zip(pts[:-1], pts[1:], strict=True):
            m = r + 1.5 * h
            box = g.box(np.minimum(p0, p1) - m, np.maximum(p0, p1) + m)
            if box is None:
                continue
            X, Y, Z = g.sub(box)  # noqa: N806
            o = np.clip((_F32(r) - _segment_distance(X, Y, Z, p0, p1)) / _F32(h) + _F32(0.5), 0.0, 1.0)
            if kind == "colon":  # gas anteriorly, stool with a few bubbles in the dependent part
                level = min(p0[1], p1[1]) + r * rng.uniform(-0.6, 0.6)
                air = (Y < _F32(level)) | (_wave_field(stool, X, Y, Z) > _F32(0.55))
                val = np.where(air, _F32(-1000.0), _F32(rng.uniform(-20, 40))) * np.ones_like(o)
            else:
                fill = rng.random()
                if fill < 0.6:
                    val = np.full_like(o, rng.uniform(0, 30))
                else:
                    level = min(p0[1], p1[1]) + r * (1.4 - 2 * rng.random())
                    val = np.where(Y < _F32(level), _F32(-1000.0), _F32(rng.uniform(0, 30))) * np.ones_like(o)
            newer = o > lumen[box]
            content[box] = np.where(newer, val, content[box])
            np.maximum(lumen[box], o, out=lumen[box])
    lumen *= free
    _blend(hu, lumen, content)
    _ribs(g, ab.ribs, sdf_cav, hu)
    _spine(g, sp, hu, rng)
    return hu, ["liver", "gallbladder", "spleen", "kidneys", "pancreas", "aorta", "ivc", "psoas", "stomach",
                "small-bowel", "colon", "spine", "ribs"]


# --------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------


def _check_direction(direction: Sequence[float] | None) -> tuple[float, ...]:
    if direction is None:
        return IDENTITY_DIRECTION
    d = np.asarray(direction, dtype=np.float64)
    if d.size != 9:
        raise ValueError(f"direction must hold 9 row-major direction cosines, got {d.size} values.")
    m = d.reshape(3, 3)
    if not np.allclose(m @ m.T, np.eye(3), atol=1e-6):
        raise ValueError(f"direction must be orthonormal, got {tuple(d)}.")
    return tuple(float(v) for v in d)


def make_chest_ct(*, seed: int, cohort: str = "id", shape: Sequence[int] | None = None,
                  inplane: int = DEFAULT_INPLANE, spacing_xyz: Sequence[float] | None = None,
                  n_lesions: int | None = None, direction: Sequence[float] | None = None,
                  noise: bool = True) -> Phantom:
    """Generate one seeded synthetic CT volume of the requested cohort.

    Args:
        seed: random seed; the same ``(seed, cohort, other arguments)`` gives bit-identical arrays.
        cohort: ``"id"``, ``"dataset-shift"``, ``"diagnostic-shift"`` or ``"far-ood"`` (see module doc).
        shape: array shape ``(z, y, x)``. ``None`` uses ``inplane x inplane`` axial slices and as many slices
            as the scan range needs at the drawn slice thickness (about 20-110 for the chest).
        inplane: in-plane matrix size used when ``shape`` is ``None``.
        spacing_xyz: voxel size ``(x, y, z)`` in mm overriding the cohort's draw (ID: 0.7-0.9 mm in-plane,
            1-5 mm slices; dataset shift: 8 mm slices).
        n_lesions: number of COVID-19-like lesions for the ``"id"``/``"dataset-shift"`` cohorts (0-6 drawn
            when ``None``); ignored by the other cohorts.
        direction: 9 row-major direction cosines; default identity (LPS axes). It only changes the
            geometry metadata: the voxel content is the same.
        noise: add scanner noise (set ``False`` for a noise-free image; the kernel blur is kept).

    Returns:
        A :class:`Phantom`; ``meta`` describes the acquisition, the patient and the lesions.

    Raises:
        ValueError: on an unknown cohort or an invalid shape, spacing or direction.
    """
    if cohort not in _COHORT_KEYS:
        raise ValueError(f"Unknown phantom cohort {cohort!r}; expected one of {', '.join(COHORTS)}.")
    if n_lesions is not None and not 0 <= int(n_lesions) <= 50:
        raise ValueError(f"n_lesions must be between 0 and 50, got {n_lesions}.")
    t0 = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF, _COHORT_KEYS[cohort], 0x5E65]))
    dir_tuple = _check_direction(direction)
    acq = _sample_acquisition(rng, cohort, spacing_xyz)
    anatomy: _Chest | _Abdomen = _sample_abdomen(rng) if cohort == "far-ood" else _sample_chest(rng, cohort)
    body = anatomy.body
    if shape is not None:
        if len(shape) != 3 or min(int(v) for v in shape) < 4:
            raise ValueError(f"shape must be (z, y, x) with every size >= 4, got {tuple(shape)!r}.")
        nz, ny, nx = (int(v) for v in shape)
    else:
        if int(inplane) < 16:
            raise ValueError(f"inplane must be >= 16, got {inplane}.")
        ny = nx = int(inplane)
        nz = 0
    fov_real = float(np.clip(2 * body.a + rng.uniform(40, 90), 330, 520))
    scale = nx * acq.dx / fov_real  # image mm per real mm
    hx, hy = acq.dx / scale, acq.dy / scale
    hz_slice = acq.dz / scale
    if nz == 0:
        nz = max(8, int(round((anatomy.z_top - anatomy.z_bot) / hz_slice)))
    supersample = max(1, math.ceil(acq.dz / (2.0 * acq.dx) - 1e-9))
    # place the image centre so that the body and the table fit
    fov_y = ny * hy
    y_lo = body.y_back + 45 - fov_y / 2
    y_hi = -body.b_ant - 10 + fov_y / 2
    yc = float(np.clip(rng.uniform(0, 30), min(y_lo, y_hi), max(y_lo, y_hi)))
    xc = rng.uniform(-8, 8)
    zc = (anatomy.z_top + anatomy.z_bot) / 2
    x = (xc + (np.arange(nx) - (nx - 1) / 2) * hx).astype(_F32)
    y = (yc + (np.arange(ny) - (ny - 1) / 2) * hy).astype(_F32)
    zk = zc + (np.arange(nz) - (nz - 1) / 2) * hz_slice
    z = (zk[:, None] + ((np.arange(supersample) + 0.5) / supersample - 0.5)[None, :] * hz_slice).ravel().astype(_F32)
    g = _Grid(x=x, y=y, z=z, h=float(max(hx, hy)))
    origin = (round(-0.5 * nx * acq.dx + rng.uniform(-20, 20), 3), round(-0.5 * ny * acq.dy + rng.uniform(-40, 10), 3),
              round(rng.uniform(-600, -100), 3))
    t1 = time.perf_counter()
    findings: list[dict[str, Any]] = []
    if isinstance(anatomy, _Chest):
        hu, lung, labels, findings = _render_chest(g, anatomy, cohort, rng, n_lesions)
        organs: list[str] = ["lungs", "heart", "mediastinum", "airways", "pulmonary-vessels", "spine", "ribs"]
    else:
        hu, organs = _render_abdomen(g, anatomy, rng)
        lung = labels = None
    t2 = time.perf_counter()

    def collapse(a: FloatArray) -> FloatArray:
        return a.reshape(nz, supersample, ny, nx).mean(axis=1, dtype=_F32) if supersample > 1 else a

    img = collapse(hu)
    del hu
    if noise and acq.noise_std > 0:
        white = rng.standard_normal(size=img.shape, dtype=_F32)
        white *= _F32(acq.noise_std / _kernel_noise_gain(acq))
        img += white
        del white
    img = _apply_kernel(img, acq)
    image = np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16)
    if lung is not None and labels is not None:
        lung_mask = collapse(lung) >= 0.5
        label = ((collapse(labels) > 0.5) & lung_mask).astype(np.uint8)
    else:
        lung_mask = np.zeros(image.shape, dtype=bool)
        label = np.zeros(image.shape, dtype=np.uint8)
    spacing = (float(acq.dx), float(acq.dy), float(acq.dz))
    dmat = np.asarray(dir_tuple).reshape(3, 3)

    def to_physical(p_real: npt.NDArray[np.float64]) -> list[float]:
        idx = np.array([(p_real[0] - x[0]) / hx, (p_real[1] - y[0]) / hy, (p_real[2] - zk[0]) / hz_slice])
        return [round(float(v), 2) for v in np.asarray(origin) + dmat @ (idx * np.asarray(spacing))]

    voxel_ml = float(np.prod(spacing)) / 1000.0
    lesions_meta = []
    for f in findings:
        entry = {k: v for k, v in f.items() if k not in ("center_real_mm", "radii_real_mm")}
        if "center_real_mm" in f:
            entry["center_xyz_mm"] = to_physical(f["center_real_mm"])
            entry["radii_mm"] = [round(float(r) * scale, 2) for r in f["radii_real_mm"]]
        lesions_meta.append(entry)
    n_label = int(label.sum())
    meta: dict[str, Any] = {
        "generator": "segsentry.phantoms.chest",
        "version": GENERATOR_VERSION,
        "cohort": cohort,
        "seed": int(seed),
        "region": "chest" if isinstance(anatomy, _Chest) else "abdomen",
        "shape_zyx": [nz, ny, nx],
        "spacing_xyz": list(spacing),
        "slice_thickness_mm": float(acq.dz),
        "kernel": acq.kernel,
        "kernel_sigma_px": round(acq.kernel_sigma, 3),
        "kernel_sharpen": round(acq.sharpen, 3),
        "noise_std_hu": round(acq.noise_std, 2) if noise else 0.0,
        "z_supersampling": supersample,
        "scale": round(scale, 5),
        "field_of_view_real_mm": round(fov_real, 1),
        "patient": {"half_width_real_mm": round(body.a, 1), "ap_real_mm": round(body.b_ant + body.b_post, 1),
                    "fat_real_mm": round(body.fat, 1)},
        "structures": organs,
        "lesion_count": len(lesions_meta),
        "lesion_kinds": sorted({les["kind"] for les in lesions_meta}),
        "lobes": sorted({les["lobe"] for les in lesions_meta}),
        "lesions": lesions_meta,
        "label_voxels": n_label,
        "lesion_volume_ml": round(n_label * voxel_ml, 3),
        "lung_voxels": int(lung_mask.sum()),
        "lung_volume_ml": round(int(lung_mask.sum()) * voxel_ml, 3),
    }
    t3 = time.perf_counter()
    logger.debug("phantom cohort=%s seed=%d shape=%s setup %.2fs render %.2fs finish %.2fs", cohort, seed,
                 image.shape, t1 - t0, t2 - t1, t3 - t2)
    return Phantom(image=image, label=label, spacing_xyz=spacing, origin_xyz=origin, direction=dir_tuple, meta=meta,
                   lung_mask=lung_mask)
