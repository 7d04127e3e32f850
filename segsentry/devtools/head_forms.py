"""The Mahalanobis head in the form bundles stored before the compact head, for tests and benchmarks, and a
calibrated bundle turned back into the features bundle it was calibrated from.

:func:`features_bundle` removes the fused head and the calibration from a calibrated bundle: its network with
the ``logits`` and ``features`` outputs, as ``ood-export`` wrote it, so that a shipped bundle can be calibrated
again (another subject score, other calibration cases) without its training folder.

:func:`older_head_form` rewrites every compact head of a model (``basis`` + ``span_scale``, see
:class:`segsentry.contract.HeadInitializer`) into the older layout: ``components_t = basis * span_scale`` stored
beside ``basis`` and multiplied with ``delta``. The distance is the same formula; only the bytes and one
``D x rank`` MatMul per patch differ. Real older bundles cannot be made any more, so this is what shows that
every engine still reads them, and what the compact head is timed against.
"""

from __future__ import annotations

import copy

import onnx
from onnx import numpy_helper

from segsentry.contract import HEAD_SCOPE, HeadInitializer

__all__ = ["features_bundle", "older_head_form"]


def features_bundle(model_bytes: bytes) -> bytes:
    """The features bundle of the calibrated bundle ``model_bytes``: the graph pruned to the network's ``logits``
    and the head's input (the ``features`` tensor), the manifest without calibration, sealed anew. A bundle
    fusing several feature taps (``segsentry fuse-taps``) gives its first tap's: that head comes first in the
    graph, the further taps' are appended behind it. Raises ``ValueError`` for a bundle without a head or with a
    reduced-precision network."""
    from segsentry.contract import Output
    from segsentry.graph import GraphIndex, extract, head_boundary
    from segsentry.manifest import read_manifest, write_manifest

    manifest = read_manifest(model_bytes)
    if manifest.quantization is not None:
        raise ValueError("the bundle's network is quantised; calibrate its float32 source instead")
    model = onnx.load_model_from_string(model_bytes)
    inputs, outputs = head_boundary(model.graph)
    taps = len(manifest.calibration.taps) if manifest.calibration is not None else 0
    if manifest.calibration is None or len(inputs) != 1 + taps or not outputs:
        raise ValueError("the bundle has no fused Mahalanobis head reading one features tensor")
    logits = manifest.output_name(Output.LOGITS)
    network = extract(model, GraphIndex(model.graph).inputs, [logits, inputs[0]])
    network.graph.name = model.graph.name
    del network.metadata_props[:]
    return write_manifest(network, manifest.replace(
        calibration=None, outputs={Output.LOGITS.value: logits, Output.FEATURES.value: inputs[0]}))


def older_head_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose compact heads (one, or one per fold under ``ood_head/f<i>/``) are in the older
    layout. Raises ``ValueError`` when the model has no compact head."""
    out = copy.deepcopy(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    span = HeadInitializer.SPAN_SCALE.value
    scopes = [name[: -len(span)] for name in inits if name.startswith(HEAD_SCOPE) and name.endswith(span)]
    if not scopes:
        raise ValueError("the model has no compact Mahalanobis head (no ood_head/.../span_scale initializer)")
    for scope in scopes:
        scale = inits[scope + span]
        basis = numpy_helper.to_array(inits[scope + HeadInitializer.BASIS.value])
        components_t = scope + HeadInitializer.COMPONENTS_T.value
        graph.initializer.remove(scale)
        graph.initializer.append(numpy_helper.from_array(basis * numpy_helper.to_array(scale), components_t))
        whitened = next(n for n in graph.node if scale.name in n.input)
        whitened.op_type, whitened.name = "MatMul", whitened.name.removesuffix("_Mul") + "_MatMul"
        whitened.input[:] = [scope + "delta", components_t]
    return out
