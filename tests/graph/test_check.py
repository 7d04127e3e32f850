"""check_model / infer_types raise a segsentry error (the caller's class) on a broken graph."""

from __future__ import annotations

import onnx
import pytest
from graphs import diamond
from onnx import TensorProto, helper

from segsentry.errors import BackendError, SegsentryError
from segsentry.graph import GraphError, GraphIndex, check_model, infer_types


def _dangling() -> onnx.ModelProto:
    model = diamond()
    model.graph.node[1].input[0] = "undefined"  # Relu reads a tensor nobody produces
    return model


def _type_clash() -> onnx.ModelProto:
    """Structurally valid, but Add(float, int64): only type inference notices."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["f", "i"], ["s"])], "clash",
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_valid_graph_passes_and_is_returned():
    model = diamond()
    assert check_model(model, types=True) is model


def test_broken_graph_raises_a_segsentry_error():
    with pytest.raises(GraphError, match="the ONNX graph does not validate: .*undefined") as info:
        check_model(_dangling())
    assert isinstance(info.value, SegsentryError)
    with pytest.raises(BackendError, match="^the FP16 pass produced an invalid graph: "):
        check_model(_dangling(), message="the FP16 pass produced an invalid graph", error=BackendError)


def test_types_flag_runs_strict_type_inference():
    check_model(_type_clash())  # the checker alone accepts it
    with pytest.raises(GraphError, match="does not validate"):
        check_model(_type_clash(), types=True)
    with pytest.raises(BackendError, match="^cannot infer the bundle's types: "):
        infer_types(_type_clash(), message="cannot infer the bundle's types", error=BackendError)


def test_infer_types_returns_a_typed_copy():
    model = diamond()
    before = model.SerializeToString()
    inferred = infer_types(model)
    assert model.SerializeToString() == before
    assert GraphIndex(inferred.graph).elem_type("c") == TensorProto.FLOAT
