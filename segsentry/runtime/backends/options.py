"""The one typed options object every backend takes (after TorchIO's explicit, keyword-only configuration).

What each backend does with each field. An option a backend has no use for is ignored where that is
harmless; one that running anyway would contradict is refused with a :class:`~segsentry.errors.BackendError`.

* ``threads``: onnxruntime and ort-gpu intra-op threads; openvino ``INFERENCE_NUM_THREADS``; torch
  ``torch.set_num_threads`` (process-wide); ignored by tensorrt.
* ``low_memory``: onnxruntime turns its CPU memory arena and its memory pattern off; ignored by the others (no
  such switch).
* ``cache_dir``: tensorrt's engine cache; ort-gpu's TensorRT-provider engine cache (with ``use_trt_ep``);
  ignored by the CPU engines (they build nothing worth caching).
* ``device``: the CUDA device of ort-gpu and tensorrt, and of torch with ``cuda=True``; ignored on the CPU.
* ``precision``: tensorrt ``fp16`` (default) or ``fp32``; ort-gpu ``fp32`` (default) or ``fp16``; torch
  ``fp32`` (default) or ``fp16`` autocast on CUDA only; openvino ``fp32`` (default) or ``bf16`` on a CPU with
  native bfloat16 (AVX512_BF16 or AMX); onnxruntime ``fp32`` only. Any other precision is refused.
* ``max_batch``: tensorrt's optimisation-profile maximum (default 4; larger batches run in chunks); ignored by
  the others, whose batch axis is dynamic.

``fp16`` everywhere means the FP16 network with FP32 normalisations and an FP32 Mahalanobis head, float32
inputs and outputs (:func:`segsentry.runtime.backends.fp16.to_mixed_fp16`; autocast for torch). ``bf16``
means OpenVINO's bfloat16 inference precision for the network (its convolutions and, by OpenVINO's choice, most
instance normalisations, which accumulate in float32), with the Mahalanobis head compiled apart in float32.
Asking an engine for a precision it does not run is an error, never a silent float32 run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from segsentry.errors import BackendError

Precision = Literal["fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class BackendOptions:
    """Engine settings shared by every backend; each backend documents which it uses (table above).

    Attributes:
        threads: CPU threads for the engine (``None``: the engine's default, usually every core).
        low_memory: trade speed for peak memory where the engine has such a switch.
        cache_dir: where engines built for this machine are cached: a folder, or a bundle ``*.onnx`` path
            (the cache then lies beside the bundle). ``None``: nothing is cached, engines are built in memory.
        device: CUDA device index for the GPU engines (``0``: the first device the driver lists, after
            ``CUDA_VISIBLE_DEVICES``).
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``; ``None`` means the backend's default (``fp16`` for
            tensorrt, ``fp32`` for every other backend).
        max_batch: the largest batch an engine with a fixed batch range is built for (tensorrt; ``None``: its
            default of 4). Larger batches still run, in chunks.
    """

    threads: int | None = None
    low_memory: bool = False
    cache_dir: Path | None = None
    device: int = 0
    precision: Precision | None = None
    max_batch: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise BackendError(f"backend threads must be a positive number or None, got {self.threads!r}")
        if not _is_int(self.device) or self.device < 0:
            raise BackendError(f"CUDA device must be an index >= 0, got {self.device!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {', '.join(PRECISIONS)} (or None for the backend's "
                               f"default), got {self.precision!r}")
        if self.max_batch is not None and (not _is_int(self.max_batch) or self.max_batch < 1):
            raise BackendError(f"max batch must be at least 1, got {self.max_batch!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    def resolve_precision(self, backend: str, supported: tuple[Precision, ...]) -> Precision:
        """The precision ``backend`` runs: ``precision``, or ``supported[0]`` (the backend's default) when it is
        ``None``; a precision outside ``supported`` raises :class:`BackendError` saying which engine runs it."""
        if self.precision is None:
            return supported[0]
        if self.precision not in supported:
            where = {"fp16": "a GPU backend (--backend tensorrt or ort-gpu)",
                     "bf16": "--backend openvino on a CPU with AVX512_BF16 or AMX"}[self.precision]
            raise BackendError(f"the {backend} backend runs {' or '.join(supported)}, not {self.precision!r}; "
                               f"{self.precision} needs {where}")
        return self.precision

__all__ = ["PRECISIONS", "BackendOptions", "Precision"]
