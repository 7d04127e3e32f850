"""The three stages of a case on Ray, as plain functions and one plain class (the driver wraps them with
``ray.remote``): :func:`prepare` (read + preprocess, a CPU task), :class:`EngineWorker` (one engine, an
actor), :func:`write` (scores, maps back to the input geometry, files; a task).

Each stage catches a case's errors itself and hands on a failed :class:`CaseOutcome` instead of its result,
so a bad case costs one stage and is never retried; Ray only retries a stage whose worker process died.
Nothing here writes a file except :func:`write` (through the runtime's atomic writes), so a stage that is
killed and run again leaves nothing behind; :func:`write` writing a case twice writes the same files twice.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segsentry.errors import SegsentryError
from segsentry.manifest import Manifest
from segsentry.runtime.backends import BackendOptions, create_backend
from segsentry.runtime.batch import CaseOptions, CaseOutcome, failed_outcome, prepare_case, write_case
from segsentry.runtime.bundle import Bundle
from segsentry.runtime.io import CaseInput, LoadedCase
from segsentry.runtime.pipeline import VolumeInference, finish_case, infer_volume_for_case
from segsentry.runtime.preprocess import Geometry


@dataclass
class CaseContext:
    """What the write stage needs from the read stage: the case as read (its image for the input guard and the
    QA slices, its geometry reference) and the preprocessing geometry; stage times so far, in seconds."""

    loaded: LoadedCase
    geometry: Geometry
    read_s: float
    preprocess_s: float


def prepare(case: CaseInput, manifest: Manifest, output_dir: Path,
            options: CaseOptions) -> tuple[np.ndarray | CaseOutcome, CaseContext | CaseOutcome]:
    """Read and preprocess ``case``: ``(data (c, Z, Y, X) float32 in network order, context)``, or the failed
    outcome twice."""
    start = time.perf_counter()
    try:
        prepared = prepare_case(case, manifest, options)
        return prepared.take_data(), CaseContext(prepared.loaded, prepared.geometry, prepared.read_s,
                                                 prepared.preprocess_s)
    except Exception as exc:  # noqa: BLE001 - sorted out by the runtime's failed_outcome, as in a serial run
        failed = failed_outcome(case, output_dir, exc, start, raise_unexpected=options.raise_unexpected)
        return failed, failed


class EngineWorker:
    """One engine (one backend instance) for the life of the actor; its thread count is its CPU share.

    A backend that cannot be created is not raised from the constructor (Ray would report an actor death):
    :meth:`ready` returns the reason, and the driver stops the batch with it, as a serial run would.
    """

    def __init__(self, model: bytes, manifest: Manifest, backend_name: str, options: BackendOptions) -> None:
        self.manifest = manifest
        self.busy: str | None = None  # the case being inferred, for status()
        self._lock = threading.Lock()
        self.error: str | None = None
        try:
            self.engine = create_backend(backend_name, model, channels=manifest.num_channels,
                                         patch_size=manifest.patch_size, manifest=manifest, options=options)
        except Exception as exc:  # noqa: BLE001 - reported by ready()
            self.engine = None
            self.error = str(exc) if isinstance(exc, SegsentryError) else f"{type(exc).__name__}: {exc}"

    def ready(self) -> str | None:
        """None once the engine is built, else why it could not be."""
        return self.error

    def status(self) -> tuple[int, str, str | None]:
        """``(pid, host, case being inferred or None)`` (answered while inference runs: its own thread)."""
        with self._lock:
            return os.getpid(), socket.gethostname(), self.busy

    def infer(self, case: CaseInput, data: np.ndarray | CaseOutcome, batch_size: int, output_dir: Path,
              raise_unexpected: bool, step_size: float | None = None,
              mirroring: bool = True) -> tuple[float | None, VolumeInference | CaseOutcome]:
        """``(inference seconds, sliding-window outputs)``, or ``(None, failed outcome)`` (its seconds: this
        stage's)."""
        if isinstance(data, CaseOutcome):
            return None, data
        start = time.perf_counter()
        with self._lock:
            self.busy = case.case_id
        try:
            inference = infer_volume_for_case(data, self.engine, self.manifest, batch_size=batch_size,
                                              step_size=step_size, mirroring=mirroring)
            return time.perf_counter() - start, inference
        except Exception as exc:  # noqa: BLE001 - as in a serial run
            return None, failed_outcome(case, output_dir, exc, start, raise_unexpected=raise_unexpected)
        finally:
            with self._lock:
                self.busy = None


def write(case: CaseInput, context: CaseContext | CaseOutcome, inference_s: float | None,
          inference: VolumeInference | CaseOutcome, bundle: Bundle, output_dir: Path, backend_name: str, *,
          options: CaseOptions) -> CaseOutcome:
    """Score the case, bring mask and map back to the input geometry and write them, as the serial run does.

    ``bundle`` carries no graph bytes (only its path, manifest and hash are used). The case's ``total`` time is
    the sum of its stages' times (time spent waiting between stages is not counted).
    """
    if isinstance(context, CaseOutcome):
        return context
    if isinstance(inference, CaseOutcome):
        return inference
    spent = context.read_s + context.preprocess_s + float(inference_s or 0.0)
    start = time.perf_counter() - spent
    try:
        prediction = finish_case(context.loaded, inference, context.geometry, bundle.manifest,
                                 timings={"preprocess": context.preprocess_s, "inference": float(inference_s or 0.0)},
                                 mirroring=options.mirroring)
        return write_case(case, context.loaded, prediction, bundle, output_dir, backend_name, options=options,
                          read_s=context.read_s, start=start)
    except Exception as exc:  # noqa: BLE001 - as in a serial run
        return failed_outcome(case, output_dir, exc, start, raise_unexpected=options.raise_unexpected)


def resolve_backend(name: str) -> str:
    """The runtime's backend resolution, run where the engines will run (``auto`` looks for a GPU there)."""
    from segsentry.runtime.backends import resolve_backend_name

    return resolve_backend_name(name)
