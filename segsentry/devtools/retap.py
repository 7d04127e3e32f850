"""A features bundle tapped at another layer of its network, without the network's torch source.

``ood-export --layer`` taps a layer of a PyTorch network. A shipped bundle whose training folder is gone (the
embedded demo's) can still be tapped elsewhere: torch's ONNX exporter records each node's module scope
(``pkg.torch.onnx.name_scopes``), so the output of module ``decoder.stages.2`` is the output of the last node,
in graph order, inside that scope. :func:`retap` pools that tensor with the same plan ``ood-export`` computes
(:func:`segsentry.export.pooling.pooling_plan`, ``AveragePool`` with stride = kernel), flattens it per sample,
stacks the folds of an ensemble as the exporter does, and seals the manifest's new :class:`FeatureSpec`. The
network and its ``logits`` are untouched; the old tap's pooling is pruned. The features equal those of
``ood-export --layer`` on the same checkpoint (``tests/devtools/test_retap.py``).
"""

from __future__ import annotations

import ast

import numpy as np
import onnx
from onnx import helper, numpy_helper

from segsentry.contract import Output

__all__ = ["retap"]

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            return list(ast.literal_eval(prop.value))
    return []


def _layer_outputs(graph: onnx.GraphProto, scopes: list[str]) -> list[str]:
    """For each of ``scopes``, the output of the last node (graph order) whose recorded module scopes include it;
    one pass over the graph's metadata."""
    last: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for scope in set(_scopes(node)).intersection(scopes):
            last[scope] = node
    outputs = []
    for scope in scopes:
        if scope not in last:
            raise ValueError(f"no node of the graph records the module scope '{scope}' (torch's exporter writes "
                             f"{SCOPES_KEY}; give the layer as a canonical dotted path, e.g. decoder.stages.2)")
        if len(last[scope].output) != 1:
            raise ValueError(f"module '{scope}' ends in a node with {len(last[scope].output)} outputs; expected one "
                             "tensor")
        outputs.append(last[scope].output[0])
    return outputs


def retap(features_bundle: bytes, layer: str) -> bytes:
    """The features bundle ``features_bundle`` (from ``ood-export``, no calibration) tapped at ``layer``.

    ``layer`` is a canonical dotted module path of the exported network (``decoder.stages.2``, no negative
    indices). Raises ``ValueError`` for a calibrated or quantised bundle, a graph without module scopes, or a layer
    that does not output one 5D tensor.
    """
    from segsentry.export.pooling import pooling_plan
    from segsentry.graph import GraphIndex, NameAllocator, extract, infer_types
    from segsentry.manifest import FeatureSpec, read_manifest, write_manifest

    manifest = read_manifest(features_bundle)
    if manifest.calibration is not None or manifest.quantization is not None:
        raise ValueError("retap a features bundle (ood-export's output, before ood-calib or quantisation)")
    model = onnx.load_model_from_string(features_bundle)
    graph = model.graph
    features = manifest.output_name(Output.FEATURES)
    logits = manifest.output_name(Output.LOGITS)
    n_folds = manifest.n_folds
    prefixes = [f"taps.{i}.network." for i in range(n_folds)] if n_folds > 1 else ["network."]
    taps = _layer_outputs(graph, [prefix + layer for prefix in prefixes])
    typed = infer_types(model, message="cannot infer the bundle's tensor shapes")
    index = GraphIndex(typed.graph)
    shapes = []
    for tensor in taps:
        dims = index.value_info(tensor).type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims][1:]
        if len(shape) != 4 or None in shape:
            raise ValueError(f"layer '{layer}' outputs {tensor} of shape {shape}; expected (C, z, y, x) per sample")
        shapes.append(shape)
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"the folds differ at layer '{layer}': {shapes}")
    kernels, dim = pooling_plan(shapes[0])

    names = NameAllocator.for_graph(graph)
    producer = graph.node[GraphIndex(graph).producer(features)]
    producer.output[list(producer.output).index(features)] = names.fresh("retap_replaced_features")
    flat: list[str] = []
    for tensor in taps:
        x = tensor
        for kernel in kernels:
            y = names.fresh(f"{tensor}_pool")
            graph.node.append(helper.make_node("AveragePool", [x], [y], name=names.fresh(f"node_{y}"),
                                               kernel_shape=kernel, strides=kernel))
            x = y
        y = names.fresh(f"{tensor}_flat") if n_folds > 1 else features
        graph.node.append(helper.make_node("Flatten", [x], [y], name=names.fresh(f"node_{y}"), axis=1))
        flat.append(y)
    if n_folds > 1:
        axes = names.fresh("retap_fold_axis")
        graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
        stacked = []
        for tensor in flat:
            y = names.fresh(f"{tensor}_fold")
            graph.node.append(helper.make_node("Unsqueeze", [tensor, axes], [y], name=names.fresh(f"node_{y}")))
            stacked.append(y)
        graph.node.append(helper.make_node("Concat", stacked, [features], name=names.fresh("node_retap_stack"),
                                           axis=1))
    out = next(o for o in graph.output if o.name == features)
    out.type.tensor_type.shape.dim[-1].Clear()
    out.type.tensor_type.shape.dim[-1].dim_value = dim
    del graph.value_info[:]
    network = extract(infer_types(model, message=f"the bundle tapped at '{layer}' does not type-check"),
                      GraphIndex(graph).inputs, [logits, features])
    network.graph.name = graph.name
    del network.metadata_props[:]
    return write_manifest(network, manifest.replace(
        features=FeatureSpec(layer=layer, layer_shape=shapes[0], pooling=kernels, dim=dim)))
