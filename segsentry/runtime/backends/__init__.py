"""Inference backends behind one protocol; ``create_backend`` picks one by name.

CPU: ``onnxruntime`` (always installed), ``openvino`` (the ``openvino`` extra) and ``torch`` (the reference
PyTorch network rebuilt from the bundle's nnU-Net model folder, the ``export`` extra; it lives beside the exporter,
``export/torch_backend.py``, and the runtime never imports the exporter: the registry :data:`BACKENDS` names each
backend's module, imported only when that backend is created). GPU: ``ort-gpu``
(onnxruntime's CUDA execution provider, the ``gpu`` extra; float32 by default) and ``tensorrt`` (the ``trt``
extra; FP16 network with an FP32 Mahalanobis head by default). The GPU backends have not run on GPU hardware
yet (see their module docstrings for what was run where).

``auto`` resolves deterministically to the first usable engine of :data:`AUTO_ORDER`: the GPU engines only
when the NVIDIA driver reports a CUDA device (:func:`cuda_device_count`, a driver call through ctypes, no CUDA
package needed) -- ``tensorrt`` if tensorrt, cuda-python and onnx import, else ``ort-gpu`` if onnxruntime has
its CUDA provider -- then ``openvino`` if it imports, else ``onnxruntime`` (never ``torch``, which needs the
model folder). On a machine without a GPU that is the CPU choice it always was.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from segsentry.errors import BackendError, MissingDependencyError
from segsentry.manifest import Manifest
from segsentry.runtime.backends.base import Backend, BackendBase, check_batch
from segsentry.runtime.backends.options import PRECISIONS, BackendOptions, Precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendSpec:
    """Where a backend lives: imported lazily, only when :func:`create_backend` is asked for it.

    Attributes:
        module: the dotted module that defines the backend class (one file per backend).
        class_name: the backend class in ``module``.
        extra: the pip extra that installs the engine (``None``: a core dependency).
        gpu: runs on an NVIDIA CUDA GPU (``auto`` tries it only when the driver reports a device).
        needs_manifest: the class takes the bundle manifest (``manifest=``) as well as the bundle bytes.
        default_batch_size: patches per engine call when the user asks for no batch size (see
            :func:`default_batch_size`); more than 1 only where ``benchmarks/batch_size.py`` measured a win
            over 5 % at no memory or mask cost on small and full-size networks alike (none does so far).
    """

    module: str
    class_name: str
    extra: str | None
    gpu: bool = False
    needs_manifest: bool = False
    default_batch_size: int = 1


BACKENDS: dict[str, BackendSpec] = {  # backend name -> where it lives; the order is AVAILABLE's
    # 1 patch per call everywhere, as nnU-Net. Batch 4 saved 5-20 % per patch on the 1.4 M-parameter demo net
    # (batch_size_demo*.md) but nothing on a 30.8 M-parameter fullres net, where it took 2.2x the peak memory
    # (OpenVINO: 3545 vs 1597 MB) and changed 0.06 % of the mask voxels (batch_size_fullres.md)
    "onnxruntime": BackendSpec("segsentry.runtime.backends.onnxruntime", "OnnxruntimeBackend", None),
    "openvino": BackendSpec("segsentry.runtime.backends.openvino", "OpenvinoBackend", "openvino"),
    "torch": BackendSpec("segsentry.export.torch_backend", "TorchBackend", "export", needs_manifest=True),
    "ort-gpu": BackendSpec("segsentry.runtime.backends.ort_gpu", "OrtGpuBackend", "gpu", gpu=True),
    "tensorrt": BackendSpec("segsentry.runtime.backends.tensorrt", "TensorrtBackend", "trt", gpu=True),
}
AVAILABLE = tuple(BACKENDS)
ALIASES = {"ort": "onnxruntime", "cpu": "onnxruntime", "ov": "openvino", "pytorch": "torch",
           "onnxruntime-gpu": "ort-gpu", "trt": "tensorrt"}
AUTO_ORDER = ("tensorrt", "ort-gpu", "openvino", "onnxruntime")  # what ``auto`` tries, best first
GPU_BACKENDS = tuple(name for name in AUTO_ORDER if BACKENDS[name].gpu)  # ("tensorrt", "ort-gpu")
_DRIVER_LIBRARIES = ("nvcuda.dll",) if os.name == "nt" else ("libcuda.so.1", "libcuda.so")


def _importable(module: str) -> bool:
    """Whether ``module`` really imports (a broken install counts as missing, so ``auto`` never picks it)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError, or whatever a broken native install raises
        log.debug("backend module '%s' is not importable: %s", module, exc)
        return False
    return True


def cuda_device_count() -> int:
    """CUDA devices the NVIDIA driver reports (``cuInit`` + ``cuDeviceGetCount`` via ctypes); 0 without a driver.

    Cheap (no CUDA package, no context created) and honours ``CUDA_VISIBLE_DEVICES``.
    """
    for name in _DRIVER_LIBRARIES:
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return max(count.value, 0)
    return 0


