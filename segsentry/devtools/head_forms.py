"""The Mahalanobis head in the form bundles stored before the compact head, for tests and benchmarks.

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

__all__ = ["older_head_form"]


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
