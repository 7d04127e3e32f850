"""Small hand-built graphs shared by the graph-toolkit tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def diamond() -> onnx.ModelProto:
    """x [2, 3] @ w [3, 4] -> a; b = Relu(a); c = Add(a, a); y = Concat(b, c); d = Clip(b) (empty optional inputs).

    ``w`` is an initializer also listed as a graph input (the IR < 4 style); ``a`` has a float32 ``value_info``;
    ``y`` is declared float16 in ``value_info`` but float32 as a graph output (the output wins).
    """
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Add", ["a", "a"], ["c"], name="add"),
        helper.make_node("Concat", ["b", "c"], ["y"], name="cat", axis=1),
        helper.make_node("Clip", ["b", "", ""], ["d"], name="clip"),
    ]
    graph = helper.make_graph(
        nodes, "diamond",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 4])],
        [w],
        value_info=[helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4]),
                    helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def with_head() -> onnx.ModelProto:
    """x -> Relu -> features -> ood_head/Sub(mean) -> ReduceSumSquare -> distance -> Neg -> negated (unscoped).

    ``logits`` = Identity(x) is a second network output that the head never touches.
    """
    mean = numpy_helper.from_array(np.ones(4, dtype=np.float32), "ood_head/mean")
    nodes = [
        helper.make_node("Relu", ["x"], ["features"], name="feat"),
        helper.make_node("Identity", ["x"], ["logits"], name="logits_id"),
        helper.make_node("Sub", ["features", "ood_head/mean"], ["ood_head/delta"], name="ood_head/delta_Sub"),
        helper.make_node("ReduceSumSquare", ["ood_head/delta"], ["distance"], name="ood_head/distance_RSS",
                         axes=[1], keepdims=0),
        helper.make_node("Neg", ["distance"], ["negated"], name="after"),
    ]
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("distance", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("negated", TensorProto.FLOAT, ["batch"])],
        [mean],
        value_info=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
