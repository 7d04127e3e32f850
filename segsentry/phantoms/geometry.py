"""The render grid and the analytic shapes the phantoms are drawn with.

Distances are "real" adult millimetres in the patient frame (see :mod:`segsentry.phantoms.chest`); render
arrays are ``(z, y, x)``. Shapes are signed distances (negative inside) turned into partial-volume
membership by :func:`_inside`; tubes, smooth plane-wave noise and space-filling branching trees complete
the toolkit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from segsentry.phantoms.filters import FloatArray

_F32 = np.float32

Box = tuple[slice, slice, slice]


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
