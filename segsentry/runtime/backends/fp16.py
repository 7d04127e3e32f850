"""Mixed-precision graph pass: a float32 bundle -> FP16 network with an FP32 Mahalanobis head.

``to_mixed_fp16(model)`` is a pure ``ModelProto -> ModelProto`` pass (like the export passes), written for the
graphs segsentry exports: ``Conv``/``ConvTranspose``/``LeakyRelu``/``Concat``/``Reshape``/pooling in FP16,
every normalisation layer (``InstanceNormalization`` & co.) and the whole Mahalanobis head in FP32::

    image (f32) -> Cast f16 -> Conv (f16 weights) -> Cast f32 -> InstanceNormalization (f32) -> Cast f16 -> LeakyRelu ...
    ... -> Conv (f16) -> logits__fp16 -> Cast f32 -> logits (f32)
    ... -> Reshape (f16) -> features -> Cast f32 -> Sub(ood_head/mean) -> MatMul -> ReduceSumSquare ... -> distance (f32)

The *head* is every node named ``ood_head/...`` or reading an ``ood_head/`` initializer, plus everything
downstream of those nodes (up to ``distance``): :func:`segsentry.graph.head_nodes`. Squared distances easily exceed FP16's largest value (65504),
so they must never touch FP16; the explicit ``Cast`` nodes make that a property of the graph, which a strongly
typed TensorRT network (and any other runtime) must obey. Op types outside :data:`FP16_OPS` also stay FP32.
Graph inputs and outputs stay float32. Float initializers read by FP16 nodes are stored as float16 (an FP16
copy is added when FP32 nodes read the same initializer). ``metadata_props`` (the manifest) are copied
unchanged; the manifest's ``weights_sha256`` describes the float32 graph, so the result is a derived,
in-memory artifact (``read_manifest(..., verify_hash=False)`` still reads it) -- never write it as a bundle.

Why not onnxconverter-common's ``float16.convert_float_to_float16(keep_io_types=True, node_block_list=...)``:
tried (1.16.0) on ``segsentry/models/demo_lung.ood.onnx``, it retyped the ``distance`` graph output to float16
(overflow above 65504) and round-tripped the head's ``ood_head/delta`` through float16 between blocked nodes.

The graph plumbing (producer/consumer index, fresh names, type inference, checker) is :mod:`segsentry.graph`,
imported inside the functions: ``import segsentry.runtime`` needs no onnx.

Run on this machine (no GPU): the pass itself, checked with onnx's type inference and against onnxruntime CPU
on the test bundles and the shipped demo bundle (``tests/runtime/test_fp16.py``). How fast the FP16 graph is on
a GPU, and TensorRT's numerics for it, have not been measured here.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np

from segsentry.errors import BackendError
from segsentry.runtime.backends.base import import_optional

log = logging.getLogger(__name__)

PURPOSE = "The FP16 graph pass"

FLOAT = 1  # onnx.TensorProto.FLOAT
FLOAT16 = 10  # onnx.TensorProto.FLOAT16

#: Op types that run in FP16: one float type ``T`` for every float input and output, no dtype or tensor
#: attribute. Everything else (normalisations, reductions, Cast, Constant, Resize, ...) stays FP32.
FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm",
    "Relu", "LeakyRelu", "PRelu", "Elu", "Sigmoid", "Tanh", "Softmax",
    "Add", "Sub", "Mul", "Div",
    "Concat", "Split", "Slice", "Pad", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
    "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool",
})

FP16_MAX = float(np.finfo(np.float16).max)


def head_node_names(model: Any) -> set[str]:
    """Output names of the Mahalanobis head's nodes (see the module docstring), for tests and logging."""
    from segsentry.graph import head_nodes  # an onnx model is given: onnx is installed

    nodes = model.graph.node
    return {out for i in head_nodes(model.graph) for out in nodes[i].output}


def _refuse_unsupported(model: Any, types: dict[str, int]) -> None:
    if any(t == FLOAT16 for t in types.values()):
        raise BackendError("the FP16 pass expects a float32 bundle, but the graph already holds float16 tensors; "
                           "pass the original float32 bundle")
    for node in model.graph.node:
        if any(attr.type in (5, 10) for attr in node.attribute):  # GRAPH, GRAPHS: If / Loop / Scan bodies
            raise BackendError(f"the FP16 pass does not support control flow ({node.op_type} node {node.name!r})")


def _fp16_tensor(numpy_helper: Any, init: Any, name: str) -> Any:
    values = numpy_helper.to_array(init)
    if np.any(np.abs(values[np.isfinite(values)]) > FP16_MAX):
        raise BackendError(f"initializer {init.name!r} holds values beyond float16's range (±{FP16_MAX:.0f}); "
                           "it cannot run in FP16: use precision 'fp32'")
    return numpy_helper.from_array(values.astype(np.float16), name=name)


