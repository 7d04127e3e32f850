"""``ood-run`` as a library call: many cases, one bundle, per-case outputs and a batch summary.

A failing case is recorded and the batch goes on; inputs are never overwritten. A case's outputs appear
together: they are written into one hidden per-case folder and moved into place at the end, ``CASE.json``
last, so ``CASE.json`` is the completion marker (:func:`completed_cases` reads a folder that way). The next case
is read and preprocessed in one background thread while the current one is inferred (``prefetch``), and a
case's write stage runs in another while the next one is inferred (``write_behind``). Each stage keeps case
order, a case's outcome is handed out in order, and nothing a case reports or writes depends on either thread.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from segsentry._atomic import PARTIAL, current_umask, write_text_atomic
from segsentry.errors import SegsentryError
from segsentry.manifest import Manifest
from segsentry.runtime.backends import BackendOptions, create_backend, default_batch_size, resolve_backend_name
from segsentry.runtime.bundle import Bundle, load_bundle
from segsentry.runtime.dicom import expected_modality
from segsentry.runtime.heap import return_freed_memory_promptly
from segsentry.runtime.io import (
    IMAGE_ENDINGS,
    CaseInput,
    LoadedCase,
    collect_cases,
    guard_outputs,
    input_fingerprints,
    orientation_warning,
    read_case,
    write_image,
)
from segsentry.runtime.pipeline import (
    CasePrediction,
    check_step_size,
    finish_case,
    infer_volume_for_case,
)
from segsentry.runtime.preprocess import Geometry, preprocess
from segsentry.runtime.report import CaseReport
from segsentry.runtime.qa import CaseView, modality_of, render_case, write_qa_page
from segsentry.runtime.resume import find_complete

log = logging.getLogger(__name__)

PREFETCH_THREAD = "segsentry-prefetch"  # the name prefix of run_batch's read-ahead thread
WRITER_THREAD = "segsentry-writer"  # ... and of its write-behind thread
SUMMARY_FIELDS = ["case", "status", "ood", "uncertainty", "score", "threshold", "n_patches", "seconds", "error"]


@dataclass
class CaseOutcome:
    """One case of a batch: ``report`` when it was processed (``status == "ok"``), else ``error``."""

    case_id: str
    status: str  # "ok" or "failed"
    report: CaseReport | None = None
    error: str | None = None
    qa_view: CaseView | None = None
    seconds: float = 0.0  # wall time spent on the case, failed or not
    resumed: bool = False  # complete from an earlier run, skipped (``resume=True``)

    @property
    def ood(self) -> bool:
        return bool(self.report is not None and self.report.ood)


@dataclass(frozen=True)
class WrittenCase:
    """What a per-case hook of :func:`run_batch` sees once a case's image outputs are written: the input,
    the mask ``(z, y, x)`` on the input grid, the report (``outputs`` so far) and the bundle's manifest."""

    case: CaseInput
    mask: np.ndarray
    report: CaseReport
    output_dir: Path
    manifest: Manifest
    bundle_path: Path
    dicom_files: tuple[Path, ...] = ()  # DICOM cases: the files stacked, in slice order (numpy z index order)


# A hook writes more outputs for a case (DICOM SEG/SR, a monitoring line) and returns {name: path} to record
# in the report; an error it raises fails the case like any other. Output adapters above the runtime
# (segsentry.dicom) come in this way, so the runtime never imports them.
CaseHook = Callable[[WrittenCase], dict[str, Path]]


@dataclass
class BatchResult:
    outcomes: list[CaseOutcome]
    output_dir: Path
    backend: str
    qa_page: Path | None = None

    @property
    def failed(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status != "ok"]

    @property
    def flagged(self) -> list[CaseOutcome]:
        return [o for o in self.outcomes if o.status == "ok" and o.ood]

    def exit_code(self) -> int:
        """0 all in distribution, 3 at least one OOD, 1 at least one failure (takes precedence)."""
        if self.failed:
            return 1
        return 3 if self.flagged else 0


