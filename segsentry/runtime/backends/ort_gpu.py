"""onnxruntime GPU backend (the ``gpu`` extra, ``onnxruntime-gpu``): the runner.

The session comes from :func:`segsentry.runtime.backends.ort_loader.gpu_session`: the CUDA execution provider
(TensorRT EP in front of it with ``use_trt_ep``), the FP16 graph for ``precision="fp16"``, and a check that
the session really runs on CUDA (no silent CPU fallback). This module owns the session and its device IO
binding and releases them in ``close()``.

Each ``run`` copies the batch once into a CUDA ``OrtValue`` (reused while the batch shape stays the same),
binds the outputs to the device and copies them back after the run (:class:`DeviceIoBinding`).

Run on this machine (no GPU): the error raised when onnxruntime has no CUDA provider, and
:class:`DeviceIoBinding` on the CPU device against ``session.run``. Never run on GPU hardware so far: the
session with the CUDA / TensorRT providers, the provider check and the CUDA copies; the ``gpu``-marked tests in
``tests/runtime/test_ort_gpu.py`` do that where a CUDA GPU and onnxruntime-gpu exist.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from segsentry.errors import BackendError, first_line
from segsentry.runtime.backends.base import BackendBase
from segsentry.runtime.backends.options import BackendOptions
from segsentry.runtime.backends.ort_loader import CUDA_EP, TRT_EP, gpu_session

log = logging.getLogger(__name__)

class DeviceIoBinding:
    """One IO binding for a session: the input copied once per call to ``device_type``, outputs bound there.

    ``run(batch)`` with a C-contiguous float32 ``batch``: the input ``OrtValue`` on the device is reused (and
    updated in place) while the batch shape is unchanged, otherwise reallocated; outputs are allocated by
    onnxruntime on the device and copied to numpy after the run. ``device_type`` is ``"cuda"`` in the backend;
    ``"cpu"`` works too (that is how it is tested without a GPU).
    """

    def __init__(self, ort: Any, session: Any, *, input_name: str, output_names: Sequence[str],
                 device_type: str = "cuda", device_id: int = 0) -> None:
        self._ort = ort
        self._session = session
        self._binding = session.io_binding()
        self.input_name = input_name
        self.output_names = list(output_names)
        self.device_type = device_type
        self.device_id = device_id
        self._input: Any = None

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._input is not None and tuple(self._input.shape()) == batch.shape:
            self._input.update_inplace(batch)
        else:
            self._input = self._ort.OrtValue.ortvalue_from_numpy(batch, self.device_type, self.device_id)
        self._binding.bind_ortvalue_input(self.input_name, self._input)
        self._binding.clear_binding_outputs()
        for name in self.output_names:
            self._binding.bind_output(name, self.device_type, self.device_id)
        self._binding.synchronize_inputs()
        self._session.run_with_iobinding(self._binding)
        self._binding.synchronize_outputs()
        return dict(zip(self.output_names, self._binding.copy_outputs_to_cpu()))


class OrtGpuBackend(BackendBase):
    """onnxruntime ``InferenceSession`` on CUDA (optionally TensorRT EP first), with device IO binding.

    ``run(batch)``: ``batch`` is ``(n, channels, *patch_size)`` float32 (z, y, x patch axes); returns every graph
    output keyed by its ONNX name as float32 numpy arrays with the batch axis first.
    """

    name = "ort-gpu"

    def __init__(
        self,
        model: bytes,
        *,
        channels: int,
        patch_size: Sequence[int],
        input_name: str = "image",
        options: BackendOptions = BackendOptions(),
        use_trt_ep: bool = False,
    ) -> None:
        """Uses ``options.threads``, ``device``, ``precision`` (default ``fp32``) and, with ``use_trt_ep``,
        ``cache_dir``; ignores ``low_memory`` and ``max_batch``."""
        super().__init__(channels=channels, patch_size=patch_size, options=options)
        threads, device_id, cache_dir = options.threads, options.device, options.cache_dir
        precision = options.resolve_precision(self.name, ("fp32", "fp16"))
        self.session = gpu_session(model, device_id=device_id, precision=precision, use_trt_ep=use_trt_ep,
                                   cache_dir=cache_dir, threads=threads)  # the loader: graph, providers, checks
        import onnxruntime as ort  # imported by the loader already

        self.input_name = input_name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.precision = precision
        self.device_id = device_id
        self._io = DeviceIoBinding(ort, self.session, input_name=input_name, output_names=self.output_names,
                                   device_type="cuda", device_id=device_id)
        log.debug("ort-gpu: onnxruntime %s on device %d with %s (%s)", ort.__version__, device_id,
                  self.session.get_providers(), precision)

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._io is None:
            raise BackendError("the ort-gpu backend was closed")
        try:
            return self._io.run(batch)
        except Exception as exc:
            raise BackendError(f"onnxruntime-gpu inference failed: {first_line(exc)}") from exc

    def close(self) -> None:
        self._io = None
        self.session = None

