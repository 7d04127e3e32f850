"""Procedural chest-CT phantoms, the nnU-Net cohort writer and the MNI152 far-OOD loader."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from factory import run_with_blocked_imports
from segsentry.errors import MissingDependencyError, SegsentryError
from segsentry.phantoms import (
    COHORTS,
    case_seed,
    convolve1d,
    gaussian_blur,
    gaussian_kernel1d,
    load_mni152_t1,
    make_chest_ct,
    ras_affine_to_lps,
    write_cohort,
)

SMALL = (24, 96, 96)  # z, y, x
ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
LUNG_HU = (-920, -700)


def _largest_lung_density_region(image: np.ndarray) -> float:
    """Volume fraction of the largest connected lung-density region (in-plane smoothed, thin rims opened away)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    smooth = gaussian_blur(image, (0.0, 1.0, 1.0))
    mask = (smooth >= LUNG_HU[0]) & (smooth <= LUNG_HU[1])
    mask = ndimage.binary_opening(mask, structure=np.ones((1, 5, 5), dtype=bool))
    labels, n = ndimage.label(mask)
    return 0.0 if n == 0 else float(np.bincount(labels.ravel())[1:].max() / mask.size)


@pytest.fixture(scope="module")
def small() -> dict[str, object]:
    return {c: make_chest_ct(seed=11, cohort=c, shape=SMALL) for c in COHORTS}


# ---------------------------------------------------------------- geometry and arrays


@pytest.mark.parametrize("cohort", COHORTS)
def test_arrays_and_sitk_geometry_agree(small, cohort):
    p = small[cohort]
    assert p.image.shape == SMALL and p.image.dtype == np.int16
    assert p.label.shape == SMALL and p.label.dtype == np.uint8
    assert p.lung_mask is not None and p.lung_mask.shape == SMALL
    assert set(np.unique(p.label)) <= {0, 1}
    image, label = p.to_sitk()
    assert image.GetSize() == label.GetSize() == (SMALL[2], SMALL[1], SMALL[0])
    assert image.GetSpacing() == label.GetSpacing() == pytest.approx(p.spacing_xyz)
    assert image.GetOrigin() == label.GetOrigin() == pytest.approx(p.origin_xyz)
    assert image.GetDirection() == label.GetDirection() == pytest.approx(p.direction)
    assert np.array_equal(sitk.GetArrayFromImage(image), p.image)
    assert np.array_equal(sitk.GetArrayFromImage(label), p.label)
    json.dumps(p.meta)  # meta is JSON-serialisable
    assert p.meta["cohort"] == cohort


def test_default_direction_is_identity_and_custom_direction_is_metadata_only():
    a = make_chest_ct(seed=5, shape=SMALL)
    b = make_chest_ct(seed=5, shape=SMALL, direction=ROTATED)
    assert a.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    image, label = b.to_sitk()
    assert image.GetDirection() == label.GetDirection() == pytest.approx(ROTATED)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    with pytest.raises(ValueError, match="orthonormal"):
        make_chest_ct(seed=5, shape=SMALL, direction=(1, 1, 0, 0, 1, 0, 0, 0, 1))


def test_spacing_is_realistic_and_origin_is_not_zero(small):
    p = small["id"]
    sx, sy, sz = p.spacing_xyz
    assert 0.7 <= sx <= 0.9 and sx == sy
    assert 1.0 <= sz <= 5.0
    assert np.abs(p.origin_xyz).max() > 10


def test_unknown_cohort_is_rejected():
    with pytest.raises(ValueError, match="cohort"):
        make_chest_ct(seed=0, cohort="ood")


# ---------------------------------------------------------------- content