def run_batch(
    bundle_path: str | Path,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    backend: str = "auto",
    batch_size: int | None = None,
    threads: int | None = None,
    low_memory: bool = False,
    qa: bool = True,
    on_case: Callable[[CaseOutcome], None] | None = None,
    raise_unexpected: bool = False,
    step_size: float | None = None,
    case_hooks: Sequence[CaseHook] = (),
    allow_irregular_slices: bool = False,
    resume: bool = False,
    mirroring: bool = True,
    prefetch: bool = True,
    write_behind: bool = False,
    precision: str | None = None,
) -> BatchResult:
    """Run every case found in ``inputs``; write ``CASE<ending>``, ``CASE_uncertainty<ending>``, ``CASE.json``,
    ``summary.csv`` and (unless ``qa=False``) the QA page ``qa.html`` with its PNGs in ``qa/``, into
    ``output_dir``. Raises only for problems that stop the whole batch (bundle, backend, no inputs);
    per-case problems are recorded in the result, unexpected exceptions (bugs) included unless
    ``raise_unexpected`` (the CLI's ``--debug``); a failing case's outputs from an earlier run are removed.
    ``case_hooks`` run in order after each case's images are written, before its report (in the case's stage folder).
    ``allow_irregular_slices`` processes DICOM series with gaps or uneven steps, with a warning in the report.
    ``step_size`` tiles like nnU-Net's ``-step_size`` (None: the bundle's, which U is calibrated at).
    ``resume`` skips the cases an earlier run of the same model completed (:func:`find_complete`).
    ``mirroring=False`` (the CLI's ``--disable-tta``) skips nnU-Net's test-time mirroring of the logits.
    ``batch_size`` tiles go to the engine per call (None: the backend's default, :func:`resolve_batch_size`).
    ``prefetch`` reads and preprocesses the next case in one background thread while the current one is inferred
    and written (at most one case ahead; the CLI's ``--no-prefetch`` turns it off): the outputs, the order of
    the outcomes and of ``on_case`` calls are those of a run without it, and the thread is joined before this
    returns or raises.
    ``write_behind`` writes each case (images, hooks, report, QA PNGs: :func:`write_case`) in one background
    thread while the next case is inferred (at most one case being written; the CLI's ``--write-behind``). The
    same holds as for ``prefetch``; ``on_case`` hears of a case once it is written, i.e. after the next case's
    inference. Off by default: on 2 cores it gained nothing measurable on the mirrored demo ensemble and took
    14 % more peak memory (``benchmarks/results/prefetch_demo_2folds.md``).
    ``precision`` is the engine's (:class:`~segsentry.runtime.backends.BackendOptions`; None: the backend's
    default); a reduced one is named in each case's report notes.
    """
    output_dir = Path(output_dir)
    return_freed_memory_promptly()  # patch-sized arrays go back to the OS when freed (glibc)
    bundle, cases = open_batch(bundle_path, inputs, output_dir)
    manifest = bundle.manifest
    backend_name = resolve_backend_name(backend)
    options = case_options(bundle, batch_size=resolve_batch_size(batch_size, backend_name),
                           step_size=step_size, mirroring=mirroring, qa=qa, raise_unexpected=raise_unexpected,
                           allow_irregular_slices=allow_irregular_slices, case_hooks=case_hooks)
    outcomes: list[CaseOutcome] = []
    with create_backend(backend_name, bundle.model_bytes, channels=manifest.num_channels,
                        patch_size=manifest.patch_size, manifest=manifest,
                        options=BackendOptions(threads=threads, low_memory=low_memory, cache_dir=bundle.path,
                                               precision=precision),
                        ) as engine:  # TensorRT caches its engine beside the bundle
        # the engine holds its own copy of the graph: drop ours (the weights' size: 123 MB for a fullres net)
        bundle = replace(bundle, model_bytes=b"")
        start_case = functools.partial(_start_case, bundle=bundle, output_dir=output_dir, options=options,
                                       resume=resume)
        with contextlib.closing(_in_order(cases, start_case, prefetch=prefetch)) as started:
            steps = (_infer_started(case, ready, bundle, engine, output_dir, backend_name, options)
                     for case, ready in started)
            with contextlib.closing(_written_in_order(steps, write_behind=write_behind)) as finished:
                for outcome in finished:
                    outcomes.append(outcome)
                    if on_case is not None:
                        on_case(outcome)
    return finish_batch(outcomes, output_dir, bundle, backend_name, qa=qa)


