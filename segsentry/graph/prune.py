"""Cut a subgraph out of a model between named tensors."""

from __future__ import annotations

from collections.abc import Sequence

import onnx
from onnx.utils import Extractor

from segsentry.graph.check import GraphError, check_model
from segsentry.graph.index import GraphIndex

__all__ = ["extract"]


def extract(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from ``inputs``, as a new checked model.

    Exactly what ``onnx.utils.Extractor(model).extract_model(inputs, outputs)`` returns (nodes in their original
    order, only the initializers and ``value_info`` they use, the model's IR version and opsets; no metadata).
    ``model`` is not modified. Every name in ``inputs`` and ``outputs`` must be a declared tensor (graph input,
    output or ``value_info``), otherwise :class:`GraphError` names the missing ones.
    """
    index = GraphIndex(model.graph)
    missing = [name for name in (*inputs, *outputs) if index.value_info(name) is None]
    if missing:
        raise GraphError(f"cannot extract a subgraph: {', '.join(map(repr, missing))} not declared in the graph "
                         f"(graph inputs {index.inputs}, outputs {index.outputs}); an intermediate tensor needs its "
                         "type in value_info: extract from segsentry.graph.infer_types(model)")
    sub = Extractor(model).extract_model(list(inputs), list(outputs))
    return check_model(sub, message=f"the subgraph {list(inputs)} -> {list(outputs)} does not validate")
