"""onnxruntime GPU backend (the ``gpu`` extra, ``onnxruntime-gpu``): CUDA execution provider, TensorRT EP optional.

The session is created with ``CUDAExecutionProvider`` (``device_id``; ``cudnn_conv_algo_search=EXHAUSTIVE`` and
``cudnn_conv_use_max_workspace=1``, which decide the speed of 3D convolutions; ``use_tf32=0`` so ``fp32``
means float32, as on the CPU) and, with ``use_trt_ep=True``, ``TensorrtExecutionProvider`` in front of it (engine
cache in ``cache_dir`` when given). The CPU provider is never listed: after the session is created its active
providers are checked, and a session that lost the CUDA provider (no GPU, missing CUDA/cuDNN libraries) is
refused with a :class:`~segsentry.errors.BackendError` instead of silently running on the CPU.

``precision="fp16"`` runs the graph from :func:`segsentry.runtime.backends.fp16.to_mixed_fp16` (FP16 network,
FP32 normalisations and Mahalanobis head, float32 inputs and outputs). The TensorRT EP then gets
``trt_fp16_enable=False`` on purpose: FP16 comes from the graph's explicit types; the flag would let
TensorRT 10's weak typing pick FP16 kernels for the FP32 head as well (and TensorRT 11 removed it).

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
from pathlib import Path
from typing import Any

import numpy as np

from segsentry.errors import BackendError, MissingDependencyError, first_line
from segsentry.runtime.backends.base import BackendBase, import_optional
from segsentry.runtime.backends.onnxruntime import session_options
from segsentry.runtime.backends.options import BackendOptions, Precision

log = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
PURPOSE = ("The ort-gpu backend (onnxruntime's CUDA execution provider, on an NVIDIA CUDA GPU; onnxruntime-gpu "
           "replaces the CPU-only onnxruntime package)")


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
        precision = options.precision_or("fp32")
        ort = import_optional("onnxruntime", package="onnxruntime-gpu", extra="gpu", purpose=PURPOSE)
        available = ort.get_available_providers()
        if CUDA_EP not in available:
            raise MissingDependencyError("onnxruntime-gpu", "gpu", PURPOSE)
        if use_trt_ep and TRT_EP not in available:
            raise MissingDependencyError("onnxruntime-gpu", "gpu", "The ort-gpu backend's TensorRT provider")
        if precision == "fp16":
            from segsentry.runtime.backends.fp16 import mixed_fp16_bytes

            model = mixed_fp16_bytes(model, extra="gpu")
        providers = provider_list(device_id=device_id, precision=precision, use_trt_ep=use_trt_ep,
                                  cache_dir=cache_dir)
        options = session_options(ort, threads=threads)  # errors-only logging: a provider failing is an error
        try:
            self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime-gpu cannot load the bundle on CUDA device {device_id}: "
                               f"{first_line(exc)}") from exc
        active = self.session.get_providers()
        wanted = [name for name, _ in providers]
        if any(name not in active for name in wanted):
            raise BackendError(
                f"onnxruntime-gpu could not start {', '.join(n for n in wanted if n not in active)} on device "
                f"{device_id} (active: {', '.join(active)}): no usable CUDA GPU, or the CUDA / cuDNN"
                f"{' / TensorRT' if use_trt_ep else ''} libraries it needs are missing (onnxruntime logged the "
                "reason above). Not falling back to the CPU; use --backend onnxruntime for CPU inference"
            )
        self.input_name = input_name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.precision = precision
        self.device_id = device_id
        self._io = DeviceIoBinding(ort, self.session, input_name=input_name, output_names=self.output_names,
                                   device_type="cuda", device_id=device_id)
        log.debug("ort-gpu: onnxruntime %s on device %d with %s (%s)", ort.__version__, device_id, active, precision)

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