def open_batch(bundle_path: str | Path, inputs: Sequence[str | Path], output_dir: Path) -> tuple[Bundle, list[CaseInput]]:
    """Load the bundle, refuse an input folder as output, collect the cases and create ``output_dir``."""
    bundle = load_bundle(bundle_path)
    guard_outputs(output_dir, [Path(p) for p in inputs])
    cases = collect_cases(inputs, num_channels=bundle.manifest.num_channels)
    if not cases:
        raise SegsentryError("no cases found in the inputs")
    output_dir.mkdir(parents=True, exist_ok=True)
    return bundle, cases


def finish_batch(outcomes: list[CaseOutcome], output_dir: Path, bundle: Bundle, backend_name: str, *,
                 qa: bool) -> BatchResult:
    """Write ``summary.csv`` (one row per outcome, in the order given) and the QA page."""
    result = BatchResult(outcomes=outcomes, output_dir=output_dir, backend=backend_name)
    write_summary(result)
    if qa:
        result.qa_page = write_qa_page(
            [o.qa_view for o in outcomes if o.qa_view is not None],
            {o.case_id: o.error or "" for o in outcomes if o.status != "ok"},
            qa_dir=output_dir / "qa", page=output_dir / "qa.html", calibration=bundle.manifest.calibration,
            bundle_name=bundle.path.name, backend=backend_name,
        )
    return result


@dataclass(frozen=True)
class CaseOptions:
    """What every case of a batch is run with (besides bundle, engine and output folder)."""

    batch_size: int = 1
    step_size: float | None = None  # None: the bundle's tiling.step_size (what U is calibrated at)
    mirroring: bool = True  # nnU-Net's test-time mirroring over the bundle's allowed axes (--disable-tta: False)
    qa: bool = True
    raise_unexpected: bool = False
    allow_irregular_slices: bool = False
    expected_modality: str | None = None  # CT / MR for DICOM Modality checks, from the bundle's channels
    bundle_sha256: str = ""
    case_hooks: Sequence[CaseHook] = ()


def case_options(bundle: Bundle, *, batch_size: int = 1, step_size: float | None = None, mirroring: bool = True,
                 qa: bool = True, raise_unexpected: bool = False, allow_irregular_slices: bool = False,
                 case_hooks: Sequence[CaseHook] = ()) -> CaseOptions:
    """The options every case of a batch with ``bundle`` (its graph bytes still loaded: they are hashed) runs with."""
    manifest = bundle.manifest
    return CaseOptions(
        batch_size=batch_size, step_size=None if step_size is None else check_step_size(step_size),
        mirroring=mirroring, qa=qa,
        raise_unexpected=raise_unexpected, allow_irregular_slices=allow_irregular_slices,
        expected_modality=expected_modality(manifest.channels, manifest.preprocessing.normalization_schemes),
        bundle_sha256=hashlib.sha256(bundle.model_bytes).hexdigest(), case_hooks=tuple(case_hooks))


def resolve_batch_size(batch_size: int | None, backend_name: str) -> int:
    """``batch_size``, or (None) the default of the concrete backend ``backend_name`` (:func:`default_batch_size`)."""
    return default_batch_size(backend_name) if batch_size is None else batch_size


