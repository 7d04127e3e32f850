"""A bundle cut where its fused head reads the network, on the protobuf wire, without the onnx package.

Why on the wire: the runtime imports no onnx, and a full parse of a bundle holds its weights a second time. On
the 124 MB fullres bundle, cutting it with ``onnx`` (parse, type inference, two extracted models) left the
engine's peak 90-220 MB higher after the build (Zen 5, ``benchmarks/engine_floor.py``). Here each kept field is
copied once, as bytes, into the two new models; the weights are never decoded.

Which nodes are the head is decided in one place, :func:`head_positions`, which :mod:`segsentry.graph.scope` uses
as well. The head is every node named in :data:`segsentry.contract.HEAD_SCOPE` or reading such a tensor, plus
every node downstream of those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from segsentry import _onnx_wire
from segsentry.contract import HEAD_SCOPE

# ModelProto / GraphProto / NodeProto / TensorProto / ValueInfoProto field numbers (onnx.proto3)
_MODEL_GRAPH, _MODEL_METADATA = 7, 14
_GRAPH_NODE, _GRAPH_NAME, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO = 1, 2, 5, 11, 12, 13
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE = 1, 2, 3, 4
_TENSOR_NAME = 8
_VALUE_INFO_NAME = 1
_SUBGRAPH_OPS = {"If", "Loop", "Scan"}  # nodes whose attributes hold graphs reading outer tensors


class NodeLike(Protocol):
    """What :func:`head_positions` reads of a node (an ``onnx.NodeProto`` has it)."""

    name: str
    input: Sequence[str]
    output: Sequence[str]


def in_head_scope(name: str) -> bool:
    """Whether a node, tensor or initializer name belongs to the head's scope (``ood_head/...``)."""
    return name.startswith(HEAD_SCOPE)


def head_positions(nodes: Sequence[NodeLike]) -> set[int]:
    """Positions of the head's nodes among ``nodes`` (in topological order); empty without a head."""
    head = {i for i, node in enumerate(nodes)
            if in_head_scope(node.name) or any(in_head_scope(x) for x in node.input)}
    tainted = {out for i in head for out in nodes[i].output}
    for i, node in enumerate(nodes):  # topological order: one sweep reaches everything downstream
        if i not in head and any(x in tainted for x in node.input):
            head.add(i)
            tainted.update(node.output)
    return head


def head_inputs(nodes: Sequence[NodeLike], head: set[int], initializers: set[str] | object) -> list[str]:
    """The tensors the ``head`` nodes read from outside the head, not initializers (anything supporting ``in``),
    in order of first use."""
    produced = {out for i in head for out in nodes[i].output}
    return list(dict.fromkeys(x for i in sorted(head) for x in nodes[i].input
                              if x and x not in produced and x not in initializers))


@dataclass(frozen=True)
class _Node:
    name: str
    op_type: str
    input: list[str]
    output: list[str]


@dataclass(frozen=True)
class HeadSplit:
    """Two serialized models: ``network`` computes every graph output outside the head plus the ``boundary``
    tensors the head reads (the pooled features, in order of first use); ``head`` computes ``head_outputs``
    (``distance``, per-tap distances, in graph order) from the boundary tensors as its inputs."""

    network: bytes
    head: bytes
    boundary: list[str]
    head_outputs: list[str]


def _text(value: memoryview | int) -> str:
    return bytes(value).decode("utf-8")  # type: ignore[arg-type]


def _strings(message: memoryview | int, number: int) -> list[str]:
    return [_text(v) for n, w, v in _onnx_wire.iter_fields(message) if n == number and w == 2]  # type: ignore[arg-type]


def _name(message: memoryview | int, number: int) -> str:
    return next(iter(_strings(message, number)), "")


