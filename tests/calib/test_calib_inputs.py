"""ood-calib refuses inputs that would give a useless bundle without a word, and records the training
images' orientation, which ood-run compares each case against."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from factory import write_volume
from segsentry.calib import calibrate
from segsentry.errors import CalibrationError, InputError
from segsentry.runtime import load_bundle
from segsentry.runtime.batch import run_batch


def test_one_training_case_is_refused_and_says_what_the_rule_needs(ct_pipeline, tmp_path):
    folder = tmp_path / "imagesTr"
    folder.mkdir()
    shutil.copy(sorted(ct_pipeline.images.iterdir())[0], folder)
    with pytest.raises(CalibrationError, match=r"at least 2 training cases, found 1 .*alpha 0.05 needs at least 19"):
        calibrate(ct_pipeline.features_onnx, [folder], tmp_path / "m.ood.onnx")
    assert not (tmp_path / "m.ood.onnx").exists()


def test_label_maps_are_refused(ct_pipeline, tmp_path):
    """A labelsTr-like folder (integer images with values 0, 1, 2) given as training images."""
    folder = tmp_path / "labelsTr"
    for i in range(3):
        labels = np.zeros((12, 80, 70), np.uint8)
        labels[3:8, 20:50, 10:30] = 1
        labels[4:6, 30:40, 40:60] = 2 + i % 2
        write_volume(folder / f"lab{i}_0000.nii.gz", labels, spacing_xyz=(0.8, 0.75, 4.0))
    with pytest.raises(CalibrationError, match=r"only 3 distinct integer value\(s\) \(0, 1, 2\): a label map"):
        calibrate(ct_pipeline.features_onnx, [folder], tmp_path / "m.ood.onnx")


def test_a_dataset_root_instead_of_imagesTr_points_at_it(ct_pipeline, tmp_path):
    (tmp_path / "Dataset001" / "imagesTr").mkdir(parents=True)
    (tmp_path / "Dataset001" / "dataset.json").write_text("{}")
    with pytest.raises(InputError, match=r"holds no images .* did you mean .*Dataset001/imagesTr\?"):
        calibrate(ct_pipeline.features_onnx, [tmp_path / "Dataset001"], tmp_path / "m.ood.onnx")


def test_training_orientation_is_recorded_and_a_case_stored_otherwise_is_warned(ct_pipeline, test_cases, tmp_path):
    """The session's training images are stored PRS (90° about z); a test case rewritten with the identity
    direction (LPS) gets the warning in CASE.json, the unchanged one does not."""
    assert load_bundle(ct_pipeline.ood_onnx).manifest.calibration.train_orientation == "PRS"
    source = next(iter(test_cases["ct"].values()))[0]
    image = sitk.ReadImage(str(source))
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    (tmp_path / "in").mkdir()
    sitk.WriteImage(image, str(tmp_path / "in" / "turned_0000.nii.gz"))
    run_batch(ct_pipeline.ood_onnx, [source, tmp_path / "in" / "turned_0000.nii.gz"], tmp_path / "o", qa=False)
    turned = json.loads((tmp_path / "o" / "turned.json").read_text())
    same = json.loads((tmp_path / "o" / f"{source.name.removesuffix('_0000.nii.gz')}.json").read_text())
    assert [w for w in turned["warnings"] if "stored in orientation LPS, the training images in PRS" in w]
    assert not [w for w in same["warnings"] if "orientation" in w]
