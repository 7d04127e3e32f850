"""onnxruntime CPU backend.

``low_memory=True`` turns onnxruntime's CPU memory arena off. The arena keeps every block it ever allocated for
reuse; over a sliding window on a 3d_fullres-sized network it grew the process's peak RSS by ~615 MB (1985 vs
1369 MB on a 120 x 384 x 384 CT, 30.8 M-parameter net, 72 patches, ``benchmarks/results/e2e_cpu_fullres.*``)
for a run 1.5 % shorter there (380 vs 386 s) and 7.7 % shorter in a second measurement (363 vs 391 s).
Arena on by default (speed first); ``low_memory`` for memory-bound machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from segsentry.errors import BackendError, first_line
from segsentry.runtime.backends.base import BackendBase
from segsentry.runtime.backends.options import BackendOptions


def session_options(ort: ModuleType, *, threads: int | None, low_memory: bool = False) -> Any:
    """``SessionOptions`` shared by the onnxruntime backends (CPU here, CUDA in ``ort_gpu``): all graph
    optimisations, ``threads`` intra-op threads (None: onnxruntime's default), errors-only logging, and the CPU
    memory arena unless ``low_memory``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = not low_memory
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


class OnnxruntimeBackend(BackendBase):
    """onnxruntime ``InferenceSession`` on the CPU execution provider."""

    name = "onnxruntime"

    def __init__(
        self,
        model: bytes,
        *,
        channels: int,
        patch_size: Sequence[int],
        input_name: str = "image",
        options: BackendOptions = BackendOptions(),
    ) -> None:
        """Uses ``options.threads`` and ``options.low_memory``; refuses ``precision="fp16"``; ignores the rest."""
        super().__init__(channels=channels, patch_size=patch_size, options=options)
        options.require_fp32(self.name)
        import onnxruntime as ort

        self.low_memory = options.low_memory
        session = session_options(ort, threads=options.threads, low_memory=options.low_memory)
        try:
            self.session = ort.InferenceSession(model, sess_options=session, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime cannot load the bundle: {first_line(exc)}") from exc
        self.input_name = input_name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.output_names, {self.input_name: batch})
        except Exception as exc:
            raise BackendError(f"onnxruntime inference failed: {first_line(exc)}") from exc
        return dict(zip(self.output_names, values))
