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

import dataclasses
from collections.abc import Sequence

import numpy as np

from segsentry import _onnx_wire
from segsentry._head_split import split_at_head
from segsentry.errors import BackendError, first_line
from segsentry.runtime.backends.base import BackendBase, check_batch
from segsentry.runtime.backends.options import BackendOptions
from segsentry.runtime.backends.ort_loader import cpu_session


class OnnxruntimeBackend(BackendBase):
    """onnxruntime ``InferenceSession`` on the CPU execution provider, the fused head in a session of its own.

    ``session`` runs the network (every graph output outside the head, plus the pooled features the head reads);
    ``head_session`` the head on those features (:func:`segsentry._head_split.split_at_head`, the bundle cut on
    the protobuf wire). ``run`` runs both; ``run_network`` (a mirrored flip) the network alone, since
    onnxruntime computes every node of a session per call whichever outputs are asked for. A bundle without a
    head, or one that cannot be cut, is one session (``head_session`` None).
    """

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
        try:
            split = split_at_head(model)
            self.output_names = _onnx_wire.graph_output_names(model)
        except ValueError as exc:
            raise BackendError(f"onnxruntime backend: not a valid ONNX model ({exc})") from exc
        self.head_session = None
        self._boundary: list[str] = []
        if split is None:
            self.session = cpu_session(model, options, patch_size=self.patch_size)
        else:
            self.session = cpu_session(split.network, options, patch_size=self.patch_size)
            # one thread: the head is about 1 ms, and a second spinning thread pool slowed the network's calls
            self.head_session = cpu_session(split.head, dataclasses.replace(options, threads=1),
                                            patch_size=self.patch_size)
            self._boundary = split.boundary
            del split  # the network's copy of the bytes; onnxruntime holds its own
        self.head_apart = self.head_session is not None
        self.input_name = input_name
        self._network_outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self._run_network(batch)
        if self.head_session is None:
            return outputs
        try:
            values = self.head_session.run(None, {name: outputs[name] for name in self._boundary})
        except Exception as exc:
            raise BackendError(f"onnxruntime inference failed in the head: {first_line(exc)}") from exc
        outputs.update(zip((o.name for o in self.head_session.get_outputs()), values))
        return {name: outputs[name] for name in self.output_names}

    def run_network(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The network's graph outputs (logits) and the pooled features, without running the head."""
        return self._run_network(check_batch(batch, channels=self.channels, patch_size=self.patch_size))

    def _run_network(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.session is None:
            raise BackendError("the onnxruntime backend was closed")
        try:
            values = self.session.run(self._network_outputs, {self.input_name: batch})
        except Exception as exc:
            raise BackendError(f"onnxruntime inference failed: {first_line(exc)}") from exc
        return dict(zip(self._network_outputs, values))

    def close(self) -> None:
        self.session = None
        self.head_session = None
