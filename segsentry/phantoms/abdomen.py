"""The far-OOD abdomen: liver, spleen, kidneys, stomach, bowel, vessels, spine and ribs, without lungs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from segsentry.phantoms.body import _Body, _body_layers, _Ribs, _ribs, _sample_body, _Spine, _spine, _table_2d
from segsentry.phantoms.filters import FloatArray
from segsentry.phantoms.geometry import (
    _blend,
    _ellipse,
    _ellipsoid_sdf,
    _Grid,
    _inside,
    _render_tubes,
    _segment_distance,
    _unit,
    _wave_field,
    _waves,
)

_F32 = np.float32


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
