"""The chest anatomy model: lungs, mediastinum, heart and diaphragm as analytic surfaces, and the vessel and
airway trees that fill the lungs (tube segments in real mm). Rendering is in :mod:`segsentry.phantoms.chest`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from segsentry.phantoms.body import _Body, _Ribs, _sample_body, _Spine
from segsentry.phantoms.filters import FloatArray
from segsentry.phantoms.geometry import _ellipse, _ellipsoid_sdf, _territory_tree

_F32 = np.float32


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
