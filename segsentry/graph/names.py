"""Names in an ONNX graph: all of them, and fresh ones that collide with none."""

from __future__ import annotations

from collections.abc import Iterable

import onnx

__all__ = ["NameAllocator", "all_names"]


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every non-empty name ``graph`` uses: inputs, outputs, initializers (dense and sparse), ``value_info``
    entries, node inputs and outputs, and node names. (Tensor and node names share one set here: a fresh name
    avoids both, so a new node's name never shadows a tensor in a reader's view.)"""
    names: set[str] = set()
    names.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    names.update(i.name for i in graph.initializer)
    names.update(i.values.name for i in graph.sparse_initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    names.discard("")
    return names


class NameAllocator:
    """Hands out names that are not in ``taken`` nor handed out before.

    ``fresh("x__fp16")`` returns ``x__fp16`` if free, else ``x__fp16_1``, ``x__fp16_2``, ... (the first free one).
    Deterministic: the same graph and the same sequence of requests give the same names.
    """

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken = set(taken)

    @classmethod
    def for_graph(cls, graph: onnx.GraphProto) -> NameAllocator:
        """An allocator that avoids every name of ``graph`` (:func:`all_names`)."""
        return cls(all_names(graph))

    def __contains__(self, name: object) -> bool:
        return name in self._taken

    def fresh(self, base: str) -> str:
        """``base``, or ``base_K`` with the smallest ``K >= 1`` that is free; the name is then taken."""
        if not base:
            raise ValueError("a fresh name needs a non-empty base")
        name, k = base, 1
        while name in self._taken:
            name, k = f"{base}_{k}", k + 1
        self._taken.add(name)
        return name
