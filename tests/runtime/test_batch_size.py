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


def test_the_default_is_the_backends_patches_per_call(monkeypatch):
    import dataclasses

    from segsentry.runtime import backends
    from segsentry.runtime.backends import BACKENDS, default_batch_size

    # one patch per call on every backend (batch 4 cost 2.2x the memory on a fullres net: batch_size_fullres.md)
    assert all(default_batch_size(name) == 1 for name in BACKENDS)
    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", dataclasses.replace(BACKENDS["onnxruntime"],
                                                                             default_batch_size=4))
    assert default_batch_size("ort") == 4  # names resolve as everywhere


@pytest.mark.parametrize(("asked", "mirroring"), [(None, False), (None, True), (3, True)])
def test_run_batch_uses_the_default_unless_asked(asked, mirroring, ct_pipeline, test_cases, tmp_path, monkeypatch):
    """The batch size is the patches per engine call, mirrored or not: a tile's flips are calls of their own."""
    import dataclasses

    from segsentry.runtime import backends, batch
    from segsentry.runtime.sliding import mirror_combinations

    monkeypatch.setitem(backends.BACKENDS, "onnxruntime", dataclasses.replace(backends.BACKENDS["onnxruntime"],
                                                                             default_batch_size=2))
    axes = batch.load_bundle(ct_pipeline.ood_onnx).manifest.tiling.mirror_axes
    terms = len(mirror_combinations(axes)) + 1 if axes and mirroring else 1
    used: list[int] = []
    calls: list[int] = []
    real = batch.infer_volume_for_case

    class Spy:
        def __init__(self, engine):
            self.engine, self.name = engine, engine.name

        def run(self, patches):
            calls.append(len(patches))
            return self.engine.run(patches)

        def run_network(self, patches):
            calls.append(len(patches))
            return self.engine.run_network(patches)

    def recording(data, engine, *args, batch_size, **kwargs):
        used.append(batch_size)
        return real(data, Spy(engine), *args, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(batch, "infer_volume_for_case", recording)
    files = next(iter(test_cases["ct"].values()))
    result = run_batch(ct_pipeline.ood_onnx, files, tmp_path / "out", backend="onnxruntime", threads=1, qa=False,
                       batch_size=asked, mirroring=mirroring)
    size = asked or 2
    assert used == [size]
    n_patches = result.outcomes[0].report.n_patches
    full, rest = divmod(n_patches, size)
    assert calls == [size] * (full * terms) + [rest] * (terms if rest else 0)
