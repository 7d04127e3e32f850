"""Inference backends behind one protocol; ``create_backend`` picks one by name.

Only ``onnxruntime`` (CPU) exists so far. The GPU, TensorRT, OpenVINO and torch backends are named so that
asking for them gives a clear error instead of a silent fallback.
"""

from __future__ import annotations

from collections.abc import Sequence

from segsentry.errors import BackendError
from segsentry.runtime.backends.base import Backend, BackendBase, check_batch

AVAILABLE = ("onnxruntime",)
PLANNED = ("ort-gpu", "tensorrt", "openvino", "torch")
ALIASES = {"ort": "onnxruntime", "cpu": "onnxruntime", "auto": "onnxruntime"}


def resolve_backend_name(name: str) -> str:
    """Map a user-facing name (incl. aliases and ``auto``) to an implemented backend, or raise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in AVAILABLE:
        return key
    if key in PLANNED:
        raise BackendError(f"backend '{name}' is not implemented yet in this version; use --backend onnxruntime")
    raise BackendError(f"unknown backend '{name}'; choose one of: {', '.join((*AVAILABLE, 'auto'))}")


def create_backend(
    name: str, model: bytes, *, channels: int, patch_size: Sequence[int], input_name: str = "image",
    threads: int | None = None,
) -> Backend:
    key = resolve_backend_name(name)
    if key == "onnxruntime":
        from segsentry.runtime.backends.onnxruntime import OnnxruntimeBackend

        return OnnxruntimeBackend(model, channels=channels, patch_size=patch_size, input_name=input_name,
                                  threads=threads)
    raise BackendError(f"backend '{name}' cannot be created")  # unreachable: resolve_backend_name raised


__all__ = ["AVAILABLE", "Backend", "BackendBase", "check_batch", "create_backend", "resolve_backend_name"]
