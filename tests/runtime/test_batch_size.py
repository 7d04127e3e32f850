"""The batch size (patches per engine call) changes how fast a case runs, never what is written for it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from segsentry.runtime import run_batch


def _array(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_masks_do_not_depend_on_the_batch_size(backend, ct_pipeline, test_cases, tmp_path):
    if backend == "openvino":
        pytest.importorskip("openvino")
    files = [f for fs in test_cases["ct"].values() for f in fs]
    runs = {b: run_batch(ct_pipeline.ood_onnx, files, tmp_path / str(b), backend=backend, threads=1, qa=False,
                         batch_size=b) for b in (1, 4)}
    assert not runs[1].failed and not runs[4].failed
    for one, four in zip(runs[1].outcomes, runs[4].outcomes):
        assert one.report.n_patches > 4 and one.report.n_patches % 4  # a full batch and a short last one
        case = one.case_id
        np.testing.assert_array_equal(_array(tmp_path / "4" / f"{case}.nii.gz"),
                                      _array(tmp_path / "1" / f"{case}.nii.gz"))
        np.testing.assert_allclose(_array(tmp_path / "4" / f"{case}_uncertainty.nii.gz"),
                                   _array(tmp_path / "1" / f"{case}_uncertainty.nii.gz"), rtol=1e-4, atol=1e-6)
        reports = [json.loads((tmp_path / b / f"{case}.json").read_text()) for b in ("1", "4")]
        assert reports[1]["ood"] == reports[0]["ood"]
        assert reports[1]["score"] == pytest.approx(reports[0]["score"], rel=1e-4)


def test_the_default_is_the_backends_patches_per_call_over_a_tiles_flips(monkeypatch):
    import dataclasses

    from segsentry.runtime import backends
    from segsentry.runtime.backends import BACKENDS, default_batch_size

    # one patch per call on every backend (batch 4 cost 2.2x the memory on a fullres net: batch_size_fullres.md)
    assert all(default_batch_size(name) == 1 for name in BACKENDS)
    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", dataclasses.replace(BACKENDS["onnxruntime"],
                                                                             default_batch_size=4))
    assert default_batch_size("ort") == 4  # names resolve as everywhere
    assert default_batch_size("onnxruntime", patches_per_tile=2) == 2  # one mirroring axis: a tile and its flip
    assert default_batch_size("onnxruntime", patches_per_tile=8) == 1  # three axes: 8 patches per tile already
    with pytest.raises(ValueError, match="patches_per_tile"):
        default_batch_size("onnxruntime", patches_per_tile=0)


@pytest.mark.parametrize(("asked", "mirroring"), [(None, False), (None, True), (2, True)])
def test_run_batch_uses_the_default_unless_asked(asked, mirroring, ct_pipeline, test_cases, tmp_path, monkeypatch):
    from segsentry.runtime import batch
    from segsentry.runtime.backends import default_batch_size
    from segsentry.runtime.sliding import mirror_combinations

    axes = batch.load_bundle(ct_pipeline.ood_onnx).manifest.tiling.mirror_axes
    flips = len(mirror_combinations(axes)) + 1 if axes and mirroring else 1
    used: list[int] = []
    real = batch.infer_volume_for_case

    def recording(*args, batch_size, **kwargs):
        used.append(batch_size)
        return real(*args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(batch, "infer_volume_for_case", recording)
    files = next(iter(test_cases["ct"].values()))
    run_batch(ct_pipeline.ood_onnx, files, tmp_path / "out", backend="onnxruntime", threads=1, qa=False,
              batch_size=asked, mirroring=mirroring)
    assert used == [asked or default_batch_size("onnxruntime", patches_per_tile=flips)]
