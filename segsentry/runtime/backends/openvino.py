"""OpenVINO CPU backend (the ``openvino`` extra).

The bundle bytes are read by OpenVINO's ONNX frontend (from memory, or from a temporary file where the
installed OpenVINO cannot read ONNX bytes), the input is reshaped to ``(1, channels, *patch_size)`` and compiled
for ``CPU`` with f32 inference precision, so results match onnxruntime on CPUs where OpenVINO would otherwise
default to bf16 (AMX / AVX512-BF16).

One patch per inference, a fully static shape: OpenVINO then plans the activations' memory once. On the 30.8 M-
parameter fullres net (64 × 128 × 128) that peaks 90 MB lower than a dynamic batch axis (909 vs 999 MB for the
process, the same seconds per patch, outputs equal bit for bit); on the demo net batches of 4 gained nothing over
single patches. A batch of ``n`` patches is ``n`` inferences on the one request (latency hint) or on the
asynchronous queue (throughput hint), outputs stacked in batch order.

``precision="bf16"`` (an explicit choice, never the default) compiles the network with bf16 inference
precision and the fused Mahalanobis head apart, in f32: OpenVINO has one precision per compiled model and ran
the head's basis projection in bf16 when it was one graph (its runtime model said so), and the head subtracts
two large sums, which bf16's 8-bit mantissa would spoil. The bundle is cut at the head's boundary
(:func:`segsentry.graph.head_boundary`, the pooled features), each call runs the network, then the head on its
features. Refused on a CPU without native bf16 (OpenVINO's ``OPTIMIZATION_CAPABILITIES`` lists no ``BF16``):
it would be emulated, slower than f32.

``performance_hint="latency"`` (default): one infer request, reused for every batch, all threads on one
inference. ``"throughput"``: OpenVINO sizes its CPU streams to the cores (``NUM_STREAMS`` is read back into
``streams``) and an ``AsyncInferQueue`` of ``OPTIMAL_NUMBER_OF_INFER_REQUESTS`` requests runs the patches of a
batch concurrently, one patch per request, results put back in batch order; a batch of one patch runs on one
request (one stream's threads), so throughput mode pays off only with batches of at least ``requests``
patches (``preferred_batch``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from segsentry import _onnx_wire
from segsentry.errors import BackendError, first_line
from segsentry.runtime.backends.base import BackendBase, check_batch, import_optional
from segsentry.runtime.backends.options import BackendOptions

log = logging.getLogger(__name__)

PerformanceHint = Literal["latency", "throughput"]
DEVICE = "CPU"


def _read_model(core: Any, model: bytes) -> Any:
    """``core.read_model`` from memory; fall back to a temporary ``.onnx`` file for OpenVINO builds without it."""
    try:
        return core.read_model(model=model)
    except Exception as first:  # OpenVINO raises RuntimeError/TypeError depending on version
        log.debug("OpenVINO cannot read the ONNX bytes from memory (%s); using a temporary file", first_line(first))
    fd, path = tempfile.mkstemp(suffix=".onnx", prefix="segsentry-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(model)
        return core.read_model(path)
    except Exception as exc:
        raise BackendError(f"OpenVINO cannot read the bundle: {first_line(exc)}") from exc
    finally:
        os.unlink(path)


def cpu_capabilities(core: Any) -> list[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of its CPU device (``"FP32"``, ``"BF16"``, ``"INT8"``, ...)."""
    try:
        return [str(c) for c in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]
    except Exception as exc:
        raise BackendError(f"OpenVINO cannot report its CPU's capabilities: {first_line(exc)}") from exc


def _require_native_bf16(core: Any) -> None:
    """Refuse bf16 where OpenVINO's CPU device has no native bfloat16 (it would emulate it, slower than f32)."""
    capabilities = cpu_capabilities(core)
    if "BF16" not in capabilities:
        raise BackendError("precision 'bf16' needs a CPU with native bfloat16 (AVX512_BF16 or AMX); OpenVINO lists "
                           f"{', '.join(capabilities) or 'nothing'} for this one: use precision 'fp32'")


