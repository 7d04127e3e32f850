"""The mixed-precision pass: FP16 network, FP32 normalisations and OOD head, checked against onnxruntime CPU.

Two oracles on onnxruntime's CPU provider, both compared with the float32 bundle on the same inputs:

* the mixed graph itself. onnxruntime has no float16 kernel for most ops on x86: it inserts casts to float32
  around them and then removes cast pairs it considers redundant, including our float32 -> float16 casts in
  front of such ops. So this run checks that the graph loads, runs and keeps its float32 boundary, and it
  reproduces the float16 *weights*, but not float16 rounding (or overflow) of activations;
* :func:`emulate_fp16_storage` of the mixed graph: every float16 tensor becomes float32 rounded through an
  explicit float16 cast pair, which onnxruntime keeps (a cast pair on float32 tensors is honoured). This is
  "float16 storage, float32 arithmetic" -- what tensor-core convolutions with float32 accumulation do -- and
  overflows to inf exactly where float16 would. It is not a GPU's arithmetic, which has not been measured.

Tolerances:

* logits and features: ``max |fp16 - fp32| <= 2e-2 * max(1, max |fp32|)`` (measured here, emulated: about
  2e-3 on the CT test bundles, 6e-4 on the shipped demo bundle);
* distances: ``rtol = 1e-2`` (measured, emulated: about 5e-4 and 4e-5).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from segsentry.contract import HEAD_SCOPE, HeadInitializer
from segsentry.errors import BackendError
from segsentry.manifest import read_manifest
from segsentry.runtime.backends.fp16 import head_node_names, mixed_fp16_bytes, to_mixed_fp16

LOGIT_RTOL = 2e-2
DISTANCE_RTOL = 1e-2
FP16_MAX = float(np.finfo(np.float16).max)
DEMO = __import__("pathlib").Path(__file__).resolve().parents[2] / "segsentry" / "models" / "demo_lung.ood.onnx"
BUNDLES = ["features_onnx", "ood_onnx", "features_kept_onnx"]


def _run(model: onnx.ModelProto, batch: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": batch})))


def _batch(model: onnx.ModelProto, n: int = 2, seed: int = 3) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).standard_normal((n, *dims)).astype(np.float32)


def assert_close_to_fp32(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], *, where: str) -> dict[str, float]:
    """Same names, shapes and float32 dtype; within the module's tolerances. Returns the relative errors."""
    assert list(got) == list(ref), where
    errors = {}
    for name, expected in ref.items():
        out = got[name]
        assert out.shape == expected.shape and out.dtype == np.float32, (where, name, out.shape, out.dtype)
        assert np.all(np.isfinite(out)), f"{where}: {name} is not finite"
        if name == "distance":
            errors[name] = float(np.max(np.abs(out - expected) / np.abs(expected)))
            np.testing.assert_allclose(out, expected, rtol=DISTANCE_RTOL, err_msg=f"{where}: {name}")
        else:
            scale = max(1.0, float(np.max(np.abs(expected))))
            errors[name] = float(np.max(np.abs(out.astype(np.float64) - expected))) / scale
            assert errors[name] <= LOGIT_RTOL, f"{where}: {name} differs by {errors[name]:.3g} of its scale"
    return errors


