"""GraphIndex against the hand-built graph's known answers and a brute-force scan of the shipped demo bundle."""

from __future__ import annotations

import onnx
from graphs import diamond
from onnx import TensorProto

from segsentry.demo import demo_bundle_path
from segsentry.graph import GraphIndex, infer_types


def test_producers_and_consumers_of_a_small_graph():
    index = GraphIndex(diamond().graph)
    assert [index.producer(t) for t in ("a", "b", "c", "y", "d")] == [0, 1, 2, 3, 4]
    assert index.producer("x") is None and index.producer("w") is None and index.producer("nope") is None
    assert index.consumers("x") == [0] and index.consumers("w") == [0]
    assert index.consumers("a") == [1, 2]  # Add(a, a) reads it twice: one consumer
    assert index.consumers("b") == [3, 4]
    assert index.consumers("y") == [] and index.consumers("") == []  # graph outputs and omitted inputs


def test_inputs_outputs_initializers_and_types():
    index = GraphIndex(diamond().graph)
    assert index.inputs == ["x"]  # w is listed as a graph input but is an initializer
    assert index.outputs == ["y", "d"]
    assert index.is_initializer("w") and not index.is_initializer("x")
    assert index.initializer("w").dims == [3, 4] and index.initializer("a") is None
    assert index.elem_type("a") == TensorProto.FLOAT
    assert index.elem_type("y") == TensorProto.FLOAT  # the graph output's declaration wins over value_info
    assert index.elem_type("b") is None  # not declared before type inference
    assert index.value_info("y").type.tensor_type.shape.dim[1].dim_value == 8
    assert index.elem_types() == {"x": TensorProto.FLOAT, "w": TensorProto.FLOAT, "a": TensorProto.FLOAT,
                                  "y": TensorProto.FLOAT, "d": TensorProto.FLOAT}
    inferred = GraphIndex(infer_types(diamond()).graph)
    assert {t: inferred.elem_type(t) for t in ("b", "c")} == {"b": TensorProto.FLOAT, "c": TensorProto.FLOAT}


def test_names():
    assert GraphIndex(diamond().graph).names() == {"x", "w", "a", "b", "c", "y", "d",
                                                    "mm", "relu", "add", "cat", "clip"}


def test_index_matches_a_brute_force_scan_of_the_demo_bundle():
    graph = onnx.load(demo_bundle_path()).graph
    index = GraphIndex(graph)
    tensors = {t for node in graph.node for t in (*node.input, *node.output) if t}
    assert len(tensors) > 100
    for t in tensors:
        producers = [i for i, node in enumerate(graph.node) if t in node.output]
        assert index.producer(t) == (producers[0] if producers else None), t
        assert index.consumers(t) == [i for i, node in enumerate(graph.node) if t in node.input], t
    assert index.inputs == ["image"] and index.outputs == ["logits", "distance", "distance_tap1"]