def _cuda_provider_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _usable(name: str) -> bool:
    """Whether ``auto`` may pick ``name`` (GPU engines: only asked once a CUDA device is known to exist)."""
    if name == "tensorrt":  # the default FP16 engine is built from the onnx package's FP16 pass
        return _importable("tensorrt") and _importable("onnx") and (
            _importable("cuda.bindings.runtime") or _importable("cuda.cudart"))
    if name == "ort-gpu":
        return _cuda_provider_available()
    return name == "onnxruntime" or _importable(name)


def resolve_auto() -> str:
    """The concrete backend ``auto`` stands for here: the first usable engine of :data:`AUTO_ORDER`."""
    gpu = cuda_device_count() > 0
    for name in AUTO_ORDER:
        if (gpu or name not in GPU_BACKENDS) and _usable(name):
            return name
    return "onnxruntime"  # pragma: no cover - onnxruntime ends AUTO_ORDER


def resolve_backend_name(name: str) -> str:
    """Map a user-facing name (aliases, ``auto``) to a concrete implemented backend name, or raise.

    ``auto`` returns the engine it picked (see :func:`resolve_auto`), so callers can record it.
    """
    key = name.strip().lower()
    if key == "auto":
        chosen = resolve_auto()
        log.debug("backend 'auto' resolved to '%s'", chosen)
        return chosen
    key = ALIASES.get(key, key)
    if key in AVAILABLE:
        return key
    raise BackendError(f"unknown backend '{name}'; choose one of: {', '.join((*AVAILABLE, 'auto'))}")


def default_batch_size(name: str) -> int:
    """Tiles per engine call for the backend ``name`` when the user asks for no batch size: its
    :attr:`BackendSpec.default_batch_size`. A mirrored tile's flips are calls of their own
    (:func:`segsentry.runtime.sliding.iterate_patches`), so a call holds that many patches either way."""
    return BACKENDS[resolve_backend_name(name)].default_batch_size


def _backend_class(name: str, spec: BackendSpec) -> type:
    """Import ``spec.module`` and return its backend class. A package the module needs at import time (the
    exporter's package, home of the torch backend, needs torch) is reported as a :class:`MissingDependencyError`
    of this backend, naming its extra."""
    try:
        module = importlib.import_module(spec.module)
    except MissingDependencyError as exc:
        raise MissingDependencyError(exc.package, exc.extra, f"The {name} backend") from exc
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if spec.extra is None or not missing or missing == "segsentry":
            raise  # our own module is broken, or a core dependency is missing: not an extra's business
        raise MissingDependencyError(missing, spec.extra, f"The {name} backend") from exc
    return getattr(module, spec.class_name)


def create_backend(
    name: str,
    model: bytes,
    *,
    channels: int,
    patch_size: Sequence[int],
    input_name: str = "image",
    options: BackendOptions | None = None,
    manifest: Manifest | None = None,
) -> Backend:
    """Create the backend ``name`` (resolved with :func:`resolve_backend_name`) for the bundle bytes ``model``.

    Every backend runs ``(n, channels, *patch_size)`` float32 batches. ``options`` (default
    ``BackendOptions()``) are the engine settings; what each backend does with each of them is listed in
    :mod:`segsentry.runtime.backends.options` (e.g. ``cache_dir`` is where ``tensorrt`` caches its engine and
    ``ort-gpu`` its TensorRT-provider engines; the CPU backends ignore it). ``manifest`` is the bundle's
    manifest; the ``torch`` backend requires it (it rebuilds the network from ``manifest.source``), the others
    are not given it. Backend-specific keywords (OpenVINO's performance hint, TensorRT's CUDA graph switch,
    ort-gpu's TensorRT provider) are reached by constructing the class of :data:`BACKENDS` directly.
    The backend's module is imported here, on first use. A backend whose package is missing raises
    :class:`~segsentry.errors.MissingDependencyError`; a GPU backend on a machine without a usable CUDA GPU
    raises :class:`~segsentry.errors.BackendError`.
    """
    key = resolve_backend_name(name)
    spec = BACKENDS[key]
    backend_class = _backend_class(key, spec)
    specific = {"manifest": manifest} if spec.needs_manifest else {}
    return backend_class(model, channels=channels, patch_size=patch_size, input_name=input_name,
                         options=BackendOptions() if options is None else options, **specific)


__all__ = ["AUTO_ORDER", "AVAILABLE", "BACKENDS", "GPU_BACKENDS", "PRECISIONS", "Backend", "BackendBase",
           "BackendOptions", "BackendSpec", "Precision", "check_batch", "create_backend", "cuda_device_count",
           "default_batch_size", "resolve_auto", "resolve_backend_name"]
