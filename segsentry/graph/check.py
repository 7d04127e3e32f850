"""``onnx.checker`` and strict type inference, raising a segsentry error a person can act on."""

from __future__ import annotations

import onnx

from segsentry.errors import SegsentryError

__all__ = ["GraphError", "check_model", "infer_types"]

# what onnx raises for an invalid model: its C++ checks arrive as the first two, a std::runtime_error as
# RuntimeError, a model over protobuf's 2 GB as ValueError
_ONNX_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError, ValueError)


class GraphError(SegsentryError):
    """An ONNX graph is invalid or cannot be edited as asked (unknown tensor, missing opset, failed check)."""


def check_model(model: onnx.ModelProto, *, types: bool = False, message: str = "the ONNX graph does not validate",
                error: type[SegsentryError] = GraphError) -> onnx.ModelProto:
    """Run ``onnx.checker.check_model`` (and, with ``types``, strict type inference) on ``model``; return it.

    Raises ``error`` with ``"{message}: {what onnx said}"``. A pass passes its own error class (``CalibrationError``,
    ``BackendError``, ...) so that callers see the error of the layer they called.
    """
    try:
        onnx.checker.check_model(model)
        if types:
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except _ONNX_ERRORS as exc:
        raise error(f"{message}: {exc}") from exc
    return model


def infer_types(model: onnx.ModelProto, *, message: str = "cannot infer the graph's tensor types",
                error: type[SegsentryError] = GraphError) -> onnx.ModelProto:
    """A copy of ``model`` with every tensor's type in ``value_info`` (strict onnx type inference).

    Read the types with ``GraphIndex(inferred.graph).elem_type(name)``. Raises ``error`` as :func:`check_model`.
    """
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except _ONNX_ERRORS as exc:
        raise error(f"{message}: {exc}") from exc
