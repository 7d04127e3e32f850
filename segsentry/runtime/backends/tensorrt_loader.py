"""TensorRT loader (the ``trt`` extra): everything that makes the engine the runner in :mod:`.tensorrt` runs.

After Polygraphy's ``backend/trt/loader.py`` beside ``runner.py``: the loader turns the bundle into an engine
(graph choice, build, cache), the runner only owns the engine's context, buffers, stream and CUDA graph.

Graph: :func:`network_bytes` is the ONNX graph TensorRT parses: the bundle itself (``precision="fp32"``) or
its FP16 graph from :func:`~segsentry.runtime.backends.fp16.mixed_fp16_bytes` (``"fp16"``: FP16 network, FP32
normalisations and Mahalanobis head, float32 inputs and outputs).

Build: :func:`build_engine` parses it into a network created with
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (TensorRT 10; always on in 11), so the graph's types decide
each layer's precision and the head cannot be demoted to FP16; TF32 is turned off so FP32 layers are float32.
One optimization profile covers the input's batch axis: min 1, opt = max = ``max_batch``.

Cache: :func:`load_engine` reads the serialized engine from :func:`cache_path_for` (an
:func:`engine_cache_path` keyed by the sha256 of the graph TensorRT parsed -- so the FP16 graph has its own
key --, the TensorRT version, the GPU name and compute capability, the precision and ``max_batch``) when it
deserializes, else builds it and writes it there atomically; without a cache folder the engine is built in
memory every time (minutes for 3D networks).

Run on this machine (no GPU, no TensorRT): :func:`engine_cache_path`, :func:`network_bytes` and
:func:`load_engine` with a stand-in runtime and build. Never run with TensorRT so far: :func:`build_engine`,
:func:`trt_logger` and a real deserialization (the ``trt``-marked tests in ``tests/runtime/test_tensorrt.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segsentry._atomic import write_bytes_atomic
from segsentry.errors import BackendError
from segsentry.manifest import weights_sha256
from segsentry.runtime.backends.options import PRECISIONS, Precision

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 4


def engine_cache_path(
    bundle_path_or_dir: str | Path,
    *,
    onnx_sha256: str,
    trt_version: str,
    gpu_name: str,
    precision: str,
    max_batch: int,
) -> Path:
    """Where the TensorRT engine for these inputs is cached; a pure function of its arguments.

    ``bundle_path_or_dir`` is a bundle file (``*.onnx``: the engine goes beside it, named after it) or a folder.
    The name holds the precision, ``max_batch`` and the first 16 hex digits of the sha256 of every key field
    (``onnx_sha256`` of the graph TensorRT parses, ``trt_version``, ``gpu_name``, ``precision``, ``max_batch``),
    e.g. ``model.ood.trt-fp16-b4-0123456789abcdef.engine``: an engine built elsewhere, by another TensorRT or
    from other weights never matches.
    """
    if precision not in PRECISIONS:
        raise BackendError(f"TensorRT precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_batch < 1:
        raise BackendError(f"TensorRT max batch must be at least 1, got {max_batch}")
    if len(onnx_sha256) != 64 or any(c not in "0123456789abcdef" for c in onnx_sha256):
        raise BackendError(f"expected a lowercase hex sha256 of the ONNX graph, got {onnx_sha256!r}")
    key = json.dumps({"onnx_sha256": onnx_sha256, "tensorrt": trt_version, "gpu": gpu_name,
                      "precision": precision, "max_batch": int(max_batch)}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    path = Path(bundle_path_or_dir)
    if path.suffix == ".onnx":
        folder, stem = path.parent, path.name[: -len(".onnx")]
    else:
        folder, stem = path, "segsentry"
    return folder / f"{stem}.trt-{precision}-b{int(max_batch)}-{digest}.engine"


def cache_path_for(cache_dir: str | Path | None, network: bytes, *, trt_version: str, gpu_name: str,
                   precision: str, max_batch: int) -> Path | None:
    """The :func:`engine_cache_path` of the graph ``network`` in ``cache_dir``; ``None`` without a cache folder."""
    if cache_dir is None:
        return None
    return engine_cache_path(cache_dir, onnx_sha256=weights_sha256(network), trt_version=trt_version,
                             gpu_name=gpu_name, precision=precision, max_batch=max_batch)


def network_bytes(model: bytes, precision: Precision) -> bytes:
    """The ONNX graph TensorRT builds from: ``model`` for ``fp32``, its mixed FP16 graph for ``fp16``."""
    if precision == "fp16":
        from segsentry.runtime.backends.fp16 import mixed_fp16_bytes

        return mixed_fp16_bytes(model, extra="trt")
    return model


def trt_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards to :mod:`logging` (TensorRT's INFO and VERBOSE at DEBUG)."""
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG, severity.VERBOSE: logging.DEBUG}

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, level: Any, msg: str) -> None:
            log.log(levels.get(level, logging.DEBUG), "TensorRT: %s", msg)

    return Logger()


def build_engine(trt: Any, logger: Any, onnx_bytes: bytes, *, input_name: str, sample_shape: Sequence[int],
                 max_batch: int, workspace_bytes: int | None = None) -> bytes:
    """Parse ``onnx_bytes`` into a strongly typed network and build a serialized engine (batch 1..max_batch)."""
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse the bundle: {errors or 'no error reported'}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if input_name not in inputs:
        raise BackendError(f"the bundle has no input '{input_name}' (inputs: {', '.join(inputs)})")
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    full = (max_batch, *sample_shape)
    profile.set_shape(input_name, (1, *sample_shape), full, full)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError("TensorRT could not build an engine for the bundle (its log, above, says why)")
    return bytes(serialized)


def load_engine(trt: Any, runtime: Any, logger: Any, network: bytes, *, cache_path: Path | None,
                input_name: str, sample_shape: Sequence[int], max_batch: int, precision: str, gpu_name: str,
                workspace_bytes: int | None = None) -> Any:
    """The engine deserialized by ``runtime``: from ``cache_path`` when it loads, else built from ``network``
    (the graph :func:`network_bytes` chose; ``workspace_bytes`` limits TensorRT's workspace pool) and written to
    ``cache_path`` when given.

    An engine in the cache that ``runtime`` cannot deserialize is rebuilt and overwritten; a cache that cannot be
    written is logged and skipped. ``logger`` (:func:`trt_logger`) must outlive ``runtime`` and the engine.
    """
    path = cache_path
    if path is not None and path.is_file():
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is not None:
            log.info("TensorRT engine loaded from %s", path)
            return engine
        log.warning("cached TensorRT engine %s cannot be loaded; rebuilding it", path)
    log.info("building the TensorRT engine (%s, max batch %d) on %s; this takes minutes for 3D networks",
             precision, max_batch, gpu_name)
    serialized = build_engine(trt, logger, network, input_name=input_name, sample_shape=sample_shape,
                              max_batch=max_batch, workspace_bytes=workspace_bytes)
    if path is not None:
        try:
            write_bytes_atomic(path, serialized)
            log.info("TensorRT engine cached at %s", path)
        except OSError as exc:
            log.warning("cannot write the TensorRT engine cache %s (%s); continuing without it", path, exc)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise BackendError("TensorRT could not deserialize the engine it just built (its log says why)")
    return engine


__all__ = ["DEFAULT_MAX_BATCH", "build_engine", "cache_path_for", "engine_cache_path", "load_engine",
           "network_bytes", "trt_logger"]
