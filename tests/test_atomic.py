"""Atomic writes: nothing half-written is visible under an image ending; multi-file formats land complete."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from segsentry._atomic import atomic_path, write_text_atomic
from segsentry.runtime.io import write_image


def test_the_partial_file_is_inside_a_folder_without_an_image_ending(tmp_path):
    with atomic_path(tmp_path / "CASE.nii.gz") as tmp:
        tmp.write_bytes(b"partial")
        assert list(tmp_path.glob("*.nii.gz")) == []  # what a later `*.nii.gz` glob of the folder sees mid-write
        assert list(tmp_path.rglob("*.nii.gz")) == [tmp] and tmp.name == "CASE.nii.gz"
        assert not any(p.name.endswith((".nii.gz", ".nii", ".mha")) for p in tmp_path.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["CASE.nii.gz"]  # moved into place, the folder gone


def test_a_failed_write_leaves_the_target_untouched_and_no_debris(tmp_path):
    write_text_atomic(tmp_path / "CASE.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "CASE.json") as tmp:
            tmp.write_text("new, half")
            raise RuntimeError("killed")
    assert (tmp_path / "CASE.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["CASE.json"]


@pytest.mark.parametrize("ending,companion", [(".mhd", (".raw", ".zraw")), (".hdr", (".img",))])
def test_multi_file_formats_arrive_complete(tmp_path, ending, companion):
    array = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    reference = sitk.Image(1, 1, 1, sitk.sitkUInt8)
    reference.SetSpacing((0.5, 0.7, 2.0))
    write_image(array, reference, tmp_path / f"CASE{ending}")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == f"CASE{ending}" or f"CASE{ending}" in names
    assert len(names) == 2 and any(n.endswith(companion) for n in names), names
    assert not any(n.startswith(".") for n in names)
    back = sitk.ReadImage(str(tmp_path / f"CASE{ending}"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
