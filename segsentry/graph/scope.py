"""Which part of a graph is the fused Mahalanobis head.

The head is every node named with :data:`segsentry.contract.HEAD_SCOPE` (``ood_head/``) or reading an
``ood_head/`` tensor, plus every node downstream of those (up to ``distance``): nodes a later pass adds behind
the head belong to it too, so no pass can move part of the distance computation out of it.
"""

from __future__ import annotations

import onnx

from segsentry.contract import HEAD_SCOPE
from segsentry.graph.index import GraphIndex
from segsentry.graph.names import all_names

__all__ = ["has_head", "head_boundary", "head_nodes", "in_head_scope"]


def in_head_scope(name: str) -> bool:
    """Whether a node, tensor or initializer name belongs to the head's scope (``ood_head/...``)."""
    return name.startswith(HEAD_SCOPE)


def has_head(graph: onnx.GraphProto) -> bool:
    """Whether any name in ``graph`` is in the head's scope (a head was folded in already)."""
    return any(in_head_scope(name) for name in all_names(graph))


def head_nodes(graph: onnx.GraphProto) -> set[int]:
    """Positions in ``graph.node`` of the head's nodes (see the module docstring); empty without a head."""
    nodes = graph.node
    head = {i for i, node in enumerate(nodes)
            if in_head_scope(node.name) or any(in_head_scope(x) for x in node.input)}
    tainted = {out for i in head for out in nodes[i].output}
    for i, node in enumerate(nodes):  # topological order: one sweep reaches everything downstream
        if i not in head and any(x in tainted for x in node.input):
            head.add(i)
            tainted.update(node.output)
    return head


def head_boundary(graph: onnx.GraphProto) -> tuple[list[str], list[str]]:
    """``(inputs, outputs)`` of the head: the tensors it reads from the network (not initializers), in order of
    first use, and the graph outputs it produces, in graph order. ``([], [])`` without a head."""
    index = GraphIndex(graph)
    members = head_nodes(graph)
    produced = {out for i in members for out in graph.node[i].output}
    inputs: dict[str, None] = {}
    for i in sorted(members):
        for x in graph.node[i].input:
            if x and x not in produced and not index.is_initializer(x):
                inputs.setdefault(x)
    return list(inputs), [name for name in index.outputs if name in produced]
