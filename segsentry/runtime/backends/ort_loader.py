"""onnxruntime loaders: the sessions the onnxruntime runners (:mod:`.onnxruntime`, :mod:`.ort_gpu`) run.

After Polygraphy's ``backend/onnxrt/loader.py`` (``SessionFromOnnx``) beside its runner: a loader turns the
bundle bytes into an ``InferenceSession`` (graph, session options, execution providers, checks); the runners
only own the session (and, on the GPU, its device IO binding) and release them in ``close()``.

CPU (:func:`cpu_session`): the CPU execution provider, all graph optimisations, the CPU memory arena unless
``low_memory``, onnxruntime's memory pattern only for small patches (:func:`cpu_memory_pattern`).

GPU (:func:`gpu_session`, the ``gpu`` extra, ``onnxruntime-gpu``): ``CUDAExecutionProvider`` (``device_id``;
``cudnn_conv_algo_search=EXHAUSTIVE`` and ``cudnn_conv_use_max_workspace=1``, which decide the speed of 3D
convolutions; ``use_tf32=0`` so ``fp32`` means float32, as on the CPU) and, with ``use_trt_ep=True``,
``TensorrtExecutionProvider`` in front of it (engine cache in ``cache_dir`` when given). The CPU provider is
never listed: after the session is created its active providers are checked, and a session that lost the CUDA
provider (no GPU, missing CUDA/cuDNN libraries) is refused with a :class:`~segsentry.errors.BackendError`
instead of silently running on the CPU. ``precision="fp16"`` loads the graph from
:func:`segsentry.runtime.backends.fp16.mixed_fp16_bytes` (FP16 network, FP32 normalisations and Mahalanobis
head, float32 inputs and outputs). The TensorRT EP then gets ``trt_fp16_enable=False`` on purpose: FP16 comes
from the graph's explicit types; the flag would let TensorRT 10's weak typing pick FP16 kernels for the FP32
head as well (and TensorRT 11 removed it).

Run on this machine (no GPU): :func:`cpu_session`, :func:`provider_list`, and :func:`gpu_session`'s errors
(no CUDA provider; a session that lost it, with a stand-in session). Never run on GPU hardware so far: a
session with the CUDA / TensorRT providers (the ``gpu``-marked tests in ``tests/runtime/test_ort_gpu.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from segsentry.errors import BackendError, MissingDependencyError, first_line
from segsentry.runtime.backends.base import import_optional
from segsentry.runtime.backends.options import BackendOptions, Precision

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
GPU_PURPOSE = ("The ort-gpu backend (onnxruntime's CUDA execution provider, on an NVIDIA CUDA GPU; onnxruntime-gpu "
               "replaces the CPU-only onnxruntime package)")


PATTERN_MAX_PATCH_VOXELS = 2**19
"""The CPU sessions keep onnxruntime's memory pattern for patches below this many voxels and turn it off from
there (and always with ``low_memory``): :func:`cpu_memory_pattern`."""


def cpu_memory_pattern(patch_size: Sequence[int], *, low_memory: bool = False) -> bool:
    """Whether a CPU session for ``patch_size`` patches keeps onnxruntime's memory pattern.

    The pattern plans every intermediate tensor of a run into one block on the first run and keeps that block;
    without it the arena (on unless ``low_memory``) serves the tensors one by one. Measured with
    ``benchmarks/memory.py --variants arena no-pattern`` (fresh process per run, settings alternating, mirrored;
    ``benchmarks/results/memory_pattern_*``): on the 30.8 M-parameter fullres net (patch 64 x 128 x 128 =
    2**20 voxels) the pattern cost 220 MB of peak RSS for one fold (1549 vs 1329 MB) and 716 MB for a 2-fold
    ensemble (2566 vs 1850 MB) and bought no speed (18.0 vs 17.1 s, 35.8 vs 32.9 s); on the demo ensemble
    (patch 32 x 64 x 64 = 2**17 voxels, 576 engine calls per case) it cost 11 MB and saved 9 % of the time
    (46.7 vs 51.4 s). The bound sits between the two measured patch sizes; no size in between was measured.
    """
    return not low_memory and math.prod(patch_size) < PATTERN_MAX_PATCH_VOXELS


def session_options(ort: ModuleType, *, threads: int | None, low_memory: bool = False,
                    memory_pattern: bool = True) -> Any:
    """``SessionOptions`` shared by the onnxruntime backends (CPU here, CUDA in ``ort_gpu``): all graph
    optimisations, ``threads`` intra-op threads (None: onnxruntime's default), errors-only logging, the CPU
    memory arena unless ``low_memory``, and the memory pattern if ``memory_pattern`` (onnxruntime's default;
    :func:`cpu_session` decides by :func:`cpu_memory_pattern`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = not low_memory
    options.enable_mem_pattern = memory_pattern
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


def cpu_session(model: bytes, options: BackendOptions, *, patch_size: Sequence[int]) -> Any:
    """An ``InferenceSession`` of ``model`` on the CPU execution provider (``options.threads``,
    ``options.low_memory``, the memory pattern by ``patch_size``: :func:`cpu_memory_pattern`);
    :class:`BackendError` when onnxruntime cannot load it."""
    import onnxruntime as ort

    settings = session_options(ort, threads=options.threads, low_memory=options.low_memory,
                               memory_pattern=cpu_memory_pattern(patch_size, low_memory=options.low_memory))
    try:
        return ort.InferenceSession(model, sess_options=settings, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(f"onnxruntime cannot load the bundle: {first_line(exc)}") from exc


def provider_list(*, device_id: int, precision: Precision, use_trt_ep: bool,
                  cache_dir: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """The ``(provider, options)`` pairs the session is created with, best first; never the CPU provider."""
    cuda = {
        "device_id": device_id,
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "cudnn_conv_use_max_workspace": "1",
        "use_tf32": "0",
    }
    providers: list[tuple[str, dict[str, Any]]] = [(CUDA_EP, cuda)]
    if use_trt_ep:
        trt: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": False}
        if cache_dir is not None:  # a folder, or a bundle file whose folder holds the cache
            folder = Path(cache_dir).parent if Path(cache_dir).suffix == ".onnx" else Path(cache_dir)
            trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(folder))
        providers.insert(0, (TRT_EP, trt))
    log.debug("ort-gpu providers (%s): %s", precision, providers)
    return providers


def gpu_session(model: bytes, *, device_id: int, precision: Precision, use_trt_ep: bool, cache_dir: Path | None,
                threads: int | None) -> Any:
    """An ``InferenceSession`` of ``model`` (or its FP16 graph) on CUDA device ``device_id`` whose active
    providers are the ones asked for (:func:`provider_list`), never a CPU fallback.

    Raises :class:`MissingDependencyError` (the ``gpu`` extra) when onnxruntime lacks the CUDA (or, with
    ``use_trt_ep``, the TensorRT) provider, :class:`BackendError` when the session cannot be created or lost a
    provider.
    """
    ort = import_optional("onnxruntime", package="onnxruntime-gpu", extra="gpu", purpose=GPU_PURPOSE)
    available = ort.get_available_providers()
    if CUDA_EP not in available:
        raise MissingDependencyError("onnxruntime-gpu", "gpu", GPU_PURPOSE)
    if use_trt_ep and TRT_EP not in available:
        raise MissingDependencyError("onnxruntime-gpu", "gpu", "The ort-gpu backend's TensorRT provider")
    if precision == "fp16":
        from segsentry.runtime.backends.fp16 import mixed_fp16_bytes

        model = mixed_fp16_bytes(model, extra="gpu")
    providers = provider_list(device_id=device_id, precision=precision, use_trt_ep=use_trt_ep,
                              cache_dir=cache_dir)
    # errors-only logging: a provider failing is an error; the memory pattern stays onnxruntime's default (on):
    # cpu_memory_pattern was measured on the CPU only
    settings = session_options(ort, threads=threads)
    try:
        session = ort.InferenceSession(model, sess_options=settings, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(f"onnxruntime-gpu cannot load the bundle on CUDA device {device_id}: "
                           f"{first_line(exc)}") from exc
    active = session.get_providers()
    wanted = [name for name, _ in providers]
    if any(name not in active for name in wanted):
        raise BackendError(
            f"onnxruntime-gpu could not start {', '.join(n for n in wanted if n not in active)} on device "
            f"{device_id} (active: {', '.join(active)}): no usable CUDA GPU, or the CUDA / cuDNN"
            f"{' / TensorRT' if use_trt_ep else ''} libraries it needs are missing (onnxruntime logged the "
            "reason above). Not falling back to the CPU; use --backend onnxruntime for CPU inference"
        )
    return session


__all__ = ["CUDA_EP", "GPU_PURPOSE", "PATTERN_MAX_PATCH_VOXELS", "TRT_EP", "cpu_memory_pattern", "cpu_session",
           "gpu_session", "provider_list", "session_options"]
