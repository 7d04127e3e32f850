"""onnxruntime CPU backend."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segsentry.errors import BackendError
from segsentry.runtime.backends.base import BackendBase


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
        threads: int | None = None,
    ) -> None:
        super().__init__(channels=channels, patch_size=patch_size)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime cannot load the bundle: {str(exc).splitlines()[0]}") from exc
        self.input_name = input_name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.output_names, {self.input_name: batch})
        except Exception as exc:
            raise BackendError(f"onnxruntime inference failed: {str(exc).splitlines()[0]}") from exc
        return dict(zip(self.output_names, values))
