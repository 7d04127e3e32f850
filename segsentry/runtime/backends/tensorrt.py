"""TensorRT backend (the ``trt`` extra: ``tensorrt>=10`` and ``cuda-python>=12``): the runner.

The engine comes from :mod:`.tensorrt_loader` (graph: the bundle for ``fp32``, its FP16 graph with FP32
normalisations and Mahalanobis head for ``fp16``, the default; strongly typed build with one optimization
profile, batch 1..``max_batch``; engine cache in ``options.cache_dir``). This module owns what runs it: the
execution context, device and pinned host buffers, the stream and the CUDA graph, all released in ``close()``.
Batches larger than ``max_batch`` are run in chunks of ``max_batch``.

Run: device buffers for ``max_batch`` patches, pinned host buffers and a non-blocking stream come from
cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` in older releases). Every tensor address is fixed
at construction, so ``execute_async_v3`` for the full ``max_batch`` shape is captured once into a CUDA graph
and replayed; smaller batches (and every batch when capture fails) use a plain ``execute_async_v3``.

Run on this machine (no GPU, no TensorRT): the errors for a missing ``tensorrt`` or ``cuda-python`` and for a
machine without a CUDA GPU (:func:`cuda_device_name` with a stand-in ``cudart``), and the loader's pure parts.
Never run on GPU hardware so far: engine build and deserialization, buffers, copies, CUDA graph capture and
inference; the ``trt``-marked tests in ``tests/runtime/test_tensorrt.py`` do that where TensorRT and a CUDA GPU
exist.
"""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from segsentry import _onnx_wire
from segsentry.errors import BackendError, MissingDependencyError
from segsentry.runtime.backends.base import BackendBase, import_optional
from segsentry.runtime.backends.options import BackendOptions
from segsentry.runtime.backends.tensorrt_loader import (
    DEFAULT_MAX_BATCH,
    cache_path_for,
    load_engine,
    network_bytes,
    trt_logger,
)

log = logging.getLogger(__name__)

PURPOSE = "The tensorrt backend"


def import_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    try:
        return import_optional("cuda.bindings.runtime", package="cuda-python", extra="trt", purpose=PURPOSE)
    except MissingDependencyError:
        return import_optional("cuda.cudart", package="cuda-python", extra="trt", purpose=PURPOSE)