def resumed_outcome(case: CaseInput, output_dir: Path, bundle: Bundle, *, qa: bool) -> CaseOutcome | None:
    """The outcome an earlier run recorded for ``case`` when its outputs are complete (``--resume``), else None."""
    done = find_complete(case, output_dir, weights_sha256=bundle.weights_sha256, qa=qa)
    if done is None:
        return None
    report, view = done
    log.info("case %s: complete in %s, skipped (--resume)", case.case_id, output_dir)
    return CaseOutcome(case_id=case.case_id, status="ok", report=report, qa_view=view,
                       seconds=report.total_seconds, resumed=True)


@dataclass
class PreparedCase:
    """A case after the read and preprocess stages: the case as read (for the input guard, QA slices and the
    output geometry), the network input ``data`` ``(c, Z, Y, X)`` float32 in network axis order (None once
    :meth:`take_data` handed it to inference), the preprocessing geometry and the stages' seconds."""

    loaded: LoadedCase
    data: np.ndarray | None
    geometry: Geometry
    read_s: float
    preprocess_s: float

    def take_data(self) -> np.ndarray:
        """The network input, dropped from here (inference holds the only reference, as a serial run would)."""
        data, self.data = self.data, None
        if data is None:
            raise RuntimeError("the preprocessed volume was taken already")
        return data


def prepare_case(case: CaseInput, manifest: Manifest, options: CaseOptions) -> PreparedCase:
    """The read and preprocess stages of ``case`` (they touch no output file); raises what they raise."""
    start = time.perf_counter()
    loaded = read_stage(case, manifest, options)
    read_s = time.perf_counter() - start
    t0 = time.perf_counter()
    data, geometry = preprocess(loaded.image, loaded.spacing, manifest.preprocessing)
    return PreparedCase(loaded, data, geometry, read_s, time.perf_counter() - t0)


@dataclass(frozen=True)
class _PrepareFailed:
    """The read or preprocess stage of a case raised ``error`` after ``seconds``."""

    error: Exception
    seconds: float


def _start_case(case: CaseInput, bundle: Bundle, output_dir: Path, options: CaseOptions, *,
                resume: bool) -> CaseOutcome | PreparedCase | _PrepareFailed:
    """Everything before inference, in whichever thread: the outcome of an earlier run (``resume``), or the case
    read and preprocessed, or why it could not be (turned into the failed outcome in case order, by
    :func:`_infer_started`). Touches no output but the case's own leftover stage folder."""
    if resume and (done := resumed_outcome(case, output_dir, bundle, qa=options.qa)) is not None:
        return done
    start = time.perf_counter()
    _remove_stale_stages(output_dir, case.case_id)
    try:
        return prepare_case(case, bundle.manifest, options)
    except Exception as exc:  # noqa: BLE001 - sorted out by failed_outcome, in the main thread
        return _PrepareFailed(exc, time.perf_counter() - start)


def _infer_started(case: CaseInput, ready: CaseOutcome | PreparedCase | _PrepareFailed, bundle: Bundle, engine,
                   output_dir: Path, backend_name: str,
                   options: CaseOptions) -> CaseOutcome | Callable[[], CaseOutcome]:
    """Inference, scoring and the maps back to the input geometry, in the calling thread. Returns the outcome of a
    case that is done (resumed, or failed so far), else its write stage still to run (:func:`write_case`; it
    returns the outcome, a failed one included). The case's ``total`` time is the sum of its stages' (a
    prefetched case's wait for the engine is not counted)."""
    if isinstance(ready, CaseOutcome):
        return ready
    if isinstance(ready, _PrepareFailed):
        return failed_outcome(case, output_dir, ready.error, time.perf_counter() - ready.seconds,
                              raise_unexpected=options.raise_unexpected)
    start = time.perf_counter() - ready.read_s - ready.preprocess_s
    try:
        t0 = time.perf_counter()
        inference = infer_volume_for_case(ready.take_data(), engine, bundle.manifest, batch_size=options.batch_size,
                                          step_size=options.step_size, mirroring=options.mirroring)
        timings = {"preprocess": ready.preprocess_s, "inference": time.perf_counter() - t0}
        prediction = finish_case(ready.loaded, inference, ready.geometry, bundle.manifest, timings=timings,
                                 mirroring=options.mirroring)
        del inference
    except Exception as exc:  # noqa: BLE001 - sorted out by failed_outcome
        return failed_outcome(case, output_dir, exc, start, raise_unexpected=options.raise_unexpected)
    loaded, read_s = ready.loaded, ready.read_s

    def write() -> CaseOutcome:
        try:
            return write_case(case, loaded, prediction, bundle, output_dir, backend_name, options=options,
                              read_s=read_s, start=start)
        except Exception as exc:  # noqa: BLE001 - sorted out by failed_outcome
            return failed_outcome(case, output_dir, exc, start, raise_unexpected=options.raise_unexpected)

    return write


