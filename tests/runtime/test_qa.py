"""The QA page: written for every run unless disabled, self-contained, one section per case."""

from __future__ import annotations

import base64
import re

import SimpleITK as sitk

from segsentry.runtime import run_batch


def test_qa_page_per_batch(ct_pipeline, test_cases, tmp_path):
    files = [f for fs in test_cases["ct"].values() for f in fs]
    bad = tmp_path / "broken_0000.nii.gz"
    bad.write_bytes(b"nope")
    result = run_batch(ct_pipeline.ood_onnx, [*files, bad], tmp_path / "out")
    page = (tmp_path / "out" / "qa.html").read_text()
    assert result.qa_page == tmp_path / "out" / "qa.html"
    for case in test_cases["ct"]:
        assert f"<h2>{case} — " in page
        for view in ("axial", "coronal"):
            for layer in ("image", "mask", "uncertainty"):
                png = tmp_path / "out" / "qa" / f"{case}_{view}_{layer}.png"
                image = sitk.ReadImage(str(png))
                assert image.GetNumberOfComponentsPerPixel() == 3
                assert min(image.GetSize()) >= 64
    assert "broken — <b class=\"ood\">failed</b>" in page
    # self-contained: every image is embedded, nothing is loaded from elsewhere
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 6 * len(test_cases["ct"])
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    base64.b64decode(sources[0].split(",", 1)[1], validate=True)
    assert "<svg" in page and "threshold" in page


def test_qa_can_be_turned_off(ct_pipeline, test_cases, tmp_path):
    files = next(iter(test_cases["ct"].values()))
    result = run_batch(ct_pipeline.ood_onnx, files, tmp_path / "out", qa=False)
    assert result.qa_page is None
    assert not (tmp_path / "out" / "qa.html").exists()
    assert not (tmp_path / "out" / "qa").exists()


# ---- radiological convention: the picture follows the patient, not the array --------------------------------

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from factory import ROTATED_DIRECTION, mr_volumes  # noqa: E402
from segsentry.runtime.qa import LETTER_RGB, OUTLINE_RGB, picture, radiological_planes, window  # noqa: E402

STORAGES = {  # SimpleITK direction (columns: where index x, y, z point in LPS)
    "LPS": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "RAS": (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # a NIfTI written the RAS way
    "z flipped": (1, 0, 0, 0, 1, 0, 0, 0, -1),  # slices stored feet last
    "rotated 90": ROTATED_DIRECTION,  # a chest lying sideways in the array
    "oblique 10": (np.cos(0.17), -np.sin(0.17), 0, np.sin(0.17), np.cos(0.17), 0, 0, 0, 1),  # nearest axes
}
MARKERS = {1: ((14.0, 0.0, 0.0), 4.0), 2: ((0.0, -14.0, 0.0), 4.0), 3: ((0.0, 0.0, 8.0), 3.0)}  # left, anterior, superior


def _patient(direction, shape_zyx=(12, 40, 40), spacing_xyz=(1.0, 1.0, 2.0)):
    """Label volume with markers at fixed patient positions (LPS mm, centre of the volume at 0) stored along
    ``direction``: 1 on the patient's left, 2 anterior, 3 superior."""
    geometry = sitk.Image([int(s) for s in shape_zyx[::-1]], sitk.sitkUInt8)
    geometry.SetSpacing(spacing_xyz)
    d = np.array(direction, dtype=np.float64).reshape(3, 3)
    half = np.array(spacing_xyz) * (np.array(shape_zyx[::-1]) - 1) / 2
    geometry.SetOrigin(tuple(-(d @ half)))
    geometry.SetDirection(tuple(d.ravel()))
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape_zyx], indexing="ij"), -1)[..., ::-1]  # (z,y,x,[i,j,k])
    points = np.array(geometry.GetOrigin()) + (idx * np.array(spacing_xyz)) @ d.T
    labels = np.zeros(shape_zyx, np.uint8)
    for value, (centre, radius) in MARKERS.items():
        labels[np.linalg.norm(points - np.array(centre), axis=-1) <= radius] = value
    centre_index = geometry.TransformPhysicalPointToIndex((0.0, 0.0, 0.0))[::-1]
    return labels, geometry, centre_index


def _centroid(plane_mask, value):
    rows, cols = np.nonzero(plane_mask == value)
    assert rows.size, f"marker {value} is not in the plane"
    return rows.mean() / plane_mask.shape[0], cols.mean() / plane_mask.shape[1]


