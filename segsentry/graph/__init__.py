"""Graph toolkit: the plumbing every ONNX pass of segsentry shares (core layer: onnx, numpy, contract, errors).

Every pass built on it is a pure ``ModelProto -> ModelProto`` function: it copies its input, edits the copy and
checks the result (:func:`check_model`). The pieces:

* :class:`GraphIndex` -- producer and consumers of each tensor, initializers, declared types, graph inputs and
  outputs, and every name in the graph (``index.py``);
* :class:`NameAllocator` -- fresh names that collide with nothing in the graph (``names.py``);
* :func:`default_opset` / :func:`require_opset` -- the model's default-domain opset (``opset.py``);
* :func:`check_model` / :func:`infer_types` -- ``onnx.checker`` and strict type inference raising a segsentry
  error (``check.py``);
* :func:`extract` -- the subgraph between named tensors, as ``onnx.utils.Extractor`` cuts it (``prune.py``);
* :func:`head_nodes` / :func:`head_boundary` / :func:`has_head` -- which nodes make up the fused Mahalanobis
  head (everything named :data:`segsentry.contract.HEAD_SCOPE`, and downstream of it) (``scope.py``).
"""

from __future__ import annotations

from segsentry.graph.check import GraphError, check_model, infer_types
from segsentry.graph.index import GraphIndex
from segsentry.graph.names import NameAllocator, all_names
from segsentry.graph.opset import DEFAULT_DOMAINS, default_opset, require_opset
from segsentry.graph.prune import extract
from segsentry.graph.scope import has_head, head_boundary, head_nodes, in_head_scope

__all__ = [
    "DEFAULT_DOMAINS",
    "GraphError",
    "GraphIndex",
    "NameAllocator",
    "all_names",
    "check_model",
    "default_opset",
    "extract",
    "has_head",
    "head_boundary",
    "head_nodes",
    "in_head_scope",
    "infer_types",
    "require_opset",
]
