"""The input-content guard: blank, constant or tiny volumes are flagged OOD whatever their distance says."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CT_SPACING_XYZ
from factory import ct_volume, write_volume
from segsentry.manifest import InputRange
from segsentry.runtime import load_bundle, run_batch
from segsentry.runtime.guard import EXTENT_FRACTION, STD_FRACTION, content_reasons, content_stats, input_range


def test_content_stats_are_orientation_free_and_in_mm():
    image = np.zeros((1, 10, 20, 32), dtype=np.float32)
    image[0, :, :, :16] = 100.0  # half the voxels (also of every other one): std 50 exactly
    stats = content_stats(image, (2.0, 1.0, 0.5))
    assert stats.extent_mm == [16.0, 20.0, 20.0]  # 32 * 0.5, 20 * 1, 10 * 2, sorted
    assert stats.intensity_std == [pytest.approx(50.0)]
    allowed = input_range([stats, content_stats(image * 2, (4.0, 1.0, 0.5))])
    assert allowed.min_intensity_std == [pytest.approx(50.0)] and allowed.min_extent_mm == [16.0, 20.0, 20.0]


def test_content_reasons_at_the_factors():
    allowed = InputRange(min_intensity_std=[100.0], min_extent_mm=[50.0, 100.0, 100.0])
    ok = content_stats(np.random.default_rng(0).normal(0, 100 * STD_FRACTION * 1.5, (1, 20, 20, 20)), (2.5, 5, 5))
    assert content_reasons(ok, allowed) == []
    flat = content_stats(np.full((1, 20, 20, 20), 7.0, np.float32), (2.5, 5, 5))
    assert any("nearly constant" in r for r in content_reasons(flat, allowed))
    small = content_stats(np.random.default_rng(0).normal(0, 100, (1, 4, 20, 20)), (EXTENT_FRACTION * 50 / 4.5, 5, 5))
    assert any("too small" in r for r in content_reasons(small, allowed))
    assert content_reasons(flat, None) == []  # bundles calibrated before the guard: no range, no verdict


def test_constant_and_tiny_volumes_are_flagged_but_a_normal_case_is_not(ct_pipeline, test_cases, tmp_path):
    c = load_bundle(ct_pipeline.ood_onnx).manifest.calibration
    assert c.input_range is not None and c.input_range.min_intensity_std[0] > 100  # CT phantoms: air and tissue
    inputs = tmp_path / "in"
    write_volume(inputs / "blank_0000.nii.gz", np.full((12, 80, 70), -1000, np.int16), spacing_xyz=CT_SPACING_XYZ)
    tiny = ct_volume(np.random.default_rng(5), shape_zyx=(4, 16, 16), border=0)
    write_volume(inputs / "tiny_0000.nii.gz", tiny, spacing_xyz=CT_SPACING_XYZ)
    normal = next(iter(test_cases["ct"].values()))[0]
    result = run_batch(ct_pipeline.ood_onnx, [inputs, normal], tmp_path / "out", backend="onnxruntime", qa=False)
    reports = {o.case_id: json.loads((tmp_path / "out" / f"{o.case_id}.json").read_text()) for o in result.outcomes}
    assert reports["blank"]["ood"] is True
    assert any("nearly constant" in r for r in reports["blank"]["ood_reasons"])
    assert reports["tiny"]["ood"] is True
    assert any("too small" in r for r in reports["tiny"]["ood_reasons"])
    normal_report = reports[normal.name.removesuffix("_0000.nii.gz")]
    assert not any("constant" in r or "small" in r for r in normal_report["ood_reasons"])
