"""onnxruntime CPU backend.

``low_memory=True`` turns onnxruntime's CPU memory arena off. The arena keeps every block it ever allocated for
reuse; over a sliding window on a 3d_fullres-sized network it grew the process's peak RSS by ~615 MB (1985 vs
1369 MB on a 120 x 384 x 384 CT, 30.8 M-parameter net, 72 patches, ``benchmarks/results/e2e_cpu_fullres.*``)
for a run 1.5 % shorter there (380 vs 386 s) and 7.7 % shorter in a second measurement (363 vs 391 s).
Arena on by default (speed first); ``low_memory`` for memory-bound machines. onnxruntime's memory pattern (one
planned block per run) stays on for small patches only and is off with ``low_memory``:
:func:`~segsentry.runtime.backends.ort_loader.cpu_memory_pattern` has the measurements.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segsentry.errors import BackendError, first_line
from segsentry.runtime.backends.base import BackendBase
from segsentry.runtime.backends.options import BackendOptions
from segsentry.runtime.backends.ort_loader import cpu_session


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
        """Uses ``options.threads`` and ``options.low_memory`` (and ``patch_size`` for the memory pattern); runs
        ``precision="fp32"`` only; ignores the rest."""
        super().__init__(channels=channels, patch_size=patch_size, options=options)
        options.resolve_precision(self.name, ("fp32",))
        self.low_memory = options.low_memory
        self.session = cpu_session(model, options, patch_size=self.patch_size)
        self.input_name = input_name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        try:
            values = self.session.run(self.output_names, {self.input_name: batch})
        except Exception as exc:
            raise BackendError(f"onnxruntime inference failed: {first_line(exc)}") from exc
        return dict(zip(self.output_names, values))
