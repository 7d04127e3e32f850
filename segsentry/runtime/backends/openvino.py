"""OpenVINO CPU backend (the ``openvino`` extra).

The bundle bytes are read by OpenVINO's ONNX frontend (from memory, or from a temporary file where the
installed OpenVINO cannot read ONNX bytes), the input is reshaped to ``(?, channels, *patch_size)`` (dynamic
batch, static patch) and compiled for ``CPU`` with f32 inference precision, so results match onnxruntime
on CPUs where OpenVINO would otherwise default to bf16 (AMX / AVX512-BF16). One infer request is created at
construction and reused for every batch.
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
from segsentry.runtime.backends.base import BackendBase, import_optional
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
    ) -> None:
        """Uses ``options.threads``; refuses ``precision="fp16"``; ignores the rest. ``performance_hint``
        (``"latency"`` or ``"throughput"``) is OpenVINO's own setting."""
        super().__init__(channels=channels, patch_size=patch_size, options=options)
        options.require_fp32(self.name)
        threads = options.threads
        if performance_hint not in ("latency", "throughput"):
            raise BackendError(f"OpenVINO performance hint must be 'latency' or 'throughput', got {performance_hint!r}")
        ov = import_optional("openvino", package="openvino", extra="openvino", purpose="The OpenVINO backend")
        try:
            output_names = _onnx_wire.graph_output_names(model)
        except ValueError as exc:
            raise BackendError(f"OpenVINO backend: not a valid ONNX model ({exc})") from exc

        core = ov.Core()
        network = _read_model(core, model)
        inputs = {name for port in network.inputs for name in port.get_names()}
        if input_name not in inputs:
            raise BackendError(f"the bundle has no input '{input_name}' (inputs: {', '.join(sorted(inputs))})")
        try:
            network.reshape({input_name: ov.PartialShape([-1, self.channels, *self.patch_size])})
        except Exception as exc:
            raise BackendError(
                f"OpenVINO cannot give input '{input_name}' the shape (?, {self.channels}, "
                f"{', '.join(map(str, self.patch_size))}): {first_line(exc)}"
            ) from exc
        config: dict[str, str] = {
            "PERFORMANCE_HINT": performance_hint.upper(),
            "INFERENCE_PRECISION_HINT": "f32",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        try:
            self.compiled = core.compile_model(network, DEVICE, config)
            self._outputs = [(name, self.compiled.output(name)) for name in output_names]
            self._input = self.compiled.input(input_name)
            self._request = self.compiled.create_infer_request()
        except Exception as exc:
            raise BackendError(f"OpenVINO cannot compile the bundle for {DEVICE}: {first_line(exc)}") from exc
        self.input_name = input_name
        self.output_names = list(output_names)
        self.performance_hint = performance_hint
        log.debug("OpenVINO %s: compiled for %s (%s hint, threads=%s)", ov.__version__, DEVICE,
                  performance_hint, threads or "auto")

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._request is None:
            raise BackendError("the OpenVINO backend was closed")
        try:
            results = self._request.infer({self._input: batch})
            return {name: np.array(results[port], dtype=np.float32, copy=True) for name, port in self._outputs}
        except Exception as exc:
            raise BackendError(f"OpenVINO inference failed: {first_line(exc)}") from exc

    def close(self) -> None:
        self._request = None
        self._outputs = []
        self.compiled = None
