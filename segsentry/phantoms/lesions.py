"""Lung findings: COVID-19-like ground glass and consolidation (in-distribution), fibrotic reticulation,
solid nodules and pleural effusion (diagnostic shift).

The renderers blend a finding into the ``(z, y, x)`` HU volume, restricted to the lung membership, and
max its membership into the label volume, both in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from segsentry.phantoms.filters import FloatArray
from segsentry.phantoms.geometry import _blend, _ellipse, _Grid, _inside, _wave_field, _waves
from segsentry.phantoms.thorax import _Chest

_F32 = np.float32


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
