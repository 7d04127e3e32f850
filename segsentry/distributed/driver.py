"""The Ray driver of ``ood-run --ray``: the serial batch's semantics, its stages spread over a cluster.

Per case: ``prepare`` (read + preprocess) as a CPU task -> ``EngineWorker.infer`` on one actor of the pool ->
``write`` as a task; the driver only moves object references and the small per-case outcomes. The bundle's
graph bytes are put into the object store once and every actor builds its engine from them (a restarted actor
too). Each actor gets one case at a time, so a case waits in the object store, not in a dead actor's queue.

Faults. A case's error fails that case (one summary row, as in a serial run) and is never retried. A worker
process that dies (killed, out of memory, node lost) is restarted by Ray and its stage run again, at most
``max_retries`` times per stage; a case whose stage kept dying is reported failed. Stages write only through
the runtime's atomic writes, so re-running one duplicates nothing; temporary folders of a writer killed mid-write
are removed at the end, when no writer is left. Outcomes are collected by case, and ``summary.csv`` and the
QA page are written once, in input order, by the runtime's own :func:`~segsentry.runtime.batch.finish_batch`.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from segsentry._atomic import leftover_partials
from segsentry.distributed.cluster import ray_session
from segsentry.errors import BackendError, SegsentryError
from segsentry.runtime.backends import BACKENDS, BackendOptions
from segsentry.runtime.batch import (
    BatchResult,
    CaseOptions,
    CaseOutcome,
    case_options,
    failed_outcome,
    finish_batch,
    open_batch,
    resolve_batch_size,
    resumed_outcome,
)
from segsentry.runtime.io import CaseInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """How a batch is spread over Ray.

    Attributes:
        address: ``local`` (a private instance on this machine, stopped afterwards), ``auto`` or ``HOST:PORT``.
        workers: inference actors; None: as many as the cluster holds (GPU backends: one per
            ``gpus_per_worker`` GPUs; CPU backends: one per ``cpus_per_worker`` CPUs, one task's CPUs kept free).
        cpus_per_worker: CPUs each actor reserves; its engine runs that many threads.
        gpus_per_worker: GPUs each actor reserves; None: 1 for the GPU backends, 0 for the CPU ones.
        task_cpus: CPUs each read or write task reserves.
        max_retries: how often a stage whose worker died is run again before its case is failed.
        prefetch: cases read ahead per actor (each waits in the object store: memory = prefetch × workers
            preprocessed volumes).
        num_cpus: logical CPUs of a ``local`` instance (default: this machine's).
        name: prefix of the actors' names (``NAME-engine-I``); default ``segsentry-<random>``.
    """

    address: str = "local"
    workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float | None = None
    task_cpus: float = 1.0
    max_retries: int = 2
    prefetch: int = 1
    num_cpus: int | None = None
    name: str | None = None


def run_batch_ray(
    bundle_path: str | Path,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    ray_options: RayOptions = RayOptions(),
    backend: str = "auto",
    batch_size: int | None = None,
    low_memory: bool = False,
    qa: bool = True,
    resume: bool = False,
    on_case: Callable[[CaseOutcome], None] | None = None,
    raise_unexpected: bool = False,
    allow_irregular_slices: bool = False,
    step_size: float | None = None,
    mirroring: bool = True,
    precision: str | None = None,
) -> BatchResult:
    """:func:`segsentry.runtime.run_batch` on Ray: the same files per case, the same ``CASE.json`` except the
    timings, one ``summary.csv`` and QA page. ``output_dir`` and the inputs must be on storage every node sees
    at the same path. Raises for what stops a whole batch (bundle, inputs, no cluster, engines that cannot be
    built); per-case problems are in the result."""
    output_dir = Path(output_dir)
    bundle, cases = open_batch(bundle_path, inputs, output_dir)
    case_opts = case_options(bundle, step_size=step_size, mirroring=mirroring, qa=qa, raise_unexpected=raise_unexpected,
                             allow_irregular_slices=allow_irregular_slices)  # the batch size once the backend is known
    outcomes: dict[str, CaseOutcome] = {}
    todo: list[CaseInput] = []
    for case in cases:
        done = resumed_outcome(case, output_dir, bundle, qa=qa) if resume else None
        if done is None:
            todo.append(case)
        else:
            outcomes[case.case_id] = done
            if on_case is not None:
                on_case(done)
    backend_name = _concrete_backend(backend) if not todo else None
    if todo:
        with ray_session(ray_options.address, num_cpus=ray_options.num_cpus) as ray:
            backend_name = _resolve_on_cluster(ray, backend, ray_options)
            case_opts = replace(case_opts, batch_size=resolve_batch_size(batch_size, backend_name))
            _Run(ray, bundle, todo, output_dir, backend_name, ray_options, case_opts, low_memory=low_memory,
                 precision=precision, on_case=on_case, outcomes=outcomes).run()
    for folder in [output_dir, output_dir / "qa"]:
        for partial in leftover_partials(folder):  # a writer killed mid-write; every writer has finished
            shutil.rmtree(partial, ignore_errors=True)
    ordered = [outcomes[c.case_id] for c in cases]
    return finish_batch(ordered, output_dir, replace(bundle, model_bytes=b""), backend_name or backend, qa=qa)


def _concrete_backend(backend: str) -> str:
    from segsentry.runtime.backends import resolve_backend_name

    return resolve_backend_name(backend)


def _resolve_on_cluster(ray, backend: str, options: RayOptions) -> str:  # noqa: ANN001 - the ray module
    """A named backend resolves here; ``auto`` resolves on a worker that has a GPU if the cluster has any."""
    if backend.strip().lower() != "auto":
        return _concrete_backend(backend)
    from segsentry.distributed.stages import resolve_backend

    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(resolve_backend).options(num_cpus=options.task_cpus, num_gpus=1 if gpus else 0)
    return ray.get(task.remote(backend))


class _Run:
    """One batch on the cluster: keeps every actor busy with one case, reads ``prefetch`` cases ahead."""

    def __init__(self, ray, bundle, cases: list[CaseInput], output_dir: Path, backend_name: str,  # noqa: ANN001
                 options: RayOptions, case_opts: CaseOptions, *, low_memory: bool, precision: str | None,
                 on_case: Callable[[CaseOutcome], None] | None, outcomes: dict[str, CaseOutcome]) -> None:
        from segsentry.distributed import stages

        self.ray, self.cases, self.output_dir, self.options = ray, cases, output_dir, options
        self.backend_name, self.batch_size, self.raise_unexpected = backend_name, case_opts.batch_size, case_opts.raise_unexpected
        self.step_size, self.mirroring = case_opts.step_size, case_opts.mirroring
        self.on_case, self.outcomes = on_case, outcomes
        self.manifest = bundle.manifest
        gpu = BACKENDS[backend_name].gpu
        self.gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpu else 0.0)
        retries = {"max_retries": options.max_retries}
        self.prepare = ray.remote(stages.prepare).options(num_cpus=options.task_cpus, num_returns=2, **retries)
        self.write = ray.remote(stages.write).options(num_cpus=options.task_cpus, **retries)
        self.n_workers = self._worker_count()
        # the graph goes into the object store once; the write tasks get the bundle without it
        self.model_ref = ray.put(bundle.model_bytes)
        self.bundle_ref = ray.put(replace(bundle, model_bytes=b""))
        self.manifest_ref = ray.put(self.manifest)
        self.case_opts_ref = ray.put(case_opts)
        self.name = options.name or f"segsentry-{uuid.uuid4().hex[:8]}"
        self.actor_class = ray.remote(  # status() answers from its own thread while infer() runs
            num_cpus=options.cpus_per_worker, num_gpus=self.gpus, concurrency_groups={"control": 1},
            max_restarts=-1, max_task_retries=options.max_retries)(stages.EngineWorker)
        self.engine_options = BackendOptions(threads=options.cpus_per_worker, low_memory=low_memory,
                                             cache_dir=bundle.path, precision=precision)

    def _worker_count(self) -> int:
        resources = self.ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        o = self.options
        if o.workers is not None:
            n = o.workers
        elif self.gpus:
            n = int(gpus // self.gpus)
        else:
            n = int((cpus - o.task_cpus) // o.cpus_per_worker)
        n = min(n, len(self.cases)) if o.workers is None else n
        if n < 1 or n * o.cpus_per_worker + o.task_cpus > cpus or n * self.gpus > gpus:
            need = f"{n} worker(s) × {o.cpus_per_worker} CPU" + (f" × {self.gpus:g} GPU" if self.gpus else "")
            raise SegsentryError(
                f"the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s): not enough for {need} plus "
                f"{o.task_cpus:g} CPU for reading and writing; lower the worker count or the CPUs per worker, "
                "or add nodes")
        return n

    def _actor(self, index: int):  # noqa: ANN202 - an actor handle
        return self.actor_class.options(name=f"{self.name}-engine-{index}").remote(
            self.model_ref, self.manifest_ref, self.backend_name, self.engine_options)

    def run(self) -> None:
        ray = self.ray
        actors = [self._actor(i) for i in range(self.n_workers)]
        try:
            for error in ray.get([a.ready.remote() for a in actors]):
                if error is not None:
                    raise BackendError(f"the {self.backend_name} engine cannot be built on a Ray worker: {error}")
            log.info("%d case(s) on %d Ray worker(s), backend %s", len(self.cases), len(actors), self.backend_name)
            self._dispatch(actors)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)

    def _dispatch(self, actors: list) -> None:
        ray = self.ray
        waiting = deque(self.cases)
        read: deque[tuple[CaseInput, object, object]] = deque()  # cases read (or being read), not yet dispatched
        free = deque(actors)
        inferring: dict[object, object] = {}  # inference-time ref -> actor
        restarting: dict[object, object] = {}  # readiness probe of a worker whose process died -> actor
        writing: dict[object, tuple[CaseInput, float]] = {}  # outcome ref -> case, submit time
        ahead = self.n_workers * (2 + self.options.prefetch)  # cases between read and written, at most
        while waiting or read or inferring or writing:
            while waiting and len(read) + len(writing) < ahead:
                case = waiting.popleft()
                data, context = self.prepare.remote(case, self.manifest_ref, self.output_dir, self.case_opts_ref)
                read.append((case, data, context))
            while free and read:
                case, data, context = read.popleft()
                actor = free.popleft()
                seconds, inference = actor.infer.options(num_returns=2).remote(
                    case, data, self.batch_size, self.output_dir, self.raise_unexpected, self.step_size,
                    self.mirroring)
                inferring[seconds] = actor
                outcome = self.write.remote(case, context, seconds, inference, self.bundle_ref, self.output_dir,
                                            self.backend_name, options=self.case_opts_ref)
                writing[outcome] = (case, time.perf_counter())
            ready, _ = ray.wait([*inferring, *restarting, *writing], num_returns=1)
            for ref in ready:
                if ref in inferring:
                    actor = inferring.pop(ref)
                    if self._died(ref):  # its case fails (in _collect); the next one waits for the restart
                        restarting[actor.ready.options(max_task_retries=-1).remote()] = actor
                    else:
                        free.append(actor)
                elif ref in restarting:
                    free.append(restarting.pop(ref))  # restarted by Ray, the engine built again
                else:
                    case, since = writing.pop(ref)
                    self._collect(ref, case, since)

    def _died(self, ref) -> bool:  # noqa: ANN001 - an object ref
        """Whether an inference ended with its worker process dead (after Ray's retries). A case handed to the
        worker before Ray has restarted it would fail without ever running (``ActorUnavailableError``)."""
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            return True
        except self.ray.exceptions.RayError:
            return False  # a stage's own error: its write task reports it
        return False

    def _collect(self, ref, case: CaseInput, since: float) -> None:  # noqa: ANN001 - an object ref
        ray = self.ray
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as exc:
            cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
            if not isinstance(cause, ray.exceptions.RayError):  # a stage raised: only a bug, under --debug
                raise exc.as_instanceof_cause() from None
            # a worker died on every try: the write task reports its inference's actor death as its own error
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            error = BackendError(f"the Ray worker running it died, {self.options.max_retries + 1} time(s) "
                                 f"({type(cause).__name__}: {first[:200]})")
            outcome = failed_outcome(case, self.output_dir, error, since)
        self.outcomes[case.case_id] = outcome
        if self.on_case is not None:
            self.on_case(outcome)