def _written_in_order(steps: Iterator[CaseOutcome | Callable[[], CaseOutcome]], *,
                      write_behind: bool) -> Iterator[CaseOutcome]:
    """The outcome of each of ``steps`` in order: a step is an outcome, or a write stage to run for it. With
    ``write_behind``, a write stage runs in one background thread while the next step is computed (the next
    case's inference): at most one case is being written. Close the generator (``contextlib.closing``) so that
    a write under way is finished and the thread joined when the caller stops early; a write stage not yet
    started is dropped, so the case writes nothing."""
    if not write_behind:
        for step in steps:
            yield step if isinstance(step, CaseOutcome) else step()
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=WRITER_THREAD) as pool:
        writing: Future[CaseOutcome] | None = None
        for step in steps:
            if writing is not None:
                done, writing = writing, None
                yield done.result()
            if isinstance(step, CaseOutcome):
                yield step
            else:
                writing = pool.submit(step)
        if writing is not None:
            yield writing.result()


_Started = TypeVar("_Started")


def _in_order(cases: Sequence[CaseInput], start: Callable[[CaseInput], _Started], *,
              prefetch: bool) -> Iterator[tuple[CaseInput, _Started]]:
    """``(case, start(case))`` for each case in order. With ``prefetch``, ``start`` runs for the next case in one
    background thread while the caller works on the one handed out: at most one case ahead. Close the generator
    (``contextlib.closing``) so that the thread is joined when the caller stops early, by an exception
    (KeyboardInterrupt included) or otherwise; a case already started is waited for, a queued one cancelled."""
    if not prefetch:
        for case in cases:
            yield case, start(case)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=PREFETCH_THREAD) as pool:
        ahead: Future[_Started] | None = pool.submit(start, cases[0]) if cases else None
        try:
            for i, case in enumerate(cases):
                ready = ahead.result()
                ahead = pool.submit(start, cases[i + 1]) if i + 1 < len(cases) else None
                yield case, ready
                del ready
        finally:
            if ahead is not None:
                ahead.cancel()  # a case being read cannot be cancelled: leaving the pool joins its thread


def read_stage(case: CaseInput, manifest: Manifest, options: CaseOptions) -> LoadedCase:
    """The read stage: the case's images, checked, with an orientation warning when it is stored otherwise than
    the training images."""
    loaded = read_case(case, num_channels=manifest.num_channels,
                       allow_irregular_slices=options.allow_irregular_slices,
                       expected_modality=options.expected_modality)
    calibration = manifest.calibration
    turned = orientation_warning(loaded, calibration.train_orientation if calibration else None)
    if turned:
        loaded.warnings.append(turned)
    return loaded


