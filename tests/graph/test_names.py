"""all_names and NameAllocator: fresh names never collide with the graph or with each other."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import diamond
from onnx import numpy_helper

from segsentry.graph import NameAllocator, all_names


def test_all_names_covers_every_kind_of_name():
    model = diamond()
    sparse = model.graph.sparse_initializer.add()
    sparse.values.CopyFrom(numpy_helper.from_array(np.ones(1, dtype=np.float32), "sparse_w"))
    sparse.indices.CopyFrom(numpy_helper.from_array(np.zeros(1, dtype=np.int64), "sparse_w_idx"))
    sparse.dims.append(3)
    model.graph.value_info.add().name = "declared_only"
    names = all_names(model.graph)
    assert {"x", "w", "a", "y", "d", "mm", "clip", "sparse_w", "declared_only"} <= names
    assert "" not in names  # Clip's omitted optional inputs


def test_fresh_names_skip_taken_ones_and_never_repeat():
    graph = diamond().graph
    for base in ("t", "t_1", "t_3"):
        graph.node.add(op_type="Identity", name=base)
    names = NameAllocator.for_graph(graph)
    assert [names.fresh("t") for _ in range(3)] == ["t_2", "t_4", "t_5"]
    assert names.fresh("a") == "a_1" and names.fresh("relu") == "relu_1"  # tensors and node names alike
    assert names.fresh("new") == "new" and "new" in names
    many = [names.fresh(base) for _ in range(50) for base in ("a", "y", "new")]
    assert len(set(many)) == len(many) and not set(many) & all_names(graph)


def test_fresh_is_deterministic_and_refuses_an_empty_base():
    first = NameAllocator(["x"])
    second = NameAllocator(["x"])
    assert [first.fresh("x") for _ in range(3)] == [second.fresh("x") for _ in range(3)] == ["x_1", "x_2", "x_3"]
    with pytest.raises(ValueError, match="non-empty"):
        first.fresh("")