def emulate_fp16_storage(mixed: onnx.ModelProto) -> onnx.ModelProto:
    """An all-float32 copy of ``mixed`` in which every float16 tensor is rounded to float16 and back.

    Float16 initializers become float32 with the same (float16) values; every float16 node output is renamed
    and followed by ``Cast(float16) -> Cast(float32)``; casts to float16 become casts to float32 (the rounding
    happens at the producer). Ops then compute in float32 on float16-rounded inputs.
    """
    model = copy.deepcopy(mixed)
    graph = model.graph
    types = elem_types(mixed)
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for node in graph.node:
        rounded = [(slot, x) for slot, x in enumerate(node.output) if types.get(x) == TensorProto.FLOAT16]
        for slot, x in rounded:
            node.output[slot] = f"{x}__f32"
        if node.op_type == "Cast":
            next(a for a in node.attribute if a.name == "to").i = TensorProto.FLOAT
        nodes.append(node)
        for _, x in rounded:
            nodes += [onnx.helper.make_node("Cast", [f"{x}__f32"], [f"{x}__f16"], to=TensorProto.FLOAT16),
                      onnx.helper.make_node("Cast", [f"{x}__f16"], [x], to=TensorProto.FLOAT)]
    del graph.node[:]
    graph.node.extend(nodes)
    for value in graph.value_info:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(model)
    return model


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor, from strict onnx type inference."""
    graph = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def _float_io(node: onnx.NodeProto, types: dict[str, int]) -> list[tuple[str, int]]:
    return [(x, types[x]) for x in (*node.input, *node.output) if x and types[x] in (TensorProto.FLOAT,
                                                                                  TensorProto.FLOAT16)]


@pytest.fixture(params=BUNDLES)
def bundle_model(request, ct_pipeline) -> onnx.ModelProto:
    return onnx.load(str(getattr(ct_pipeline, request.param)))


# -- numerics against the float32 bundle -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ct", "mr"])
@pytest.mark.parametrize("bundle_attr", BUNDLES)
def test_mixed_graph_matches_fp32_on_onnxruntime(kind, bundle_attr, request):
    model = onnx.load(str(getattr(request.getfixturevalue(f"{kind}_pipeline"), bundle_attr)))
    mixed = to_mixed_fp16(model)
    batch = _batch(model, n=3)
    ref = _run(model, batch)
    assert_close_to_fp32(_run(mixed, batch), ref, where=f"{kind}/{bundle_attr}")
    assert_close_to_fp32(_run(emulate_fp16_storage(mixed), batch), ref, where=f"{kind}/{bundle_attr} emulated")


def test_shipped_demo_bundle():
    model = onnx.load(str(DEMO))
    mixed = to_mixed_fp16(model)
    batch = _batch(model, n=1)
    ref = _run(model, batch)
    assert_close_to_fp32(_run(mixed, batch), ref, where="demo")
    errors = assert_close_to_fp32(_run(emulate_fp16_storage(mixed), batch), ref, where="demo emulated")
    assert set(errors) == {"logits", "distance", "distance_tap1"}  # the shipped bundle fuses two taps


def test_fp32_head_keeps_distances_beyond_fp16_range(ct_pipeline):
    """Fails if any head node ran in FP16: the scaled head's distances exceed 65504, float16's largest value."""
    model = onnx.load(str(ct_pipeline.ood_onnx))
    for init in model.graph.initializer:
        if init.name in (HeadInitializer.COMPONENTS_T.tensor_name, HeadInitializer.SPAN_SCALE.tensor_name,
                         HeadInitializer.COMPLEMENT_SCALE.tensor_name):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(100.0), init.name))
    batch = _batch(model, n=2)
    ref = _run(model, batch)
    assert ref["distance"].min() > 10 * FP16_MAX  # not representable in float16: a converted head gives inf
    assert_close_to_fp32(_run(emulate_fp16_storage(to_mixed_fp16(model)), batch), ref, where="scaled head")


def test_emulation_rounds_like_float16():
    """The oracle itself: a float16 tensor in the emulated graph overflows and rounds as numpy's float16 does."""
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
         helper.make_node("Relu", ["h"], ["r"]),  # no float16 Relu on onnxruntime's CPU provider
         helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([1.234567e5, 0.1, -3.0], dtype=np.float32)
    with np.errstate(over="ignore"):
        expected = np.maximum(x.astype(np.float16), 0).astype(np.float32)  # [inf, 0.09998, 0]
    np.testing.assert_array_equal(ort.InferenceSession(emulate_fp16_storage(model).SerializeToString()).run(
        None, {"x": x})[0], expected)
    direct = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.isfinite(direct[0])  # why the emulation is needed: onnxruntime dropped the float16 rounding


# -- the graph's types ---------------------------------------------------------------------------------------

def test_normalisations_and_head_are_fp32_network_is_fp16(bundle_model):
    mixed = to_mixed_fp16(bundle_model)
    types = elem_types(mixed)
    head = head_node_names(mixed)
    ops = {"InstanceNormalization": 0, "Conv": 0, "ConvTranspose": 0, "head": 0}
    for node in mixed.graph.node:
        io = _float_io(node, types)
        if node.op_type == "InstanceNormalization" or set(node.output) & head:
            ops["head" if set(node.output) & head else node.op_type] += 1
            assert all(t == TensorProto.FLOAT for _, t in io), (node.name, io)
        elif node.op_type in ("Conv", "ConvTranspose"):
            ops[node.op_type] += 1
            assert all(t == TensorProto.FLOAT16 for _, t in io), (node.name, io)  # weights, bias and activations
    original = {op: sum(n.op_type == op for n in bundle_model.graph.node) for op in ops}
    assert ops["InstanceNormalization"] == original["InstanceNormalization"] > 0
    assert ops["Conv"] == original["Conv"] > 0 and ops["ConvTranspose"] == original["ConvTranspose"]
    calibrated = any(o.name == "distance" for o in bundle_model.graph.output)
    assert (ops["head"] > 0) == calibrated == ("distance" in head)
    for value in (*mixed.graph.input, *mixed.graph.output):  # the boundary stays float32, names unchanged
        assert types[value.name] == TensorProto.FLOAT, value.name
    assert [o.name for o in mixed.graph.output] == [o.name for o in bundle_model.graph.output]


