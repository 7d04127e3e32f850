"""The tile step size (nnU-Net's ``-step_size`` / ``tile_step_size``) against nnU-Net's own predictor.

Oracle: ``nnUNetPredictor(tile_step_size=0.8, use_mirroring=False, device=cpu)`` on the same tiny random-weight
nnU-Net folder and held-out CT cases as tests/test_oracle.py. Tolerance as there: at most max(2, 1e-4 · n)
voxels may differ (onnxruntime's and torch's convolutions differ by ~1e-6, which can flip a voxel whose two
best float16-accumulated logits tie). The tile count is checked against nnU-Net's formula recomputed from the
plans and the image alone, so a step size that is silently ignored fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from factory import nnunet_network_geometry, nnunet_tile_starts

pytest.importorskip("nnunetv2")

STEP = 0.8


def _predict(bundle_path, files, *, step_size):
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.io import CaseInput
    from segsentry.runtime.pipeline import predict_case

    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    loaded = read_case(CaseInput("c", tuple(files)), num_channels=m.num_channels)
    with create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size) as b:
        return predict_case(loaded, b, m, step_size=step_size, mirroring=False)  # the oracle does not mirror


def _expected_tiles(model_dir, files, step):
    geometry = nnunet_network_geometry(model_dir, files)
    padded = [max(s, p) for s, p in zip(geometry.shape_preprocessed, geometry.patch)]
    return math.prod(len(nnunet_tile_starts(n, p, step)) for n, p in zip(padded, geometry.patch))


def test_step_size_masks_match_nnunet_predictor(ct_pipeline, test_cases):
    from segsentry.devtools.nnunet_reference import make_predictor, predict_files
    from segsentry.runtime.report import CaseReport

    predictor = make_predictor(ct_pipeline.model_dir)
    predictor.tile_step_size = STEP  # nnU-Net reads the attribute at every sliding window
    for case_id, files in test_cases["ct"].items():
        ours = _predict(ct_pipeline.ood_onnx, files, step_size=STEP)
        default = _predict(ct_pipeline.ood_onnx, files, step_size=None)
        assert ours.n_patches == _expected_tiles(ct_pipeline.model_dir, files, STEP)
        assert default.n_patches == _expected_tiles(ct_pipeline.model_dir, files, 0.5)
        assert ours.n_patches < default.n_patches, "the test case must tile differently at the two steps"
        expected = predict_files(predictor, files)
        mismatches = int((ours.mask != expected).sum())
        assert mismatches <= max(2, int(1e-4 * expected.size)), f"{case_id}: {mismatches} voxels differ"
        assert len(np.unique(expected)) > 1
        # recorded where CASE.json renders it from
        assert ours.step_size == STEP and default.step_size == 0.5
        report = CaseReport.from_prediction(ours, inputs=[], aggregation=None, timings={}, backend="onnxruntime",
                                            model_sha256="", bundle="", outputs={})
        assert report.to_dict()["step_size"] == STEP


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_step_size_outside_unit_interval_is_refused(ct_pipeline, test_cases, bad):
    from segsentry.errors import SegsentryError

    files = next(iter(test_cases["ct"].values()))
    with pytest.raises(SegsentryError, match="step size"):
        _predict(ct_pipeline.ood_onnx, files, step_size=bad)