def split_at_head(model: bytes) -> HeadSplit | None:
    """``model`` cut at its head's boundary (see :class:`HeadSplit`), or ``None`` where it cannot be cut as it
    is: no head, a head that reads a graph input directly or has control-flow nodes, or a boundary tensor with
    no declared type (``value_info``). Both models keep the bundle's IR version and opsets and drop its
    metadata; each keeps only the initializers its own nodes read. Raises ``ValueError`` on bytes that are not
    a protobuf message.
    """
    graph = _onnx_wire.graph_bytes(model)
    fields = list(_onnx_wire.iter_spans(graph))
    nodes = [_Node(_name(v, _NODE_NAME), _name(v, _NODE_OP_TYPE), _strings(v, _NODE_INPUT), _strings(v, _NODE_OUTPUT))
             for n, _, v, _ in fields if n == _GRAPH_NODE]
    head = head_positions(nodes)
    if not head or any(nodes[i].op_type in _SUBGRAPH_OPS for i in head):
        return None
    initializers = {_name(v, _TENSOR_NAME) for n, _, v, _ in fields if n == _GRAPH_INITIALIZER}
    inputs = {_name(v, _VALUE_INFO_NAME) for n, _, v, _ in fields if n == _GRAPH_INPUT}
    produced = {out for i in head for out in nodes[i].output}
    boundary = head_inputs(nodes, head, initializers)
    if any(x in inputs for x in boundary):
        return None
    declared = {}  # name -> its ValueInfoProto bytes (graph outputs and value_info)
    for n, _, v, _ in fields:
        if n in (_GRAPH_OUTPUT, _GRAPH_VALUE_INFO):
            declared.setdefault(_name(v, _VALUE_INFO_NAME), v)
    if any(x not in declared for x in boundary):
        return None
    read_by_head = {x for i in head for x in nodes[i].input}
    read_by_network = {x for i, node in enumerate(nodes) if i not in head for x in node.input}
    outputs = [_name(v, _VALUE_INFO_NAME) for n, _, v, _ in fields if n == _GRAPH_OUTPUT]
    head_outputs = [name for name in outputs if name in produced]

    network_graph: list[memoryview | bytes] = []  # the kept fields, as views into ``model`` (copied once, below)
    head_graph: list[memoryview | bytes] = []
    position = 0
    for n, _, v, raw in fields:
        if n == _GRAPH_NODE:
            (head_graph if position in head else network_graph).append(raw)
            position += 1
        elif n == _GRAPH_INITIALIZER:
            name = _name(v, _TENSOR_NAME)
            if name in read_by_network or name in inputs:
                network_graph.append(raw)
            if name in read_by_head:
                head_graph.append(raw)
        elif n in (_GRAPH_OUTPUT, _GRAPH_VALUE_INFO):
            (head_graph if _name(v, _VALUE_INFO_NAME) in produced else network_graph).append(raw)
        elif n == _GRAPH_NAME:
            network_graph.append(raw)
            head_graph.append(raw)
        else:
            network_graph.append(raw)  # graph inputs, sparse initializers, doc string: the network's
    for name in boundary:
        network_graph.append(_onnx_wire.encode_len_field(_GRAPH_OUTPUT, declared[name]))
        head_graph.append(_onnx_wire.encode_len_field(_GRAPH_INPUT, declared[name]))
    return HeadSplit(network=_model(model, network_graph), head=_model(model, head_graph), boundary=boundary,
                     head_outputs=head_outputs)


def _model(model: bytes, graph: list[memoryview | bytes]) -> bytes:
    """``model``'s fields (IR version, opsets, producer) around a graph made of ``graph``'s encoded fields,
    without its metadata; the bytes are copied once."""
    parts: list[memoryview | bytes] = []
    for n, _, _, raw in _onnx_wire.iter_spans(model):
        if n == _MODEL_GRAPH:
            parts.append(_onnx_wire.encode_varint(_MODEL_GRAPH << 3 | 2))
            parts.append(_onnx_wire.encode_varint(sum(len(p) for p in graph)))
            parts.extend(graph)
        elif n != _MODEL_METADATA:
            parts.append(raw)
    return b"".join(parts)
