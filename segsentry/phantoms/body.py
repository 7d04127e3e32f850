"""Patient parts shared by the chest and the abdomen: the table, the body wall, the ribs and the spine.

Each ``_sample_*``/dataclass pair draws a part's measurements (real mm, HU); each renderer blends the part
into a ``(z, y, x)`` render-grid volume of HU in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from segsentry.phantoms.filters import FloatArray
from segsentry.phantoms.geometry import _blend, _ellipse, _Grid, _inside, _segment_distance, _wave_field, _waves

_F32 = np.float32


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
