"""DICOM series as cases: ids that never collide, echoes split, localizers left out, study trees expanded,
slices stacked in position order with the right geometry, irregular series only with a warning."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from segsentry.errors import InputError
from segsentry.runtime import dicom
from segsentry.runtime.io import collect_cases, read_case

pytest.importorskip("pydicom")
from dicom_factory import STEP_MM, base_slice, write_dicomdir, write_series  # noqa: E402


def _offset(value: int):
    def edit(i, ds):
        ds.PixelData = (ds.pixel_array.astype(np.int16) + value + 10 * i).astype(np.int16).tobytes()
    return edit


def test_same_folder_names_of_two_patients_never_collide(tmp_path):
    """patA/SE1 and patB/SE1 together: two cases with their own ids, each read from its own files."""
    write_series(tmp_path / "patA" / "SE1", edit=_offset(0))
    write_series(tmp_path / "patB" / "SE1", edit=_offset(500))
    cases = collect_cases([tmp_path / "patA" / "SE1", tmp_path / "patB" / "SE1"], num_channels=1)
    assert [c.case_id for c in cases] == ["patA_SE1", "patB_SE1"]
    a, b = (read_case(c, num_channels=1) for c in cases)
    assert a.series_uid != b.series_uid
    np.testing.assert_allclose(b.image - a.image, 500)


def test_one_series_folder_keeps_its_name_even_as_dot(tmp_path, monkeypatch):
    write_series(tmp_path / "SE7")
    monkeypatch.chdir(tmp_path / "SE7")
    assert [c.case_id for c in collect_cases([Path(".")], num_channels=1)] == ["SE7"]


def test_two_echoes_under_one_uid_become_two_cases(tmp_path):
    uid = __import__("pydicom").uid.generate_uid()
    write_series(tmp_path / "SE1", uid=uid, prefix="E1_", edit=lambda i, ds: setattr(ds, "EchoNumbers", 1))
    write_series(tmp_path / "SE1", uid=uid, prefix="E2_", edit=lambda i, ds: setattr(ds, "EchoNumbers", 2))
    cases = collect_cases([tmp_path / "SE1"], num_channels=1)
    assert [c.case_id for c in cases] == ["SE1_echo1", "SE1_echo2"]
    for case in cases:
        assert read_case(case, num_channels=1).image.shape == (1, 6, 128, 128)


def test_study_tree_and_dicomdir_expand_into_series(tmp_path):
    """A study folder with a DICOMDIR and two series folders, plus a folder holding two series: four cases."""
    write_series(tmp_path / "study" / "CT1", n=3)
    write_series(tmp_path / "study" / "CT2", n=4)
    write_series(tmp_path / "study" / "mixed", n=3, prefix="a", edit=lambda i, ds: setattr(ds, "SeriesNumber", 3))
    write_series(tmp_path / "study" / "mixed", n=5, prefix="b", edit=lambda i, ds: setattr(ds, "SeriesNumber", 4))
    write_dicomdir(tmp_path / "study")
    cases = collect_cases([tmp_path / "study"], num_channels=1)
    assert [c.case_id for c in cases] == ["CT1", "CT2", "mixed_S3", "mixed_S4"]
    assert [read_case(c, num_channels=1).image.shape[1] for c in cases] == [3, 4, 3, 5]


def test_localizers_are_left_out_with_a_warning(tmp_path):
    write_series(tmp_path / "SE1", n=5)
    write_series(tmp_path / "SE1", n=1, prefix="LOC", uid=dicom.read_slice(next((tmp_path / "SE1").iterdir()))
                 .series_uid, edit=lambda i, ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    (case,) = collect_cases([tmp_path / "SE1"], num_channels=1)
    loaded = read_case(case, num_channels=1)
    assert loaded.image.shape[1] == 5
    assert loaded.warnings == ["1 localizer image(s) left out"]
    assert [f.name for f in loaded.dicom_files] == [f"IM{i:04d}.dcm" for i in range(5)]  # what was stacked


def test_slices_are_stacked_by_position_with_the_series_geometry(tmp_path):
    """File names in reverse position order: the volume still runs along the slice normal, spacing = step."""
    z0 = float(base_slice().ImagePositionPatient[2])
    positions = [z0 + STEP_MM * (5 - i) for i in range(6)]  # IM0000 is the top slice
    write_series(tmp_path / "SE1", positions=positions, edit=_offset(0))
    (case,) = collect_cases([tmp_path / "SE1"], num_channels=1)
    loaded = read_case(case, num_channels=1, expected_modality="CT")
    means = loaded.image[0].mean(axis=(1, 2))
    assert np.all(np.diff(means) < 0)  # slice i (+10 i) was written at position 5 - i: bottom first
    assert [f.name for f in loaded.dicom_files] == [f"IM{i:04d}.dcm" for i in reversed(range(6))]
    assert loaded.spacing == pytest.approx((STEP_MM, 0.661468, 0.661468), rel=1e-5)
    assert loaded.reference.GetOrigin()[2] == pytest.approx(z0)
    assert loaded.modality == "CT"


def test_irregular_series_proceeds_only_when_allowed_and_then_warns(tmp_path):
    write_series(tmp_path / "SE1", positions=[0, 2.5, 5, 10, 12.5])
    (case,) = collect_cases([tmp_path / "SE1"], num_channels=1)
    with pytest.raises(InputError, match="--allow-irregular-slices"):
        read_case(case, num_channels=1)
    loaded = read_case(case, num_channels=1, allow_irregular_slices=True)
    assert any("irregular slice positions" in w and "processed anyway" in w for w in loaded.warnings)


def test_expected_modality_from_the_bundle_channels():
    assert dicom.expected_modality({"0": "CT"}, ["CTNormalization"]) == "CT"
    assert dicom.expected_modality({"0": "whatever"}, ["CTNormalization"]) == "CT"
    assert dicom.expected_modality({"0": "T2"}, ["ZScoreNormalization"]) == "MR"
    assert dicom.expected_modality({"0": "noNorm"}, ["NoNormalization"]) is None


def test_without_pydicom_a_dicom_case_fails_naming_the_extra(tmp_path, monkeypatch):
    """The runtime core works without pydicom: a DICOM case becomes a failed case that names segsentry[dicom]."""
    write_series(tmp_path / "SE1", n=2)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    (case,) = collect_cases([tmp_path / "SE1"], num_channels=1)
    with pytest.raises(InputError, match=r"pip install 'segsentry\[dicom\]'"):
        read_case(case, num_channels=1)
