"""Inference backends behind one protocol; ``create_backend`` picks one by name.

Implemented: ``onnxruntime`` (CPU, always installed), ``openvino`` (CPU, the ``openvino`` extra) and ``torch``
(the reference PyTorch network rebuilt from the bundle's nnU-Net model folder, the ``export`` extra).
``auto`` resolves deterministically to the best installed CPU engine for the bundle: ``openvino`` if it can
be imported, else ``onnxruntime`` (never ``torch``, which needs the model folder). The GPU and TensorRT
backends are named so that asking for them gives a clear error instead of a silent fallback.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence

from segsentry.errors import BackendError
from segsentry.manifest import Manifest
from segsentry.runtime.backends.base import Backend, BackendBase, check_batch

log = logging.getLogger(__name__)

AVAILABLE = ("onnxruntime", "openvino", "torch")
PLANNED = ("ort-gpu", "tensorrt")
ALIASES = {"ort": "onnxruntime", "cpu": "onnxruntime", "ov": "openvino", "pytorch": "torch"}
AUTO_ORDER = ("openvino", "onnxruntime")  # CPU engines ``auto`` tries, best first


def _importable(module: str) -> bool:
    """Whether ``module`` really imports (a broken install counts as missing, so ``auto`` never picks it)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or whatever a broken native install raises
        log.debug("backend module '%s' is not importable: %s", module, exc)
        return False
    return True


def resolve_auto() -> str:
    """The concrete backend ``auto`` stands for here: the first of :data:`AUTO_ORDER` that is importable."""
    for name in AUTO_ORDER:
        if name == "onnxruntime" or _importable(name):
            return name
    return "onnxruntime"  # pragma: no cover - onnxruntime ends AUTO_ORDER


def resolve_backend_name(name: str) -> str:
    """Map a user-facing name (aliases, ``auto``) to a concrete implemented backend name, or raise.

    ``auto`` returns the engine it picked (``openvino`` or ``onnxruntime``), so callers can record it.
    """
    key = name.strip().lower()
    if key == "auto":
        chosen = resolve_auto()
        log.debug("backend 'auto' resolved to '%s'", chosen)
        return chosen
    key = ALIASES.get(key, key)
    if key in AVAILABLE:
        return key
    if key in PLANNED:
        raise BackendError(f"backend '{name}' is not implemented yet in this version; use --backend onnxruntime")
    raise BackendError(f"unknown backend '{name}'; choose one of: {', '.join((*AVAILABLE, 'auto'))}")


def create_backend(
    name: str,
    model: bytes,
    *,
    channels: int,
    patch_size: Sequence[int],
    input_name: str = "image",
    threads: int | None = None,
    manifest: Manifest | None = None,
) -> Backend:
    """Create the backend ``name`` (resolved with :func:`resolve_backend_name`) for the bundle bytes ``model``.

    Every backend runs ``(n, channels, *patch_size)`` float32 batches. ``manifest`` is the bundle's manifest;
    the ``torch`` backend requires it (it rebuilds the network from ``manifest.source``), the others ignore it.
    A backend whose package is missing raises :class:`~segsentry.errors.MissingDependencyError`.
    """
    key = resolve_backend_name(name)
    if key == "onnxruntime":
        from segsentry.runtime.backends.onnxruntime import OnnxruntimeBackend

        return OnnxruntimeBackend(model, channels=channels, patch_size=patch_size, input_name=input_name,
                                  threads=threads)
    if key == "openvino":
        from segsentry.runtime.backends.openvino import OpenvinoBackend

        return OpenvinoBackend(model, channels=channels, patch_size=patch_size, input_name=input_name,
                               threads=threads)
    if key == "torch":
        from segsentry.runtime.backends.torch import TorchBackend

        return TorchBackend(model, manifest=manifest, channels=channels, patch_size=patch_size,
                            input_name=input_name, threads=threads)
    raise BackendError(f"backend '{name}' cannot be created")  # unreachable: resolve_backend_name raised


__all__ = ["AVAILABLE", "AUTO_ORDER", "PLANNED", "Backend", "BackendBase", "check_batch", "create_backend",
           "resolve_auto", "resolve_backend_name"]
