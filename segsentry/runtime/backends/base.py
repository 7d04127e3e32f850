"""The backend protocol (after Polygraphy's runners): ``run(batch) -> outputs``, context-managed.

A backend wraps one inference engine for one bundle. Input checks live here, in one place, so every
backend validates batches the same way. Every backend class takes ``(model, *, channels, patch_size,
input_name, options)`` with one :class:`~segsentry.runtime.backends.options.BackendOptions`, plus the few
keywords only that engine has.

A backend is a *runner* (Polygraphy's ``runner.py``): it owns a session or engine context and its buffers and
releases them in ``close()``. Making what it runs -- the FP16 graph (``fp16.py``), a TensorRT engine build and
its cache (``tensorrt_loader.py``), an onnxruntime session with its providers (``ort_loader.py``) -- is a
*loader*'s job, kept in its own module.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Protocol, runtime_checkable

import numpy as np

from segsentry.errors import BackendError, MissingDependencyError
from segsentry.runtime.backends.options import BackendOptions


@runtime_checkable
class Backend(Protocol):
    """Runs ``(batch, channels, z, y, x)`` float32 patches; returns named float32 outputs with a batch axis.

    ``run_network`` is for calls whose distances nobody reads (nnU-Net's mirrored flips): it returns at least the
    network's outputs (logits); an engine that holds the fused head apart skips it there (``head_apart``).
    """

    name: str

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def run_network(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Backend: ...

    def __exit__(self, *exc: object) -> None: ...


def check_batch(batch: np.ndarray, *, channels: int, patch_size: Sequence[int]) -> np.ndarray:
    """Validate and return a C-contiguous float32 batch of shape ``(n, channels, *patch_size)``."""
    expected = (channels, *patch_size)
    if batch.ndim != 5 or tuple(batch.shape[1:]) != tuple(expected):
        raise BackendError(f"backend input must be (batch, {', '.join(map(str, expected))}); got {batch.shape}")
    if batch.shape[0] < 1:
        raise BackendError("backend input batch is empty")
    return np.ascontiguousarray(batch, dtype=np.float32)


def import_optional(module: str, *, package: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional engine lazily; raise :class:`MissingDependencyError` naming the pip extra if absent.

    Goes through :func:`importlib.import_module`, so a module blocked with ``sys.modules[name] = None`` counts
    as missing too.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(package, extra, purpose) from exc


class BackendBase:
    """Shared context-manager plumbing; subclasses implement ``_run`` and optionally ``close``.

    ``options`` is kept as given (``self.options``) so a caller can see what the engine was created with.
    """

    name = "base"
    #: the precision the engine runs the network in (a subclass that offers others sets it from its options)
    precision = "fp32"
    #: whether :meth:`run_network` skips the fused head; engines that cannot prune a graph per call run it whole
    head_apart = False

    def __init__(self, *, channels: int, patch_size: Sequence[int], options: BackendOptions) -> None:
        self.channels = channels
        self.patch_size = tuple(int(p) for p in patch_size)
        self.options = options

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(check_batch(batch, channels=self.channels, patch_size=self.patch_size))

    def run_network(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The network's outputs for a batch whose distances nobody reads; here the whole graph, as :meth:`run`."""
        return self.run(batch)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> BackendBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
