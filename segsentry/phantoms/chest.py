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

Modules
    :mod:`~segsentry.phantoms.phantom` (the result type), :mod:`~segsentry.phantoms.filters` (separable
    blur), :mod:`~segsentry.phantoms.geometry` (render grid and analytic shapes),
    :mod:`~segsentry.phantoms.acquisition` (spacing, kernel, noise), :mod:`~segsentry.phantoms.body`
    (table, body wall, ribs, spine), :mod:`~segsentry.phantoms.thorax` (chest anatomy, vessel and airway
    trees), :mod:`~segsentry.phantoms.lesions` (lung findings), :mod:`~segsentry.phantoms.abdomen` (the
    far-OOD abdomen); this module renders the chest and holds the entry point :func:`make_chest_ct`.

The package imports only numpy and SimpleITK.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from segsentry.phantoms.abdomen import _Abdomen, _render_abdomen, _sample_abdomen
from segsentry.phantoms.acquisition import HU_MAX, HU_MIN, _apply_kernel, _kernel_noise_gain, _sample_acquisition
from segsentry.phantoms.body import _body_layers, _ribs, _spine, _table_2d
from segsentry.phantoms.filters import FloatArray, convolve1d, gaussian_blur, gaussian_kernel1d
from segsentry.phantoms.geometry import (
    _blend,
    _ellipse,
    _ellipsoid_sdf,
    _Grid,
    _inside,
    _render_tubes,
    _wave_field,
    _waves,
)
from segsentry.phantoms.lesions import (
    _Lesion,
    _lung_points,
    _pick_point,
    _render_effusion,
    _render_fibrosis,
    _render_lesion,
    _sample_covid_lesions,
)
from segsentry.phantoms.phantom import IDENTITY_DIRECTION, Phantom
from segsentry.phantoms.thorax import _Chest, _chest_trees, _sample_chest

logger = logging.getLogger(__name__)

# Phantom, IDENTITY_DIRECTION and the filters are defined in their own modules and re-exported here.
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
DEFAULT_INPLANE = 160
GENERATOR_VERSION = 1

_COHORT_KEYS = {name: i for i, name in enumerate(COHORTS)}
_F32 = np.float32


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
