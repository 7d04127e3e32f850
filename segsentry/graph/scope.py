"""Which part of a graph is the fused Mahalanobis head.

The head is every node named with :data:`segsentry.contract.HEAD_SCOPE` (``ood_head/``) or reading an
``ood_head/`` tensor, plus every node downstream of those (up to ``distance``): nodes a later pass adds behind
the head belong to it too, so no pass can move part of the distance computation out of it.
"""

from __future__ import annotations

import onnx

from segsentry._head_split import head_inputs, head_positions, in_head_scope
from segsentry.graph.index import GraphIndex
from segsentry.graph.names import all_names

__all__ = ["has_head", "head_boundary", "head_nodes", "head_positions", "in_head_scope"]


def has_head(graph: onnx.GraphProto) -> bool:
    """Whether any name in ``graph`` is in the head's scope (a head was folded in already)."""
    return any(in_head_scope(name) for name in all_names(graph))


def head_nodes(graph: onnx.GraphProto) -> set[int]:
    """Positions in ``graph.node`` of the head's nodes (see the module docstring); empty without a head."""
    return head_positions(graph.node)


def head_boundary(graph: onnx.GraphProto) -> tuple[list[str], list[str]]:
    """``(inputs, outputs)`` of the head: the tensors it reads from the network (not initializers), in order of
    first use, and the graph outputs it produces, in graph order. ``([], [])`` without a head."""
    index = GraphIndex(graph)
    members = head_nodes(graph)
    produced = {out for i in members for out in graph.node[i].output}
    initializers = {x for i in members for x in graph.node[i].input if index.is_initializer(x)}
    return head_inputs(graph.node, members, initializers), [name for name in index.outputs if name in produced]
