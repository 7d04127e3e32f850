"""ood-bench's graph cuts (network alone, head alone) and its one-pass volume timing, on the shipped demo bundle."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from segsentry.bench import bench_volume, head_only, network_only
from segsentry.calib.head import head_distance
from segsentry.contract import HEAD_SCOPE, HeadInitializer
from segsentry.demo import demo_bundle_path
from segsentry.runtime.bundle import load_bundle

STAGES = ["read", "preprocess", "inference", "scoring", "resample_back", "write", "total"]


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def test_network_only_is_the_bundle_without_its_head():
    bundle = load_bundle(demo_bundle_path())
    plain = onnx.load_model_from_string(network_only(bundle))
    assert [o.name for o in plain.graph.output] == ["logits"] and [i.name for i in plain.graph.input] == ["image"]
    assert not any(n.name.startswith(HEAD_SCOPE) for n in plain.graph.node)
    assert not any(i.name.startswith(HEAD_SCOPE) for i in plain.graph.initializer)
    x = np.random.default_rng(0).normal(size=(1, 1, *bundle.manifest.patch_size)).astype(np.float32)
    np.testing.assert_array_equal(_session(plain.SerializeToString()).run(["logits"], {"image": x})[0],
                                  _session(bundle.model_bytes).run(["logits"], {"image": x})[0])


def test_head_only_computes_the_contract_formula_and_is_none_without_a_head():
    """The shipped bundle fuses two taps: the head alone reads both features tensors and gives both distances,
    each the mean over the folds of the contract formula with that tap's own initializers."""
    bundle = load_bundle(demo_bundle_path())
    head = head_only(bundle)
    model = onnx.load_model_from_string(head)
    taps = [("features", "distance", HEAD_SCOPE, bundle.manifest.features.dim)] + [
        (f"tap{i}/features", tap.output, f"{HEAD_SCOPE}tap{i}/", tap.features.dim)
        for i, tap in enumerate(bundle.manifest.calibration.taps, start=1)]
    assert len(taps) == 2
    assert [i.name for i in model.graph.input] == [t[0] for t in taps]
    assert [o.name for o in model.graph.output] == [t[1] for t in taps]
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    folds = bundle.manifest.n_folds
    feeds, expected = {}, {}
    for k, (features, distance, base, dim) in enumerate(taps):
        scopes = [base] if folds == 1 else [f"{base}f{i}/" for i in range(folds)]  # one head per fold
        means = [values[scope + HeadInitializer.MEAN.value] for scope in scopes]
        z = np.random.default_rng(k).normal(size=(3, folds, dim)).astype(np.float32) + means
        per_fold = [head_distance({name.removeprefix(scope): v for name, v in values.items()
                                   if name.startswith(scope) and "/" not in name.removeprefix(scope)}, z[:, i])
                    for i, scope in enumerate(scopes)]
        feeds[features] = z if folds > 1 else z[:, 0]
        expected[distance] = np.mean(per_fold, axis=0)  # the ensemble's distance: the folds' mean
    got = dict(zip([t[1] for t in taps], _session(head).run(None, feeds)))
    for distance, want in expected.items():
        np.testing.assert_allclose(got[distance], want, rtol=1e-5, err_msg=distance)
    uncalibrated = dataclasses.replace(bundle, model_bytes=network_only(bundle))
    assert head_only(uncalibrated) is None


def test_bench_volume_preprocesses_once_and_reports_what_ood_run_reports(tmp_path, monkeypatch):
    import importlib

    from segsentry.phantoms import write_cohort
    from segsentry.runtime.batch import run_batch

    preprocess_module = importlib.import_module("segsentry.runtime.preprocess")  # the package exports the function

    write_cohort(tmp_path, cohort="id", n=1, seed=3, prefix="ID", shape=(40, 128, 128))
    volume = tmp_path / "imagesTr" / "ID_000_0000.nii.gz"
    bundle = load_bundle(demo_bundle_path())
    calls = []
    original = preprocess_module.preprocess

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(preprocess_module, "preprocess", counting)
    # predict_case (what bench_volume runs) looks the function up in the pipeline module
    monkeypatch.setattr(importlib.import_module("segsentry.runtime.pipeline"), "preprocess", counting)
    result = bench_volume(bundle, "onnxruntime", volume, threads=1)
    assert len(calls) == 1
    assert list(result) == ["volume", "n_patches", "wall_s", "n_folds", "mirror_axes", "engine_calls_per_patch",
                            "head_calls_per_patch", "stages_s", "distance_aggregation_s", "ood_overhead_fraction_of_e2e"]
    assert result["engine_calls_per_patch"] == 8  # the demo is mirrored over three axes, as nnUNetv2_predict
    assert result["head_calls_per_patch"] == 1  # onnxruntime holds the heads apart: the flips skip them
    stages = STAGES if bundle.manifest.n_folds == 1 else [*STAGES[:5], "fold_agreement", *STAGES[5:]]
    assert list(result["stages_s"]) == stages
    assert result["wall_s"] >= result["stages_s"]["total"] - 1e-3 > 0 and result["distance_aggregation_s"] > 0
    monkeypatch.undo()
    report = run_batch(demo_bundle_path(), [volume], tmp_path / "run", backend="onnxruntime", qa=False).outcomes[0].report
    assert result["n_patches"] == report.n_patches > 1
    assert list(report.timings_s) == stages  # the same stages as CASE.json


def test_bench_volume_refuses_an_input_that_is_not_one_case(tmp_path):
    from segsentry.errors import InputError

    from segsentry.phantoms import write_cohort

    write_cohort(tmp_path, cohort="id", n=2, seed=3, prefix="ID", shape=(8, 32, 32))
    with pytest.raises(InputError, match="must be one case, found 2"):
        bench_volume(load_bundle(demo_bundle_path()), "onnxruntime", tmp_path / "imagesTr", threads=1)
