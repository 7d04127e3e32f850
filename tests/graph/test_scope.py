"""The head's extent: scoped nodes, nodes reading scoped tensors, and everything downstream."""

from __future__ import annotations

import onnx
from graphs import diamond, with_head

from segsentry.contract import HEAD_SCOPE
from segsentry.demo import demo_bundle_path
from segsentry.graph import has_head, head_boundary, head_nodes, in_head_scope


def test_head_nodes_include_downstream_unscoped_nodes():
    graph = with_head().graph
    assert {graph.node[i].name for i in head_nodes(graph)} == {"ood_head/delta_Sub", "ood_head/distance_RSS", "after"}
    assert head_boundary(graph) == (["features"], ["distance", "negated"])
    assert has_head(graph)


def test_a_node_reading_a_head_initializer_is_in_the_head():
    model = with_head()
    model.graph.node[2].name = "renamed"  # no scoped name left on the Sub; it still reads ood_head/mean
    assert 2 in head_nodes(model.graph)


def test_no_head():
    graph = diamond().graph
    assert head_nodes(graph) == set() and head_boundary(graph) == ([], []) and not has_head(graph)
    assert in_head_scope(HEAD_SCOPE + "mean") and not in_head_scope("network.ood_head")


def test_demo_bundle_head():
    graph = onnx.load(demo_bundle_path()).graph
    members = head_nodes(graph)
    assert members and all(graph.node[i].name.startswith(HEAD_SCOPE) for i in members)
    # two fused taps: each reads its own features tensor and gives its own distance
    assert head_boundary(graph) == (["features", "tap1/features"], ["distance", "distance_tap1"])