def split_head(ov: Any, model: Any) -> tuple[Any, Any | None, list[str]]:
    """``(network, head, boundary)``: the OpenVINO ``model`` read from a bundle, cut where its fused head reads
    the network, as two ``ov.Model`` s built on the same nodes (no copy of the graph or its weights is made).

    The head is what :mod:`segsentry.graph.scope` calls the head, found in OpenVINO's graph (its ONNX frontend
    keeps the ONNX names): every node named in :data:`segsentry.contract.HEAD_SCOPE` or reading such a tensor,
    and every node downstream of those. ``network`` computes every graph output outside the head plus the
    ``boundary`` tensors the head reads (the pooled features, in order of first use); ``head`` computes the
    head's graph outputs (``distance``, per-tap distances) from one parameter per boundary tensor, its batch
    axis left open. ``model`` itself is rewired and must not be used afterwards. A model without a head comes
    back whole: ``(model, None, [])``.
    """
    from segsentry._head_split import in_head_scope

    opset = import_optional("openvino.opset13", package="openvino", extra="openvino", purpose="The OpenVINO backend")
    head: set[int] = set()
    for op in model.get_ordered_ops():  # topological order: one sweep reaches everything downstream
        if op.get_type_name() in ("Parameter", "Result"):
            continue
        sources = [port.get_source_output() for port in op.inputs()]
        if (in_head_scope(op.get_friendly_name())
                or any(in_head_scope(name) for src in sources for name in src.get_names())
                or any(src.get_node().get_instance_id() in head for src in sources)):
            head.add(op.get_instance_id())
    if not head:
        return model, None, []
    boundary: dict[tuple[int, int], Any] = {}  # (node, port) -> the network tensor the head reads
    readers: list[tuple[Any, tuple[int, int]]] = []
    for op in model.get_ordered_ops():
        if op.get_instance_id() not in head:
            continue
        for port in op.inputs():
            src = port.get_source_output()
            node = src.get_node()
            if node.get_instance_id() in head or node.get_type_name() == "Constant":
                continue
            if node.get_type_name() == "Parameter":
                raise BackendError("OpenVINO: the bundle's head reads a graph input directly; it cannot be "
                                   "compiled apart from the network")
            key = (node.get_instance_id(), src.get_index())
            boundary.setdefault(key, src)
            readers.append((port, key))
    names = [src.get_any_name() for src in boundary.values()]
    results = list(model.get_results())
    in_head = [r.input(0).get_source_output().get_node().get_instance_id() in head for r in results]
    network_results = [r for r, h in zip(results, in_head) if not h]
    network_results += [opset.result(src) for src in boundary.values()]
    parameters = {}
    for key, src in boundary.items():
        shape = src.get_partial_shape()
        parameters[key] = opset.parameter(ov.PartialShape([ov.Dimension(), *list(shape)[1:]]), src.get_element_type(),
                                          name=src.get_any_name())
        parameters[key].output(0).set_names({src.get_any_name()})
    for port, key in readers:
        port.replace_source_output(parameters[key].output(0))
    network = ov.Model(network_results, list(model.get_parameters()), "network")
    head_model = ov.Model([r for r, h in zip(results, in_head) if h], list(parameters.values()), "ood_head")
    return network, head_model, names