def write_case(case: CaseInput, loaded: LoadedCase, prediction: CasePrediction, bundle: Bundle, output_dir: Path,
               backend_name: str, *, options: CaseOptions, read_s: float, start: float) -> CaseOutcome:
    """The write stage: mask, uncertainty map, the hooks' outputs and ``CASE.json``, staged in one hidden
    folder and moved into place together (``CASE.json`` last), then the QA PNGs; ``start`` is the case's
    ``time.perf_counter()`` origin (its ``total`` timing)."""
    t0 = time.perf_counter()
    calibration = bundle.manifest.calibration
    ending = loaded.output_ending
    outputs = {"mask": output_dir / f"{case.case_id}{ending}"}
    if prediction.uncertainty is not None:
        outputs["uncertainty_map"] = output_dir / f"{case.case_id}_uncertainty{ending}"
    with _case_stage(output_dir, case.case_id) as stage:
        write_image(prediction.mask, loaded.reference, stage / outputs["mask"].name)
        if prediction.uncertainty is not None:
            write_image(prediction.uncertainty, loaded.reference, stage / outputs["uncertainty_map"].name)
        if prediction.disagreement is not None:
            outputs["disagreement_map"] = output_dir / f"{case.case_id}_disagreement{ending}"
            write_image(prediction.disagreement, loaded.reference, stage / outputs["disagreement_map"].name)
        timings = {"read": read_s, **prediction.timings, "write": time.perf_counter() - t0}
        timings["total"] = time.perf_counter() - start
        report = CaseReport.from_prediction(
            prediction, inputs=[str(f) for f in case.files],
            aggregation=calibration.aggregation if calibration else None, timings=timings, backend=backend_name,
            model_sha256=bundle.weights_sha256, bundle=str(bundle.path),
            outputs={k: str(v) for k, v in outputs.items()}, warnings=loaded.warnings,
            bundle_sha256=options.bundle_sha256, input_ids=input_fingerprints(case),
            subject_score=calibration.subject_score if calibration else None)
        for hook in options.case_hooks:
            written = WrittenCase(case=case, mask=prediction.mask, report=report, output_dir=stage,
                                  manifest=bundle.manifest, bundle_path=bundle.path, dicom_files=loaded.dicom_files)
            extra = {k: str(output_dir / Path(v).name) for k, v in hook(written).items()}
            report = replace(report, outputs={**report.outputs, **extra})
        (stage / f"{case.case_id}.json").write_text(report.to_json())
        _publish(stage, output_dir, case.case_id)
    view = None
    if options.qa:
        view = render_case(case.case_id, loaded.image[0], prediction.mask, prediction.uncertainty,
                           geometry=loaded.reference, modality=modality_of(bundle.manifest),
                           qa_dir=output_dir / "qa", report=report, distance_range=_distance_range(bundle),
                           disagreement=prediction.disagreement)
    return CaseOutcome(case_id=case.case_id, status="ok", report=report, qa_view=view,
                       seconds=time.perf_counter() - start)


