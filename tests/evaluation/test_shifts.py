"""Transformation shifts (paper Table 4) with TorchIO: geometry, label consistency, determinism, strength."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("torchio")

from segsentry.evaluation.metrics import EvaluationError  # noqa: E402
from segsentry.evaluation.shifts import LEVELS, SHIFT_LEVELS, apply_shift, shift_folder  # noqa: E402

KINDS = ("artefact", "affine")
SPACING = (0.9, 0.8, 2.0)
ORIGIN = (12.5, -30.0, 7.25)
ANGLE = 0.3
DIRECTION = (math.cos(ANGLE), -math.sin(ANGLE), 0.0, math.sin(ANGLE), math.cos(ANGLE), 0.0, 0.0, 0.0, 1.0)
CUBE = (slice(9, 15), slice(21, 27), slice(21, 27))  # z, y, x of a 24x48x48 volume
BRIGHT = 100.0


def _volume(seed: int = 0, cube: tuple[slice, ...] = CUBE) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(seed)
    array = rng.normal(0.0, 2.0, size=(24, 48, 48)).astype(np.float32)
    labels = np.zeros(array.shape, dtype=np.uint8)
    array[cube] += BRIGHT
    labels[cube] = 2
    labels[2:5, 5:10, 5:10] = 1  # a second, small label away from the cube
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    label = sitk.GetImageFromArray(labels)
    label.CopyInformation(image)
    return image, label


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def test_table_has_every_kind_and_level():
    assert set(SHIFT_LEVELS) == set(KINDS)
    for kind in KINDS:
        assert tuple(SHIFT_LEVELS[kind]) == LEVELS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("level", LEVELS)
def test_geometry_preserved_and_labels_subset(kind, level):
    image, label = _volume()
    out_image, out_label = apply_shift(image, label, kind=kind, level=level, seed=3)
    assert out_label is not None
    assert _geometry(out_image) == _geometry(image)
    assert _geometry(out_label) == _geometry(label)
    assert out_image.GetPixelID() == sitk.sitkFloat32
    assert out_label.GetPixelID() == label.GetPixelID()
    assert set(np.unique(_array(out_label))) <= set(np.unique(_array(label)))
    assert np.isfinite(_array(out_image)).all()
    assert not np.array_equal(_array(out_image), _array(image))


@pytest.mark.parametrize("level", LEVELS)
def test_artefact_leaves_label_untouched(level):
    image, label = _volume()
    _, out_label = apply_shift(image, label, kind="artefact", level=level, seed=5)
    np.testing.assert_array_equal(_array(out_label), _array(label))


def test_label_is_optional():
    image, _ = _volume()
    for kind in KINDS:
        out_image, out_label = apply_shift(image, None, kind=kind, level="medium", seed=0)
        assert out_label is None
        assert _geometry(out_image) == _geometry(image)


def _centroid(mask: np.ndarray) -> np.ndarray:
    assert mask.any()
    return np.argwhere(mask).mean(axis=0)


@pytest.mark.parametrize("level", ["medium", "strong"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_affine_moves_image_and_label_together(level, seed):
    image, label = _volume()
    out_image, out_label = apply_shift(image, label, kind="affine", level=level, seed=seed)
    bright = _array(out_image) > BRIGHT / 2
    cube_label = _array(out_label) == 2
    before = _centroid(_array(label) == 2)
    after_image, after_label = _centroid(bright), _centroid(cube_label)
    assert np.abs(after_image - after_label).max() <= 1.0
    assert np.linalg.norm(after_label - before) > 1.0  # it did move
    # the label is not lost or smeared: its volume stays within the scaling band
    assert 0.3 * (_array(label) == 2).sum() < cube_label.sum() < 3.0 * (_array(label) == 2).sum()


def test_affine_same_seed_same_transform_for_label_and_other_channel():
    """A second channel shifted without the label (as in shift_folder) moves exactly like the first."""
    image, label = _volume()
    first, _ = apply_shift(image, label, kind="affine", level="strong", seed=11)
    second, _ = apply_shift(image, None, kind="affine", level="strong", seed=11)
    np.testing.assert_array_equal(_array(first), _array(second))


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_per_seed(kind):
    import torch

    image, label = _volume()
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a_img, a_lab = apply_shift(image, label, kind=kind, level="medium", seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG left alone
    b_img, b_lab = apply_shift(image, label, kind=kind, level="medium", seed=7)
    c_img, _ = apply_shift(image, label, kind=kind, level="medium", seed=8)
    np.testing.assert_array_equal(_array(a_img), _array(b_img))
    np.testing.assert_array_equal(_array(a_lab), _array(b_lab))
    assert not np.array_equal(_array(a_img), _array(c_img))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stronger_level_changes_image_more(kind, seed):
    image, label = _volume()
    reference = _array(image)
    diffs = {
        level: float(np.abs(_array(apply_shift(image, label, kind=kind, level=level, seed=seed)[0]) - reference).mean())
        for level in LEVELS
    }
    assert 0 < diffs["weak"] < diffs["strong"]
    assert diffs["weak"] < diffs["medium"] < diffs["strong"]


def test_bad_kind_level_and_mismatched_label():
    image, label = _volume()
    with pytest.raises(EvaluationError, match="kind"):
        apply_shift(image, label, kind="motion", level="weak", seed=0)
    with pytest.raises(EvaluationError, match="level"):
        apply_shift(image, label, kind="affine", level="extreme", seed=0)
    other = sitk.Image(label)
    other.SetSpacing((1.0, 1.0, 1.0))
    with pytest.raises(EvaluationError, match="grid"):
        apply_shift(image, other, kind="affine", level="weak", seed=0)


# ------------------------------------------------------------------------------------------------ folders


def _write_dataset(root: Path, n_cases: int = 2, with_labels: bool = True) -> list[str]:
    (root / "imagesTr").mkdir(parents=True)
    if with_labels:
        (root / "labelsTr").mkdir()
    cases = [f"case_{i:03d}" for i in range(n_cases)]
    for i, case in enumerate(cases):
        image, label = _volume(seed=i)
        sitk.WriteImage(image, str(root / "imagesTr" / f"{case}_0000.nii.gz"))
        second = sitk.GetImageFromArray(_array(image) * 0.5)
        second.CopyInformation(image)
        sitk.WriteImage(second, str(root / "imagesTr" / f"{case}_0001.nii.gz"))
        if with_labels:
            sitk.WriteImage(label, str(root / "labelsTr" / f"{case}.nii.gz"))
    dataset = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "description": "synthetic",
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return cases


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", KINDS)
def test_shift_folder_writes_nnunet_layout(tmp_path, kind):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    cases = _write_dataset(in_dir)
    before = _snapshot(in_dir)
    failed = shift_folder(in_dir, out_dir, kind=kind, level="strong", seed=4)
    assert failed == []
    assert _snapshot(in_dir) == before  # inputs untouched
    names = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    expected = ["dataset.json"]
    for case in cases:
        expected += [f"imagesTr/{case}_0000.nii.gz", f"imagesTr/{case}_0001.nii.gz", f"labelsTr/{case}.nii.gz"]
    assert names == sorted(expected)  # no temporary files left behind
    dataset = json.loads((out_dir / "dataset.json").read_text())
    assert "affine" in dataset["description"] or "artefact" in dataset["description"]
    assert kind in dataset["description"] and "strong" in dataset["description"]
    assert dataset["labels"] == {"background": 0, "a": 1, "b": 2}
    assert dataset["numTraining"] == len(cases)
    for case in cases:
        src = sitk.ReadImage(str(in_dir / "imagesTr" / f"{case}_0000.nii.gz"))
        out = sitk.ReadImage(str(out_dir / "imagesTr" / f"{case}_0000.nii.gz"))
        lab = sitk.ReadImage(str(out_dir / "labelsTr" / f"{case}.nii.gz"))
        assert out.GetSize() == src.GetSize()
        np.testing.assert_allclose(out.GetSpacing(), src.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(out.GetOrigin(), src.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(out.GetDirection(), src.GetDirection(), atol=1e-5)
        assert set(np.unique(_array(lab))) <= {0, 1, 2}
    if kind == "affine":  # both channels of a case got the same spatial transform
        c0 = _array(sitk.ReadImage(str(out_dir / "imagesTr" / f"{cases[0]}_0000.nii.gz")))
        c1 = _array(sitk.ReadImage(str(out_dir / "imagesTr" / f"{cases[0]}_0001.nii.gz")))
        np.testing.assert_allclose(c1, c0 * 0.5, rtol=1e-4, atol=1e-3)


def test_shift_folder_is_deterministic_and_works_without_labels(tmp_path):
    in_dir = tmp_path / "in"
    _write_dataset(in_dir, n_cases=1, with_labels=False)
    assert shift_folder(in_dir, tmp_path / "a", kind="artefact", level="medium", seed=1) == []
    assert shift_folder(in_dir, tmp_path / "b", kind="artefact", level="medium", seed=1) == []
    assert not (tmp_path / "a" / "labelsTr").exists()
    name = "imagesTr/case_000_0000.nii.gz"
    np.testing.assert_array_equal(
        _array(sitk.ReadImage(str(tmp_path / "a" / name))), _array(sitk.ReadImage(str(tmp_path / "b" / name)))
    )


def test_shift_folder_refuses_to_overwrite(tmp_path):
    in_dir = tmp_path / "in"
    _write_dataset(in_dir, n_cases=1)
    before = _snapshot(in_dir)
    with pytest.raises(EvaluationError, match="overwrite"):
        shift_folder(in_dir, in_dir, kind="affine", level="weak")
    with pytest.raises(EvaluationError, match="overwrite"):
        shift_folder(in_dir, tmp_path / "x" / ".." / "in", kind="affine", level="weak")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(EvaluationError, match="not empty"):
        shift_folder(in_dir, busy, kind="affine", level="weak")
    assert (busy / "keep.txt").read_text() == "mine"
    assert _snapshot(in_dir) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert shift_folder(in_dir, empty, kind="affine", level="weak") == []


def test_shift_folder_reports_bad_case_and_continues(tmp_path, caplog):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    cases = _write_dataset(in_dir, n_cases=3)
    (in_dir / "imagesTr" / f"{cases[1]}_0001.nii.gz").write_bytes(b"not a nifti")
    failed = shift_folder(in_dir, out_dir, kind="affine", level="medium", seed=0)
    assert failed == [cases[1]]
    assert cases[1] in caplog.text
    assert not list((out_dir / "imagesTr").glob(f"{cases[1]}_*"))  # nothing half-written
    assert not (out_dir / "labelsTr" / f"{cases[1]}.nii.gz").exists()
    for case in (cases[0], cases[2]):
        assert (out_dir / "imagesTr" / f"{case}_0000.nii.gz").is_file()
        assert (out_dir / "labelsTr" / f"{case}.nii.gz").is_file()
    assert json.loads((out_dir / "dataset.json").read_text())["numTraining"] == 2


def test_shift_folder_missing_images(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(EvaluationError, match="imagesTr"):
        shift_folder(tmp_path / "in", tmp_path / "out", kind="affine", level="weak")
