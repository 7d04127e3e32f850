"""The default-domain ('ai.onnx') opset a model imports."""

from __future__ import annotations

import onnx

from segsentry.errors import SegsentryError
from segsentry.graph.check import GraphError

__all__ = ["DEFAULT_DOMAINS", "default_opset", "require_opset"]

DEFAULT_DOMAINS = ("", "ai.onnx")  # two spellings of the standard operator set's domain


def default_opset(model: onnx.ModelProto) -> int | None:
    """Version of the first default-domain opset ``model`` imports, or ``None`` if it imports none."""
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    return None


def require_opset(model: onnx.ModelProto, *, minimum: int = 1, purpose: str,
                  error: type[SegsentryError] = GraphError) -> int:
    """:func:`default_opset` of ``model``; raise ``error`` if it imports none or one older than ``minimum``.

    ``purpose`` names what needs the opset, e.g. ``"the OOD head"``; it starts the message.
    """
    version = default_opset(model)
    if version is None:
        raise error(f"{purpose} needs the default ONNX domain ('ai.onnx'), but the model imports no opset of it; "
                    "export it with a standard opset")
    if version < minimum:
        raise error(f"{purpose} needs ONNX opset >= {minimum}, but the model imports opset {version}; "
                    f"re-export it with opset {minimum} or newer")
    return version