@pytest.mark.parametrize("storage", list(STORAGES))
def test_patient_left_is_on_the_image_right_and_anterior_superior_up(storage):
    labels, geometry, centre = _patient(STORAGES[storage])
    image = np.where(labels > 0, 300.0, -1000.0).astype(np.float32)
    planes, label, _ = radiological_planes(image, labels, None, geometry=geometry, focus_zyx=centre, box_zyx=None,
                                           modality="CT")
    axial, coronal = planes["axial"], planes["coronal"]
    row, col = _centroid(axial.mask, 1)
    assert col > 0.75 and 0.35 < row < 0.65, (storage, row, col)  # left marker: image right
    row, col = _centroid(axial.mask, 2)
    assert row < 0.25 and 0.35 < col < 0.65, (storage, row, col)  # anterior marker: top
    row, col = _centroid(coronal.mask, 1)
    assert col > 0.75, (storage, row, col)
    row, col = _centroid(coronal.mask, 3)
    assert row < 0.3 and 0.35 < col < 0.65, (storage, row, col)  # superior marker: top
    assert axial.letters == ("A", "P", "R", "L") and coronal.letters == ("S", "I", "R", "L")
    assert axial.col_spacing == pytest.approx(1.0) and coronal.row_spacing == pytest.approx(2.0)
    assert label.startswith("CT window")


def test_the_most_distant_patch_is_outlined_and_the_map_has_a_colour_bar():
    labels, geometry, centre = _patient(STORAGES["RAS"])
    zs, ys, xs = np.nonzero(labels == 1)  # the patch: the left marker's bounding box, in input index space
    box = [[int(zs.min()), int(zs.max()) + 1], [int(ys.min()), int(ys.max()) + 1], [int(xs.min()), int(xs.max()) + 1]]
    uncertainty = (labels == 1).astype(np.float32)
    planes, _, _ = radiological_planes(np.zeros(labels.shape, np.float32), labels, uncertainty, geometry=geometry,
                                       focus_zyx=centre, box_zyx=box, modality="CT")
    axial = planes["axial"]
    r0, r1, c0, c1 = axial.box
    rows, cols = np.nonzero(axial.mask == 1)
    assert (r0, r1, c0, c1) == (rows.min(), rows.max(), cols.min(), cols.max())  # the box hugs the marker
    image = picture(axial, "image", (0.0, 1.0))
    assert np.all(image == OUTLINE_RGB, axis=-1).any()
    assert np.all(image == LETTER_RGB, axis=-1).any()
    right = image[image.shape[0] // 2 - 30: image.shape[0] // 2 + 30, -20:]
    assert np.all(right == LETTER_RGB, axis=-1).any()  # the "L" sits at the right edge
    heat = picture(axial, "uncertainty", (0.0, 1.0))
    assert heat.shape[0] == image.shape[0] and heat.shape[1] > image.shape[1]
    np.testing.assert_allclose(heat[0, -1], [255, 255, 255])  # colour bar: top = the range's top (white)
    np.testing.assert_allclose(heat[-1, -1], [0, 0, 0])  # bottom = black


def test_mr_gets_its_own_window_not_the_ct_one():
    t1 = mr_volumes(np.random.default_rng(0))[0]
    grey, label = window(t1, "T1")
    body = t1 != 0
    assert (grey[body] >= 1).mean() < 0.01 and (grey[body] <= 0).mean() < 0.01
    assert 0.3 < float(np.median(grey[body])) < 0.7
    ct_grey, _ = window(t1, "CT")
    assert (ct_grey[body] >= 0.9).mean() > 0.95  # what the CT window did to an MR: all white
    assert "percentiles" in label


def test_a_fold_ensembles_disagreement_is_drawn_in_the_radiological_convention_with_its_colour_bar():
    """The disagreement map (fraction of folds disagreeing) follows the same orientation as the mask: folds that
    disagree only on the patient's left marker light up the image's right; its colour bar spans 0 to 1; without
    a map the plane has none and picture() refuses the layer."""
    labels, geometry, centre = _patient(STORAGES["RAS"])
    disagreement = np.where(labels == 1, 2 / 3, 0.0).astype(np.float32)
    planes, _, _ = radiological_planes(np.zeros(labels.shape, np.float32), labels, None, geometry=geometry,
                                       focus_zyx=centre, box_zyx=None, modality="CT", disagreement=disagreement)
    axial = planes["axial"]
    rows, cols = np.nonzero(axial.disagreement > 0)
    assert cols.mean() / axial.disagreement.shape[1] > 0.75  # patient left = image right
    np.testing.assert_array_equal(axial.disagreement > 0, axial.mask == 1)
    heat = picture(axial, "disagreement", (0.0, 1.0))
    np.testing.assert_allclose(heat[0, -1], [255, 255, 255])
    np.testing.assert_allclose(heat[-1, -1], [0, 0, 0])
    plain, _, _ = radiological_planes(np.zeros(labels.shape, np.float32), labels, None, geometry=geometry,
                                      focus_zyx=centre, box_zyx=None, modality="CT")
    assert plain["axial"].disagreement is None
    with pytest.raises(ValueError, match="disagreement"):
        picture(plain["axial"], "disagreement", (0.0, 1.0))
