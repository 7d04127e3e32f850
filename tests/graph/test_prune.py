"""extract: the same bytes as onnx's Extractor, the expected nodes, and clear errors."""

from __future__ import annotations

import onnx
import pytest
from graphs import diamond
from onnx.utils import Extractor

from segsentry.demo import demo_bundle_path
from segsentry.graph import GraphError, extract, infer_types


def test_extract_keeps_what_the_outputs_need():
    model = diamond()
    before = model.SerializeToString()
    sub = extract(model, ["x"], ["d"])
    assert [n.name for n in sub.graph.node] == ["mm", "relu", "clip"]  # not add, not cat
    assert [i.name for i in sub.graph.initializer] == ["w"]
    assert [i.name for i in sub.graph.input] == ["x"] and [o.name for o in sub.graph.output] == ["d"]
    assert model.SerializeToString() == before  # the input is not modified
    cut = extract(model, ["a"], ["y"])  # starting inside the graph: MatMul is left out
    assert [n.name for n in cut.graph.node] == ["relu", "add", "cat"] and not cut.graph.initializer
    typed = extract(infer_types(model), ["x"], ["c"])  # c is declared only after type inference
    assert [n.name for n in typed.graph.node] == ["mm", "add"]


@pytest.mark.parametrize("inputs,outputs", [(["image"], ["logits"]), (["features"], ["distance"]),
                                            (["image"], ["distance"])])
def test_extract_equals_onnx_extractor_on_the_demo_bundle(inputs, outputs):
    model = onnx.load(demo_bundle_path())
    expected = Extractor(model).extract_model(inputs, outputs).SerializeToString()
    got = extract(model, inputs, outputs)
    assert got.SerializeToString() == expected
    assert len(got.graph.node) < len(model.graph.node)


def test_extract_refuses_unknown_names():
    with pytest.raises(GraphError, match="'nope' not declared"):
        extract(diamond(), ["x"], ["nope"])
    with pytest.raises(GraphError, match="'c' not declared.*infer_types"):
        extract(diamond(), ["x"], ["c"])