def test_head_nodes_are_found_downstream_of_the_head_initializers(ct_pipeline):
    model = onnx.load(str(ct_pipeline.ood_onnx))
    head = head_node_names(model)
    assert "distance" in head and f"{HEAD_SCOPE}delta" in head
    assert "features" not in head and "logits" not in head  # the network is upstream, not part of the head
    assert all(name.startswith(HEAD_SCOPE) or name == "distance" for name in head)


def test_initializer_bytes_halve_and_head_initializers_stay_fp32(ct_pipeline):
    """Conv/ConvTranspose weights and biases become float16 (half the bytes); normalisation and head stay."""
    model = onnx.load(str(ct_pipeline.ood_onnx))
    mixed = to_mixed_fp16(model)
    before = {i.name: i for i in model.graph.initializer}
    after = {i.name: i for i in mixed.graph.initializer}
    conv = {x for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose") for x in n.input[1:]}
    kept = {x for n in model.graph.node if n.op_type == "InstanceNormalization" for x in n.input[1:]}
    head = {name for name in before if name.startswith(HEAD_SCOPE)}
    assert conv and kept and head and conv <= set(before) and kept <= set(before)
    assert all(after[name].data_type == TensorProto.FLOAT16 for name in conv)
    assert all(after[name] == before[name] for name in kept | head)  # untouched float32 (or int64 axes)

    def nbytes(inits, names):
        return sum(numpy_helper.to_array(inits[n]).nbytes for n in names)

    assert 2 * nbytes(after, conv) == nbytes(before, conv)
    assert set(after) == set(before)  # no initializer is read by FP16 and FP32 nodes alike here
    assert len(mixed.SerializeToString()) < len(model.SerializeToString())


# -- what is kept, and refusals --------------------------------------------------------------------------------

def test_metadata_kept_and_output_deterministic(bundle_model):
    mixed = to_mixed_fp16(bundle_model)
    assert [(p.key, p.value) for p in mixed.metadata_props] == [(p.key, p.value) for p in bundle_model.metadata_props]
    original = read_manifest(bundle_model.SerializeToString())
    assert read_manifest(mixed.SerializeToString(), verify_hash=False) == original
    assert mixed.opset_import == bundle_model.opset_import and mixed.ir_version == bundle_model.ir_version
    assert mixed.SerializeToString() == to_mixed_fp16(bundle_model).SerializeToString()  # engine cache keys on it
    assert bundle_model.graph.node[0].input[0] == "image"  # the input model is not modified
    assert mixed_fp16_bytes(bundle_model.SerializeToString(), extra="trt") == mixed.SerializeToString()


def test_refuses_a_graph_that_is_already_fp16(ct_pipeline):
    mixed = to_mixed_fp16(onnx.load(str(ct_pipeline.ood_onnx)))
    with pytest.raises(BackendError, match="already holds float16"):
        to_mixed_fp16(mixed)


def test_refuses_weights_beyond_fp16_range(ct_pipeline):
    model = onnx.load(str(ct_pipeline.features_onnx))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    init = next(i for i in model.graph.initializer if i.name == conv.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1e6), init.name))
    with pytest.raises(BackendError, match="beyond float16's range.*precision 'fp32'"):
        to_mixed_fp16(model)


def test_refuses_a_graph_that_fails_type_inference():
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["f", "i"], ["s"], name="clash")], "g",
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BackendError, match="^the FP16 pass cannot infer the bundle's tensor types: "):
        to_mixed_fp16(model)


def test_refuses_control_flow():
    from onnx import helper

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], name="choose", then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BackendError, match="does not support control flow \\(If node 'choose'\\)"):
        to_mixed_fp16(model)


def test_shared_initializer_gets_an_fp16_copy():
    """An initializer read by an FP16 node and an FP32 node: FP32 original kept, float16 copy added."""
    from onnx import helper

    w = numpy_helper.from_array(np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8), "w")
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),  # FP16
         helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm"),  # FP16
         helper.make_node("ReduceSumSquare", ["w"], ["s"], name="rss", keepdims=0)],  # FP32
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    mixed = to_mixed_fp16(copy.deepcopy(model))
    inits = {i.name: i.data_type for i in mixed.graph.initializer}
    assert inits == {"w": TensorProto.FLOAT, "w__fp16": TensorProto.FLOAT16}
    types = elem_types(mixed)
    assert [types[x] for x in ("x", "y", "s")] == [TensorProto.FLOAT] * 3
    x = np.linspace(-3, 3, 16, dtype=np.float32).reshape(2, 8)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    got = ort.InferenceSession(mixed.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(got[0], ref[0], rtol=2e-3)
    assert got[1] == ref[1]  # the FP32 branch reads the untouched float32 initializer