class OpenvinoBackend(BackendBase):
    """OpenVINO ``CompiledModel`` on the CPU device, with one reused ``InferRequest``.

    ``run(batch)``: ``batch`` is ``(n, channels, *patch_size)`` float32 with any ``n >= 1``; returns every graph
    output keyed by its ONNX name as float32 arrays with the batch axis first (e.g. ``logits``
    ``(n, classes, *patch_size)``, ``distance`` ``(n,)``, ``features`` ``(n, D)``).
    """

    name = "openvino"

    def __init__(
        self,
        model: bytes,
        *,
        channels: int,
        patch_size: Sequence[int],
        input_name: str = "image",
        options: BackendOptions = BackendOptions(),
        performance_hint: PerformanceHint = "latency",
        streams: int | None = None,
    ) -> None:
        """Uses ``options.threads`` and ``options.precision`` (``fp32`` default, or ``bf16``); ignores the rest.
        ``performance_hint`` (``"latency"`` or ``"throughput"``) is OpenVINO's own setting; ``streams``
        (throughput only; ``None``: OpenVINO sizes them to the cores) fixes ``NUM_STREAMS``."""
        super().__init__(channels=channels, patch_size=patch_size, options=options)
        self.precision = options.resolve_precision(self.name, ("fp32", "bf16"))
        threads = options.threads
        if performance_hint not in ("latency", "throughput"):
            raise BackendError(f"OpenVINO performance hint must be 'latency' or 'throughput', got {performance_hint!r}")
        if streams is not None and (performance_hint != "throughput" or not isinstance(streams, int) or streams < 1):
            raise BackendError(f"OpenVINO streams must be a positive number with the throughput hint, got {streams!r} "
                               f"with the {performance_hint} hint")
        ov = import_optional("openvino", package="openvino", extra="openvino", purpose="The OpenVINO backend")
        try:
            output_names = _onnx_wire.graph_output_names(model)
        except ValueError as exc:
            raise BackendError(f"OpenVINO backend: not a valid ONNX model ({exc})") from exc

        core = ov.Core()
        if self.precision == "bf16":
            _require_native_bf16(core)
        network = _read_model(core, model)
        inputs = {name for port in network.inputs for name in port.get_names()}
        if input_name not in inputs:
            raise BackendError(f"the bundle has no input '{input_name}' (inputs: {', '.join(sorted(inputs))})")
        try:
            network.reshape({input_name: ov.PartialShape([1, self.channels, *self.patch_size])})
        except Exception as exc:
            raise BackendError(
                f"OpenVINO cannot give input '{input_name}' the shape (1, {self.channels}, "
                f"{', '.join(map(str, self.patch_size))}): {first_line(exc)}"
            ) from exc
        try:
            network, head_model, self._boundary = split_head(ov, network)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"OpenVINO cannot cut the bundle at its head: {first_line(exc)}") from exc
        self.head_apart = head_model is not None
        config: dict[str, str] = {
            "PERFORMANCE_HINT": performance_hint.upper(),
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        if streams:
            config["NUM_STREAMS"] = str(int(streams))
        try:
            self.compiled = core.compile_model(network, DEVICE, config)
            self._head = None
            if head_model is not None:
                head_config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
                if threads:
                    head_config["INFERENCE_NUM_THREADS"] = str(int(threads))
                self._head = core.compile_model(head_model, DEVICE, head_config)
                self._head_request = self._head.create_infer_request()
                self._head_outputs = [(port.get_any_name(), port) for port in self._head.outputs]
            produced = {name for port in self.compiled.outputs for name in port.get_names()}
            self._outputs = [(name, self.compiled.output(name)) for name in output_names if name in produced]
            self._outputs += [(name, self.compiled.output(name)) for name in self._boundary
                              if name not in output_names]
            self._input = self.compiled.input(input_name)
            self._request = self.compiled.create_infer_request()
            self.streams = int(self.compiled.get_property("NUM_STREAMS"))
            self.requests = 1
            self._queue = None
            if performance_hint == "throughput":
                self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
                if self.requests > 1:
                    self._queue = ov.AsyncInferQueue(self.compiled, self.requests)
        except Exception as exc:
            raise BackendError(f"OpenVINO cannot compile the bundle for {DEVICE}: {first_line(exc)}") from exc
        self.input_name = input_name
        self.output_names = list(output_names)
        self.performance_hint = performance_hint
        self.preferred_batch = self.requests
        log.debug("OpenVINO %s: compiled for %s (%s, %s hint, threads=%s, %d stream(s), %d request(s))",
                  ov.__version__, DEVICE, self.precision, performance_hint, threads or "auto", self.streams,
                  self.requests)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self._run_head(self._run_network(batch))

    def run_network(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The network's graph outputs (logits) and the boundary tensors, without running the head."""
        return self._run_network(check_batch(batch, channels=self.channels, patch_size=self.patch_size))

    def _run_network(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._request is None:
            raise BackendError("the OpenVINO backend was closed")
        try:
            if self._queue is not None and batch.shape[0] > 1:
                return self._run_async(batch)
            return self._run_each(batch)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"OpenVINO inference failed: {first_line(exc)}") from exc

    def _run_each(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The patches one after another on the one request (the engine's shape is one patch)."""
        parts = []
        for i in range(batch.shape[0]):
            self._request.infer({self._input: batch[i:i + 1]})
            parts.append(self._copy_outputs(self._request))
        return self._stacked(parts)

    def _copy_outputs(self, request: Any) -> dict[str, np.ndarray]:
        """The request's output tensors, copied out as float32 (the request is reused for the next patch)."""
        return {name: np.array(request.get_tensor(port).data, dtype=np.float32, copy=True)
                for name, port in self._outputs}

    def _stacked(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """One patch's outputs per part, in batch order, stacked along the batch axis (one part: as it is)."""
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name, _ in self._outputs}

    def _run_head(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The head (compiled apart) on the network's boundary tensors; returns the graph outputs."""
        if self._head is None:
            return outputs
        try:
            results = self._head_request.infer({name: outputs[name] for name in self._boundary})
        except Exception as exc:
            raise BackendError(f"OpenVINO inference failed in the head: {first_line(exc)}") from exc
        outputs.update({name: np.array(results[port], dtype=np.float32, copy=True)
                        for name, port in self._head_outputs})
        return {name: outputs[name] for name in self.output_names}

    def _run_async(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One patch per infer request of the queue, all in flight together; outputs stacked in batch order."""
        parts: list[dict[str, np.ndarray] | None] = [None] * batch.shape[0]
        errors: list[BaseException] = []

        def done(request: Any, index: int) -> None:
            try:
                parts[index] = self._copy_outputs(request)
            except Exception as exc:  # noqa: BLE001 - reported below, in the calling thread
                errors.append(exc)

        self._queue.set_callback(done)
        for i in range(batch.shape[0]):
            self._queue.start_async({self._input: batch[i:i + 1]}, i)
        self._queue.wait_all()
        if errors or any(p is None for p in parts):
            raise BackendError(f"OpenVINO asynchronous inference failed: "
                               f"{first_line(errors[0]) if errors else 'a request returned nothing'}")
        return self._stacked(parts)

    def close(self) -> None:
        self._queue = None
        self._request = None
        self._head_request = None
        self._head = None
        self._outputs = []
        self.compiled = None