def _cuda_call(cudart: Any, what: str, result: Any) -> Any:
    """Unpack cuda-python's ``(error, *values)``; raise :class:`BackendError` naming ``what`` on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA {what} failed: {_cuda_error_text(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _cuda_error_text(cudart: Any, err: Any) -> str:
    _, text = cudart.cudaGetErrorString(err)
    text = text.decode() if isinstance(text, bytes) else str(text)
    name = getattr(err, "name", str(err))
    return f"{name} ({text})" if text else str(name)


def cuda_device_name(cudart: Any, device_id: int) -> str:
    """``"<GPU name> sm_<major><minor>"`` of CUDA device ``device_id``; :class:`BackendError` if there is none."""
    result = cudart.cudaGetDeviceCount()
    err, count = result[0], (result[1] if len(result) > 1 else 0)
    if int(err) != 0 or not count:
        reason = _cuda_error_text(cudart, err) if int(err) != 0 else "no device"
        raise BackendError(
            f"the tensorrt backend needs an NVIDIA CUDA GPU, but CUDA reports none ({reason}); "
            "use --backend onnxruntime or openvino on this machine"
        )
    if not 0 <= device_id < count:
        raise BackendError(f"CUDA device {device_id} does not exist (this machine has {count})")
    prop = _cuda_call(cudart, "cudaGetDeviceProperties", cudart.cudaGetDeviceProperties(device_id))
    name = prop.name.split(b"\0", 1)[0].decode("utf-8", "replace") if isinstance(prop.name, bytes) else prop.name
    return f"{name.strip()} sm_{prop.major}{prop.minor}"


def _host_array(pointer: int, shape: Sequence[int]) -> np.ndarray:
    """A float32 numpy view of ``prod(shape)`` floats of pinned host memory at ``pointer`` (no copy, no owner)."""
    count = math.prod(shape)
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(int(pointer))).reshape(tuple(shape))


class TensorrtBackend(BackendBase):
    """A TensorRT engine for the bundle on one CUDA device, with fixed buffers and a CUDA graph for full batches.

    ``run(batch)``: ``batch`` is ``(n, channels, *patch_size)`` float32 (z, y, x patch axes), any ``n >= 1``;
    returns every graph output keyed by its ONNX name as float32 arrays with the batch axis first.

    Args:
        model: the bundle bytes (float32 ONNX with its manifest).
        options: ``precision`` ``"fp16"`` (default; FP32 normalisations and head) or ``"fp32"``; ``max_batch``
            the largest batch of the engine's optimization profile (default 4; larger batches run in chunks);
            ``cache_dir`` folder (or bundle ``*.onnx`` path) for the engine cache (``None`` builds in memory);
            ``device`` the CUDA device (the calling thread's current device is set to it). ``threads`` and
            ``low_memory`` are ignored.
        cuda_graph: capture ``execute_async_v3`` for ``max_batch`` into a CUDA graph (fallback: plain calls).
        workspace_bytes: TensorRT workspace pool limit (default: TensorRT's).
    """

    name = "tensorrt"

    def __init__(
        self,
        model: bytes,
        *,
        channels: int,
        patch_size: Sequence[int],
        input_name: str = "image",
        options: BackendOptions = BackendOptions(),
        cuda_graph: bool = True,
        workspace_bytes: int | None = None,
    ) -> None:
        super().__init__(channels=channels, patch_size=patch_size, options=options)
        precision = options.resolve_precision(self.name, ("fp16", "fp32"))
        max_batch = DEFAULT_MAX_BATCH if options.max_batch is None else options.max_batch
        cache_dir, device_id = options.cache_dir, options.device
        self._buffers: list[tuple[str, Any]] = []  # (kind, pointer) freed by close()
        self._graph_exec: Any = None
        self._graph: Any = None
        self._stream: Any = None
        self.context: Any = None
        self.engine: Any = None
        self._runtime: Any = None

        trt = import_optional("tensorrt", package="tensorrt", extra="trt", purpose=PURPOSE)
        cudart = import_cudart()
        self._trt, self._cudart = trt, cudart
        self.gpu_name = cuda_device_name(cudart, device_id)
        _cuda_call(cudart, "cudaSetDevice", cudart.cudaSetDevice(device_id))
        try:
            output_names = _onnx_wire.graph_output_names(model)
        except ValueError as exc:
            raise BackendError(f"tensorrt backend: not a valid ONNX model ({exc})") from exc
        network = network_bytes(model, precision)  # the loader's graph: the bundle, or its FP16 graph
        self.precision, self.max_batch, self.device_id = precision, int(max_batch), device_id
        self.input_name, self.output_names = input_name, list(output_names)
        self._logger = trt_logger(trt)  # must outlive the runtime and engine
        sample_shape = (self.channels, *self.patch_size)
        self.cache_path = cache_path_for(cache_dir, network, trt_version=str(trt.__version__),
                                         gpu_name=self.gpu_name, precision=precision, max_batch=self.max_batch)
        self._runtime = trt.Runtime(self._logger)
        self.engine = load_engine(trt, self._runtime, self._logger, network, cache_path=self.cache_path,
                                  input_name=self.input_name, sample_shape=sample_shape, max_batch=self.max_batch,
                                  precision=precision, gpu_name=self.gpu_name, workspace_bytes=workspace_bytes)
        del network
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (out of GPU memory?)")
        try:
            self._allocate(sample_shape)
            self._stream = _cuda_call(cudart, "cudaStreamCreateWithFlags",
                                      cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
            self._stream_handle = int(self._stream)
            if cuda_graph:
                self._capture()
        except BaseException:
            self.close()
            raise
        log.debug("tensorrt %s on %s: %s, max batch %d, CUDA graph %s, cache %s", trt.__version__, self.gpu_name,
                  precision, self.max_batch, self._graph_exec is not None, self.cache_path)

    # -- construction ------------------------------------------------------------------------------------

    def _malloc(self, kind: str, nbytes: int) -> int:
        """``nbytes`` of device memory (``kind="device"``) or pinned host memory (``"host"``), freed by close()."""
        cudart = self._cudart
        if kind == "device":
            pointer = _cuda_call(cudart, "cudaMalloc", cudart.cudaMalloc(nbytes))
        else:
            pointer = _cuda_call(cudart, "cudaMallocHost", cudart.cudaMallocHost(nbytes))
        self._buffers.append((kind, pointer))
        return int(pointer)

    def _allocate(self, sample_shape: Sequence[int]) -> None:
        trt, engine, context = self._trt, self.engine, self.context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        outputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT}
        if self.input_name not in names or outputs != set(self.output_names):
            raise BackendError(f"the TensorRT engine's tensors {names} do not match the bundle's input "
                               f"'{self.input_name}' and outputs {self.output_names}")
        for name in names:
            if trt.nptype(engine.get_tensor_dtype(name)) != np.float32:
                raise BackendError(f"TensorRT tensor '{name}' is {engine.get_tensor_dtype(name)}, expected float32")
        full = (self.max_batch, *sample_shape)
        if not context.set_input_shape(self.input_name, full):
            raise BackendError(f"TensorRT refuses the input shape {full}")
        self._shapes = {self.input_name: full}
        self._shapes.update({n: tuple(context.get_tensor_shape(n)) for n in self.output_names})
        self._device: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        for name, shape in self._shapes.items():
            if not shape or shape[0] != self.max_batch or any(d < 0 for d in shape):
                raise BackendError(f"TensorRT output '{name}' has shape {shape}; expected ({self.max_batch}, ...)")
            nbytes = 4 * math.prod(shape)
            self._device[name] = self._malloc("device", nbytes)
            self._host[name] = _host_array(self._malloc("host", nbytes), shape)
            if not context.set_tensor_address(name, self._device[name]):
                raise BackendError(f"TensorRT refuses the device address of tensor '{name}'")

    def _capture(self) -> None:
        """Record ``execute_async_v3`` at ``max_batch`` into a CUDA graph; on any failure keep plain execution."""
        cudart, context = self._cudart, self.context
        try:
            if not context.execute_async_v3(self._stream_handle):  # TensorRT's lazy setup happens outside capture
                raise BackendError("execute_async_v3 failed before capture")
            _cuda_call(cudart, "cudaStreamSynchronize", cudart.cudaStreamSynchronize(self._stream))
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            _cuda_call(cudart, "cudaStreamBeginCapture", cudart.cudaStreamBeginCapture(self._stream, mode))
            try:
                enqueued = context.execute_async_v3(self._stream_handle)
            finally:
                self._graph = _cuda_call(cudart, "cudaStreamEndCapture", cudart.cudaStreamEndCapture(self._stream))
            if not enqueued:
                raise BackendError("execute_async_v3 failed during capture")
            self._graph_exec = _cuda_call(cudart, "cudaGraphInstantiate", cudart.cudaGraphInstantiate(self._graph, 0))
        except Exception as exc:  # noqa: BLE001 - CUDA errors or whatever TensorRT raises: fall back, say why
            log.info("CUDA graph capture is not possible for this engine (%s); using execute_async_v3", exc)
            self._destroy_graph()
            cudart.cudaGetLastError()  # clear a sticky capture error

    # -- inference ---------------------------------------------------------------------------------------

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.context is None:
            raise BackendError("the tensorrt backend was closed")
        parts = [self._run_chunk(batch[i:i + self.max_batch]) for i in range(0, batch.shape[0], self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}

    def _run_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        cudart, context, n = self._cudart, self.context, chunk.shape[0]
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_in = self._host[self.input_name]
        host_in[:n] = chunk
        _cuda_call(cudart, "cudaMemcpyAsync", cudart.cudaMemcpyAsync(
            self._device[self.input_name], host_in.ctypes.data, host_in[:n].nbytes, to_device, self._stream))
        if n == self.max_batch and self._graph_exec is not None:
            _cuda_call(cudart, "cudaGraphLaunch", cudart.cudaGraphLaunch(self._graph_exec, self._stream))
        else:
            if not context.set_input_shape(self.input_name, (n, *self._shapes[self.input_name][1:])):
                raise BackendError(f"TensorRT refuses a batch of {n}")
            if not context.execute_async_v3(self._stream_handle):
                raise BackendError("TensorRT inference failed (execute_async_v3; its log says why)")
        for name in self.output_names:
            host = self._host[name]
            _cuda_call(cudart, "cudaMemcpyAsync", cudart.cudaMemcpyAsync(
                host.ctypes.data, self._device[name], host[:n].nbytes, to_host, self._stream))
        _cuda_call(cudart, "cudaStreamSynchronize", cudart.cudaStreamSynchronize(self._stream))
        return {name: self._host[name][:n].copy() for name in self.output_names}

    # -- cleanup -----------------------------------------------------------------------------------------

    def _destroy_graph(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        if self._graph_exec is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
            self._graph_exec = None
        if self._graph is not None:
            cudart.cudaGraphDestroy(self._graph)
            self._graph = None

    def close(self) -> None:
        """Free the CUDA graph, context, engine, buffers and stream (safe to call twice)."""
        self._destroy_graph()
        self.context = None
        self.engine = None
        self._runtime = None
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for kind, pointer in reversed(self._buffers):
            err = (cudart.cudaFree if kind == "device" else cudart.cudaFreeHost)(pointer)[0]
            if int(err) != 0:
                log.warning("freeing a TensorRT %s buffer failed: %s", kind, _cuda_error_text(cudart, err))
        self._buffers = []
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