@pytest.mark.parametrize("cohort", ["id", "dataset-shift", "diagnostic-shift"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_label_voxel_lies_inside_the_lungs(cohort, seed):
    p = make_chest_ct(seed=seed, cohort=cohort, shape=SMALL, n_lesions=4)
    assert p.lung_mask.any()
    assert not np.any(p.label.astype(bool) & ~p.lung_mask)


def test_lesions_are_labelled_and_described():
    found = 0
    for seed in range(4):
        p = make_chest_ct(seed=seed, shape=SMALL, n_lesions=3)
        assert p.meta["lesion_count"] == 3
        assert set(p.meta["lesion_kinds"]) <= {"ggo", "consolidation"}
        for les in p.meta["lesions"]:
            assert les["lobe"] in {"left-upper", "left-lower", "right-upper", "right-lower"}
            assert len(les["center_xyz_mm"]) == 3
        found += int(p.label.sum() > 0)
    assert found >= 3
    none = make_chest_ct(seed=0, shape=SMALL, n_lesions=0)
    assert none.label.sum() == 0 and none.meta["lesion_count"] == 0


def test_lesion_intensity_matches_kind():
    p = make_chest_ct(seed=3, shape=(40, 128, 128), n_lesions=6, noise=False)
    lab = p.label.astype(bool)
    assert lab.sum() > 50
    lesion_mean = float(p.image[lab].mean())
    lung_mean = float(p.image[p.lung_mask & ~lab].mean())
    assert lesion_mean > lung_mean + 150  # lesions are denser than aerated lung


def test_same_seed_same_arrays_different_seed_different_arrays():
    a = make_chest_ct(seed=7, cohort="id", shape=SMALL)
    b = make_chest_ct(seed=7, cohort="id", shape=SMALL)
    c = make_chest_ct(seed=8, cohort="id", shape=SMALL)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.meta == b.meta and a.spacing_xyz == b.spacing_xyz and a.origin_xyz == b.origin_xyz
    assert not np.array_equal(a.image, c.image)
    d = make_chest_ct(seed=7, cohort="diagnostic-shift", shape=SMALL)
    assert not np.array_equal(a.image, d.image)


def test_hu_ranges_are_plausible():
    p = make_chest_ct(seed=2, cohort="id", shape=(32, 112, 112))
    img = p.image.astype(np.float64)
    corner = img[:, :6, :6]  # anterior right corner: room air
    assert -1024 <= corner.mean() <= -950
    lung = p.lung_mask & (p.label == 0)
    assert -900 <= img[lung].mean() <= -750
    assert img.max() > 300  # bone
    assert img.min() >= -1024 and img.max() <= 3071
    body = img > -300
    assert 0.2 < body.mean() < 0.8


def test_cohort_differences(small):
    idp, ds, diag, far = (small[c] for c in COHORTS)
    assert ds.spacing_xyz[2] == pytest.approx(8.0)
    assert idp.spacing_xyz[2] <= 5.0
    assert ds.meta["kernel"] in {"sharp", "soft"} and idp.meta["kernel"] == "standard"
    assert set(diag.meta["lesion_kinds"]) <= {"fibrosis", "nodule", "effusion"} and diag.meta["lesion_count"] >= 1
    assert far.label.sum() == 0 and not far.lung_mask.any() and far.meta["region"] == "abdomen"
    assert _largest_lung_density_region(far.image) < 0.002
    assert _largest_lung_density_region(idp.image) > 0.01


def test_default_shape_slice_counts():
    ds = make_chest_ct(seed=1, cohort="dataset-shift", inplane=64)
    idp = make_chest_ct(seed=1, cohort="id", inplane=64, spacing_xyz=(0.8, 0.8, 2.0))
    assert ds.shape[1:] == idp.shape[1:] == (64, 64)
    assert ds.shape[0] < idp.shape[0]  # thick slices: fewer slices over the same anatomy
    assert idp.spacing_xyz == (0.8, 0.8, 2.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_far_ood_has_no_large_lung_density_region(seed):
    far = make_chest_ct(seed=seed, cohort="far-ood", shape=SMALL)
    chest = make_chest_ct(seed=seed, cohort="id", shape=SMALL)
    assert far.label.sum() == 0 and far.meta["lesion_count"] == 0
    assert _largest_lung_density_region(far.image) < 0.002
    assert _largest_lung_density_region(chest.image) > 0.01


def test_noise_level_follows_the_cohort():
    quiet = make_chest_ct(seed=4, shape=SMALL, noise=False)
    noisy = make_chest_ct(seed=4, shape=SMALL)
    diff = noisy.image.astype(np.float64) - quiet.image
    inside = quiet.image > -200
    assert diff[inside].std() == pytest.approx(noisy.meta["noise_std_hu"], rel=0.35)


# ---------------------------------------------------------------- numpy filters


def test_convolve1d_matches_numpy_and_blur_keeps_constants():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    k = gaussian_kernel1d(1.3)
    r = len(k) // 2
    ours = convolve1d(x, k, axis=0)
    ref = np.convolve(np.pad(x, r, mode="edge"), k, mode="valid")
    assert np.allclose(ours, ref, atol=1e-5)
    vol = np.full((5, 7, 9), 3.0)
    assert np.allclose(gaussian_blur(vol, (1.0, 2.0, 0.0)), 3.0, atol=1e-5)
    with pytest.raises(ValueError):
        convolve1d(x, [0.5, 0.5], axis=0)


def test_gaussian_blur_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(6, 20, 24)).astype(np.float32)
    ours = gaussian_blur(vol, (0.0, 1.2, 0.7), truncate=4.0)
    ref = ndimage.gaussian_filter(vol.astype(np.float64), (0.0, 1.2, 0.7), mode="nearest", truncate=4.0)
    assert np.allclose(ours, ref, atol=1e-5)


# ---------------------------------------------------------------- nnU-Net cohort writer


def test_write_cohort_nnunet_layout(tmp_path):
    out = tmp_path / "Dataset900_Phantom"
    cases = write_cohort(out, cohort="diagnostic-shift", n=2, seed=3, shape=SMALL)  # case i: (cohort, seed, i)
    assert cases == ["PH_000", "PH_001"]
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"}
    assert ds["labels"] == {"background": 0, "lesion": 1}
    assert ds["numTraining"] == 2 and ds["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["PH_000_0000.nii.gz", "PH_001_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["PH_000.nii.gz", "PH_001.nii.gz"]
    meta = json.loads((out / "phantoms.json").read_text())
    for i, case in enumerate(cases):
        image = sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        label = sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz"))
        assert image.GetSize() == label.GetSize() == (SMALL[2], SMALL[1], SMALL[0])
        assert image.GetSpacing() == pytest.approx(label.GetSpacing())
        assert image.GetOrigin() == pytest.approx(label.GetOrigin())
        assert image.GetDirection() == pytest.approx(label.GetDirection())
        assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
        # deterministic per (cohort, seed, index)
        ref = make_chest_ct(seed=case_seed(3, i), cohort="diagnostic-shift", shape=SMALL)
        assert np.array_equal(sitk.GetArrayFromImage(image), ref.image)
        assert np.array_equal(sitk.GetArrayFromImage(label), ref.label)
        assert meta["cases"][case]["case_seed"] == case_seed(3, i)
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind


def test_write_cohort_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="cohort"):
        write_cohort(tmp_path, cohort="nope", n=1)
    with pytest.raises(ValueError, match="file_ending"):
        write_cohort(tmp_path, cohort="id", n=1, file_ending=".png")
    with pytest.raises(ValueError, match="n must be"):
        write_cohort(tmp_path, cohort="id", n=0)
    with pytest.raises(ValueError, match="prefix"):
        write_cohort(tmp_path, cohort="id", n=1, prefix="a/b")


# ---------------------------------------------------------------- MNI152 far-OOD case


def test_mni152_template_loads_from_nilearn_package_data():
    pytest.importorskip("nilearn")
    p = load_mni152_t1()
    source = Path(p.meta["source_path"]).resolve()
    package = Path(importlib.util.find_spec("nilearn").origin).parent.resolve()
    assert package in source.parents  # read from the installed package, not downloaded
    ref = sitk.ReadImage(str(source))
    image, label = p.to_sitk()
    assert image.GetSize() == ref.GetSize() == label.GetSize()
    assert image.GetSpacing() == pytest.approx(ref.GetSpacing())
    assert image.GetOrigin() == pytest.approx(ref.GetOrigin())
    assert image.GetDirection() == pytest.approx(ref.GetDirection(), abs=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ref).astype(np.int16))
    assert p.label.sum() == 0 and p.meta["cohort"] == "far-ood"
    assert p.image.max() > 100  # a real brain template, not an empty volume


def test_ras_to_lps_conversion():
    affine = np.array([[2.0, 0, 0, -90], [0, 0, 3.0, 120], [0, -1.5, 0, -70], [0, 0, 0, 1]])
    spacing, origin, direction = ras_affine_to_lps(affine)
    assert spacing == pytest.approx((2.0, 1.5, 3.0))
    assert origin == pytest.approx((90.0, -120.0, -70.0))
    assert direction == pytest.approx((-1, 0, 0, 0, 0, -1, 0, -1, 0))


def test_mni152_without_nilearn_raises_a_clear_error(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name.split(".")[0] == "nilearn" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(MissingDependencyError, match="nilearn") as info:
        load_mni152_t1()
    assert isinstance(info.value, SegsentryError)
    assert "segsentry[eval]" in str(info.value)


# ---------------------------------------------------------------- import hygiene


def test_phantoms_need_only_numpy_and_simpleitk():
    blocked = ["torch", "scipy", "nilearn", "nibabel", "sklearn", "skimage", "matplotlib", "nnunetv2"]
    proc = run_with_blocked_imports(blocked, """
        import segsentry.phantoms as ph
        p = ph.make_chest_ct(seed=0, cohort="diagnostic-shift", shape=(12, 48, 48))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("RESULT", p.image.shape, loaded)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT (12, 48, 48) []" in proc.stdout
