"""The MC dropout graph pass (test-time dropout after the encoder stages) and the MC dropout baseline."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from segsentry.demo import demo_bundle_path
from segsentry.evaluation.mc_dropout import SCOPES_KEY, add_mc_dropout, encoder_stage_outputs
from segsentry.evaluation.metrics import EvaluationError
from segsentry.runtime.bundle import load_bundle


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _scoped(node: onnx.NodeProto, *scopes: str) -> onnx.NodeProto:
    entry = node.metadata_props.add()
    entry.key, entry.value = SCOPES_KEY, repr(["", "network", "network.encoder", *scopes])
    return node


def _two_stage_model() -> onnx.ModelProto:
    """x -> stage 0 (Relu, Identity) -> stage 1 (Identity) -> Neg -> y, with dynamo-style scope metadata."""
    nodes = [
        _scoped(helper.make_node("Relu", ["x"], ["a"]), "network.encoder.stages.0", "network.encoder.stages.0.0"),
        _scoped(helper.make_node("Identity", ["a"], ["b"]), "network.encoder.stages.0"),
        _scoped(helper.make_node("Identity", ["b"], ["c"]), "network.encoder.stages.1"),
        helper.make_node("Neg", ["c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5000])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_stage_outputs_are_the_tensors_leaving_each_stage():
    assert encoder_stage_outputs(_two_stage_model()) == {0: ["b"], 1: ["c"]}
    demo = encoder_stage_outputs(onnx.load(demo_bundle_path()))
    folds = load_bundle(demo_bundle_path()).manifest.n_folds
    assert sorted(demo) == [0, 1, 2, 3, 4] and all(len(v) == folds for v in demo.values())


def test_dropout_drops_half_and_rescales_the_rest():
    model = add_mc_dropout(_two_stage_model(), p=0.5, stages=[0])
    x = np.ones((4, 5000), dtype=np.float32)
    session = _session(model)
    first, second = session.run(None, {"x": x})[0], session.run(None, {"x": x})[0]
    assert set(np.unique(first)) <= {0.0, -2.0}  # kept values scaled by 1 / (1 - p), then negated
    # 20 000 Bernoulli(0.5) draws: the dropped fraction is within 5 sigma (0.018) of one half
    assert abs(np.mean(first == 0) - 0.5) < 0.018
    assert np.mean(first != second) > 0.4  # a fresh mask on every call
    np.testing.assert_array_equal(_session(model).run(None, {"x": x})[0], first)  # reproducible per session


def test_both_stages_compound_and_p0_is_the_identity():
    x = np.ones((4, 5000), dtype=np.float32)
    both = _session(add_mc_dropout(_two_stage_model(), p=0.5)).run(None, {"x": x})[0]
    assert set(np.unique(both)) <= {0.0, -4.0} and abs(np.mean(both == 0) - 0.75) < 0.016
    np.testing.assert_array_equal(_session(add_mc_dropout(_two_stage_model(), p=0.0)).run(None, {"x": x})[0], -x)


def test_demo_bundle_variant():
    model = onnx.load(demo_bundle_path())
    x = np.random.default_rng(0).normal(size=(1, 1, 32, 64, 64)).astype(np.float32)
    reference = _session(model).run(["logits"], {"image": x})[0]
    np.testing.assert_array_equal(_session(add_mc_dropout(model, p=0.0)).run(["logits"], {"image": x})[0], reference)
    session = _session(add_mc_dropout(model, p=0.5))
    a, b = session.run(["logits"], {"image": x})[0], session.run(["logits"], {"image": x})[0]
    assert np.abs(a - reference).max() > 1e-2 and np.abs(a - b).max() > 1e-2
    variant = add_mc_dropout(model)
    assert [p.key for p in variant.metadata_props] == [p.key for p in model.metadata_props]  # manifest kept


def test_refusals():
    bare = _two_stage_model()
    for node in bare.graph.node:
        del node.metadata_props[:]
    with pytest.raises(EvaluationError, match="records no encoder stages"):
        add_mc_dropout(bare)
    with pytest.raises(EvaluationError, match=r"\[0, 1\)"):
        add_mc_dropout(_two_stage_model(), p=1.0)
    with pytest.raises(EvaluationError, match=r"stages \[7\]"):
        add_mc_dropout(_two_stage_model(), stages=[7])
    old_opset = _two_stage_model()
    old_opset.opset_import[0].version = 15
    with pytest.raises(EvaluationError, match=r"needs ONNX opset >= 16, but the model imports opset 15"):
        add_mc_dropout(old_opset)


def test_mc_dropout_uncertainty_matches_a_direct_computation(tmp_path):
    """Std over passes of the foreground probability, recomputed with scipy from a session with the same seeds."""
    from scipy.special import softmax

    from segsentry.evaluation.evaluate import mc_dropout_uncertainty
    from segsentry.phantoms import write_cohort
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.io import CaseInput
    from segsentry.runtime.pipeline import infer_volume
    from segsentry.runtime.preprocess import preprocess

    write_cohort(tmp_path, cohort="id", n=1, seed=31, prefix="ID", shape=(24, 96, 96))
    files = [tmp_path / "imagesTr" / "ID_000_0000.nii.gz"]
    bundle = load_bundle(demo_bundle_path())
    m = bundle.manifest
    variant = add_mc_dropout(onnx.load_from_string(bundle.model_bytes)).SerializeToString()
    with create_backend("onnxruntime", variant, channels=1, patch_size=m.patch_size) as engine:
        got = mc_dropout_uncertainty(files, bundle, engine, passes=3)
    loaded = read_case(CaseInput("c", tuple(files)), num_channels=1)
    data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
    with create_backend("onnxruntime", variant, channels=1, patch_size=m.patch_size) as engine:
        probs = [1 - softmax(infer_volume(data, engine, m).logits.astype(np.float64), axis=0)[0] for _ in range(3)]
    spread = np.std(np.stack(probs), axis=0)
    assert spread.max() > 1e-4  # the passes really differ (the mean is tiny where the net is sure of background)
    expected = float(np.mean(spread))
    assert got == pytest.approx(expected, rel=1e-4)
    with pytest.raises(EvaluationError, match="at least 2 passes"):
        mc_dropout_uncertainty(files, bundle, None, passes=1)
