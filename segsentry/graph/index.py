"""A read-only index of one ONNX graph: who produces and who reads each tensor, and what each name is."""

from __future__ import annotations

import onnx

from segsentry.graph.names import all_names

__all__ = ["GraphIndex"]


class GraphIndex:
    """Lookups over ``graph`` as it is when the index is built (a snapshot: rebuild it after editing the graph).

    Nodes are referred to by their position in ``graph.node`` (topological order, as ``onnx.checker`` requires),
    tensors by name. The empty name (an omitted optional input or output) is never indexed.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self._producer: dict[str, int] = {}
        self._consumers: dict[str, list[int]] = {}
        for i, node in enumerate(graph.node):
            for name in node.output:
                if name:
                    self._producer[name] = i
            for name in dict.fromkeys(node.input):  # a node reading a tensor twice is one consumer
                if name:
                    self._consumers.setdefault(name, []).append(i)
        self._initializers = {init.name: init for init in graph.initializer}
        self._values: dict[str, onnx.ValueInfoProto] = {}
        for value in (*graph.input, *graph.value_info, *graph.output):  # a graph output's declaration wins
            self._values[value.name] = value
        self.inputs: list[str] = [i.name for i in graph.input if i.name not in self._initializers]
        """Names of the graph inputs that are not initializers (what a caller feeds), in graph order."""
        self.outputs: list[str] = [o.name for o in graph.output]
        """Names of the graph outputs, in graph order."""

    def producer(self, name: str) -> int | None:
        """Position of the node that outputs tensor ``name``; ``None`` for graph inputs and initializers."""
        return self._producer.get(name)

    def consumers(self, name: str) -> list[int]:
        """Positions of the nodes that read tensor ``name``, in graph order, each once (graph outputs not included)."""
        return list(self._consumers.get(name, ()))

    def initializer(self, name: str) -> onnx.TensorProto | None:
        """The initializer called ``name``, or ``None``."""
        return self._initializers.get(name)

    def is_initializer(self, name: str) -> bool:
        return name in self._initializers

    def value_info(self, name: str) -> onnx.ValueInfoProto | None:
        """The declared type of ``name``: its graph output, ``value_info`` or graph input entry (in that precedence)."""
        return self._values.get(name)

    def elem_type(self, name: str) -> int | None:
        """``onnx.TensorProto`` element type of tensor ``name``: an initializer's data type, else its declared
        type; ``None`` where the graph declares none (run :func:`segsentry.graph.infer_types` first for all)."""
        init = self._initializers.get(name)
        if init is not None:
            return int(init.data_type)
        value = self._values.get(name)
        if value is None or not value.type.HasField("tensor_type"):
            return None
        return int(value.type.tensor_type.elem_type)

    def elem_types(self) -> dict[str, int]:
        """:meth:`elem_type` of every declared tensor and initializer, by name."""
        types = {name: int(v.type.tensor_type.elem_type) for name, v in self._values.items()
                 if v.type.HasField("tensor_type")}
        types.update({name: int(init.data_type) for name, init in self._initializers.items()})
        return types

    def names(self) -> set[str]:
        """Every name used in the graph (see :func:`segsentry.graph.all_names`)."""
        return all_names(self.graph)