def failed_outcome(case: CaseInput, output_dir: Path, exc: Exception, start: float, *,
                   raise_unexpected: bool = False) -> CaseOutcome:
    """The failed outcome for an exception raised while processing ``case`` (its earlier outputs removed); an
    unexpected one (a bug) is re-raised when ``raise_unexpected`` (the CLI's ``--debug``)."""
    if isinstance(exc, SegsentryError):
        return _failed(case, output_dir, str(exc), start)
    if isinstance(exc, (MemoryError, FloatingPointError, OSError)):
        return _failed(case, output_dir, f"{type(exc).__name__}: {exc}", start)
    if raise_unexpected:
        raise exc
    log.debug("case %s: unexpected error", case.case_id, exc_info=exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return _failed(case, output_dir, f"internal error: {type(exc).__name__}: {first} (rerun with --debug for "
                   "the traceback)", start)


_STAGE_MARK = f".case{PARTIAL}"  # found by _atomic.leftover_partials too
_HEADER_ENDINGS = (".hdr", ".mhd")  # multi-file formats: the data file moves first, the header after it


def _stage_prefix(case_id: str) -> str:
    return f".{case_id}{_STAGE_MARK}"


@contextlib.contextmanager
def _case_stage(output_dir: Path, case_id: str) -> Iterator[Path]:
    """A hidden per-case folder in ``output_dir`` (its name ends in no image ending), removed on exit."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=_stage_prefix(case_id), dir=output_dir))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _remove_stale_stages(output_dir: Path, case_id: str) -> None:
    """A run killed while publishing a case leaves its stage folder: remove it before the case runs again."""
    if output_dir.is_dir():
        for stale in output_dir.glob(_stage_prefix(case_id) + "*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)


def _publish(stage: Path, output_dir: Path, case_id: str) -> None:
    """Move a finished case into place: its old report first (so no earlier ``CASE.json`` stands beside half of
    the new files), then outputs of an earlier run this run does not write, the images (data files before
    their headers), and ``CASE.json`` last as the completion marker."""
    report = f"{case_id}.json"
    (output_dir / report).unlink(missing_ok=True)
    new = {p.name for p in stage.iterdir()}
    for stale in _case_outputs(output_dir, case_id):
        if stale.name not in new:
            stale.unlink(missing_ok=True)
    mode = 0o666 & ~current_umask()
    order = sorted(new - {report}, key=lambda n: (n.lower().endswith(_HEADER_ENDINGS), n)) + [report]
    for name in order:
        os.chmod(stage / name, mode)
        os.replace(stage / name, output_dir / name)


def completed_cases(output_dir: str | Path) -> dict[str, dict]:
    """The cases of ``output_dir`` that are complete: a ``CASE.json`` (the marker, moved last) whose listed
    outputs all exist. Returns ``{case_id: report dict}``; anything else in the folder is not a result."""
    output_dir = Path(output_dir)
    done: dict[str, dict] = {}
    for path in sorted(output_dir.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(report, dict) or report.get("case") != path.stem:
            continue
        if all((output_dir / Path(p).name).is_file() for p in report.get("outputs", {}).values()):
            done[path.stem] = report
    return done


def _failed(case: CaseInput, output_dir: Path, error: str, start: float) -> CaseOutcome:
    """Record a failed case and remove what an earlier run wrote for it, so no stale mask or ``ood: false``
    report stays beside this run's summary."""
    log.error("case %s failed: %s", case.case_id, error)
    for stale in _case_outputs(output_dir, case.case_id):
        stale.unlink(missing_ok=True)
    return CaseOutcome(case_id=case.case_id, status="failed", error=error, seconds=time.perf_counter() - start)


def _case_outputs(output_dir: Path, case_id: str) -> list[Path]:
    """The files ``ood-run`` writes for ``case_id`` (any image ending, multi-file companions, the report)."""
    names = {f"{case_id}.json", f"{case_id}.seg.dcm", f"{case_id}.sr.dcm"}
    for ending in (*IMAGE_ENDINGS, ".hdr", ".img", ".raw", ".zraw"):
        names |= {f"{case_id}{ending}", f"{case_id}_uncertainty{ending}", f"{case_id}_disagreement{ending}"}
    return [output_dir / n for n in sorted(names) if (output_dir / n).is_file()]


def _distance_range(bundle: Bundle) -> tuple[float, float] | None:
    c = bundle.manifest.calibration
    return (c.train_score_min, 2 * c.train_score_max) if c else None


def write_summary(result: BatchResult) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS)
    writer.writeheader()
    for o in result.outcomes:
        r = o.report
        row = {"case": o.case_id, "status": o.status, "ood": "", "uncertainty": "", "score": "", "threshold": "",
               "n_patches": "", "seconds": f"{o.seconds:.3f}", "error": o.error or ""}
        if r is not None:
            row.update({
                "ood": "" if r.ood is None else int(bool(r.ood)),
                "uncertainty": "" if r.uncertainty is None else f"{r.uncertainty:.6f}",
                "score": "" if r.score is None else f"{r.score:.6g}",
                "threshold": "" if r.threshold is None else f"{r.threshold:.6f}",
                "n_patches": r.n_patches,
                "seconds": f"{r.total_seconds:.3f}",
            })
        writer.writerow(row)
    path = result.output_dir / "summary.csv"
    write_text_atomic(path, buffer.getvalue())
    return path