def to_mixed_fp16(model: Any) -> Any:
    """Return a copy of the float32 ``model`` converted to FP16, with normalisations and OOD head in FP32.

    Args:
        model: an ``onnx.ModelProto`` with float32 inputs and outputs (a segsentry bundle, calibrated or not).
            It is not modified.

    Returns:
        A new ``onnx.ModelProto`` that passes ``onnx.checker`` and strict type inference: same inputs and outputs
        (names, float32, shapes), same ``metadata_props``, opset and IR version. Deterministic: the same input
        gives byte-identical output (TensorRT engine caches key on its hash).

    Raises:
        BackendError: the model fails onnx type inference, holds float16 already, uses control flow (If, Loop,
            Scan), or a float initializer read by an FP16 node exceeds float16's range.
    """
    import_optional("onnx", package="onnx", extra="export", purpose=PURPOSE)
    numpy_helper = import_optional("onnx.numpy_helper", package="onnx", extra="export", purpose=PURPOSE)
    helper = import_optional("onnx.helper", package="onnx", extra="export", purpose=PURPOSE)
    from segsentry.graph import GraphIndex, NameAllocator, check_model, head_nodes, infer_types

    inferred = infer_types(model, message="the FP16 pass cannot infer the bundle's tensor types", error=BackendError)
    types = GraphIndex(inferred.graph).elem_types()
    _refuse_unsupported(model, types)
    out = copy.deepcopy(model)
    graph = out.graph
    index = GraphIndex(graph)
    fresh = NameAllocator.for_graph(graph).fresh
    nodes = list(graph.node)
    head = head_nodes(graph)
    fp16_nodes = {i for i, node in enumerate(nodes) if i not in head and node.op_type in FP16_OPS}

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == FLOAT

    # Initializers: float16 where only FP16 nodes read them; an extra float16 copy where both kinds do.
    readers = {init.name: {i in fp16_nodes for i in index.consumers(init.name)}
               for init in graph.initializer if is_float(init.name)}
    name16: dict[str, str] = {}  # tensor -> its float16 version
    name32: dict[str, str] = {}  # tensor -> its float32 version
    copies = []
    for init in graph.initializer:
        kinds = readers.get(init.name)
        if kinds == {True}:
            init.CopyFrom(_fp16_tensor(numpy_helper, init, init.name))
            name16[init.name] = init.name
        elif kinds:
            name32[init.name] = init.name
            if True in kinds:
                name16[init.name] = fresh(f"{init.name}__fp16")
                copies.append(_fp16_tensor(numpy_helper, init, name16[init.name]))
    graph.initializer.extend(copies)

    # Activations: an FP16 node's float outputs are float16; a float16 graph output is renamed inside the
    # graph and cast back to float32 under its own name right after its producer.
    graph_outputs = set(index.outputs)
    for x in (i.name for i in graph.input):
        if is_float(x):
            name32[x] = x
    renamed_outputs: dict[str, str] = {}
    for i, node in enumerate(nodes):
        for x in node.output:
            if not is_float(x):
                continue
            if i in fp16_nodes:
                name16[x] = x
                if x in graph_outputs:
                    name16[x] = renamed_outputs[x] = fresh(f"{x}__fp16")
                    name32[x] = x
            else:
                name32[x] = x

    output_of = {inner: outer for outer, inner in renamed_outputs.items()}
    new_nodes: list[Any] = []

    def cast(x: str, to: int) -> str:
        """The float16/float32 version of tensor ``x``, adding a Cast node at the first use."""
        versions, suffix = (name16, "fp16") if to == FLOAT16 else (name32, "fp32")
        if x not in versions:
            source = name32[x] if to == FLOAT16 else name16[x]
            versions[x] = fresh(f"{x}__{suffix}")
            new_nodes.append(helper.make_node("Cast", [source], [versions[x]], name=fresh(f"{x}__to_{suffix}"),
                                              to=to))
        return versions[x]

    for i, node in enumerate(nodes):
        to = FLOAT16 if i in fp16_nodes else FLOAT
        for slot, x in enumerate(node.input):
            if is_float(x):
                node.input[slot] = cast(x, to)
        for slot, x in enumerate(node.output):
            if x in renamed_outputs:
                node.output[slot] = renamed_outputs[x]
        new_nodes.append(node)
        for x in node.output:
            if x in output_of:
                original = output_of[x]
                new_nodes.append(helper.make_node("Cast", [x], [original], name=fresh(f"{original}__to_fp32"),
                                                  to=FLOAT))
    del graph.node[:]
    graph.node.extend(new_nodes)

    for value in graph.value_info:  # keep the exporter's type annotations (activations and weights) true
        if name16.get(value.name) == value.name:
            value.type.tensor_type.elem_type = FLOAT16

    check_model(out, types=True, message="the FP16 pass produced an invalid graph", error=BackendError)
    log.debug("FP16 pass: %d of %d nodes in FP16, %d head nodes in FP32, %d casts added", len(fp16_nodes),
              len(nodes), len(head), len(new_nodes) - len(nodes))
    return out


def mixed_fp16_bytes(model: bytes, *, extra: str) -> bytes:
    """:func:`to_mixed_fp16` on serialized bundle bytes; ``extra`` is the pip extra named if onnx is missing."""
    onnx = import_optional("onnx", package="onnx", extra=extra, purpose="FP16 inference")
    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:  # onnx raises DecodeError/ValueError
        raise BackendError(f"not a valid ONNX model ({exc})") from exc
    return to_mixed_fp16(proto).SerializeToString()


__all__ = ["FP16_OPS", "head_node_names", "mixed_fp16_bytes", "to_mixed_fp16"]
