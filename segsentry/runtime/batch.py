"""``ood-run`` as a library call: many cases, one bundle, per-case outputs and a batch summary.

A failing case is recorded and the batch goes on; every file is written atomically; inputs are never
overwritten.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from segsentry._atomic import write_text_atomic
from segsentry.errors import SegsentryError
from segsentry.runtime.backends import BackendOptions, create_backend, resolve_backend_name
from segsentry.runtime.bundle import Bundle, load_bundle
from segsentry.runtime.io import IMAGE_ENDINGS, CaseInput, collect_cases, guard_outputs, read_case, write_image
from segsentry.runtime.pipeline import predict_case
from segsentry.runtime.report import CaseReport
from segsentry.runtime.qa import CaseView, render_case, write_qa_page

log = logging.getLogger(__name__)

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

    @property
    def ood(self) -> bool:
        return bool(self.report is not None and self.report.ood)


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
    batch_size: int = 1,
    threads: int | None = None,
    low_memory: bool = False,
    qa: bool = True,
    on_case: Callable[[CaseOutcome], None] | None = None,
    raise_unexpected: bool = False,
    mirroring: bool = True,
) -> BatchResult:
    """Run every case found in ``inputs``; write ``CASE<ending>``, ``CASE_uncertainty<ending>``, ``CASE.json``,
    ``summary.csv`` and (unless ``qa=False``) the QA page ``qa.html`` with its PNGs in ``qa/``, into
    ``output_dir``. Raises only for problems that stop the whole batch (bundle, backend, no inputs);
    per-case problems are recorded in the result, unexpected exceptions (bugs) included unless
    ``raise_unexpected`` (the CLI's ``--debug``); a failing case's outputs from an earlier run are removed.
    ``mirroring=False`` (the CLI's ``--disable-tta``) skips nnU-Net's test-time mirroring of the logits.
    """
    output_dir = Path(output_dir)
    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    backend_name = resolve_backend_name(backend)
    guard_outputs(output_dir, [Path(p) for p in inputs])
    cases = collect_cases(inputs, num_channels=manifest.num_channels)
    if not cases:
        raise SegsentryError("no cases found in the inputs")
    output_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[CaseOutcome] = []
    with create_backend(backend_name, bundle.model_bytes, channels=manifest.num_channels,
                        patch_size=manifest.patch_size, manifest=manifest,
                        options=BackendOptions(threads=threads, low_memory=low_memory, cache_dir=bundle.path),
                        ) as engine:  # TensorRT caches its engine beside the bundle
        # the engine holds its own copy of the graph: drop ours (the weights' size: 123 MB for a fullres net)
        bundle = replace(bundle, model_bytes=b"")
        for case in cases:
            outcome = _run_case(case, bundle, engine, output_dir, backend_name, batch_size, qa, raise_unexpected,
                                mirroring)
            outcomes.append(outcome)
            if on_case is not None:
                on_case(outcome)
    result = BatchResult(outcomes=outcomes, output_dir=output_dir, backend=backend_name)
    write_summary(result)
    if qa:
        result.qa_page = write_qa_page(
            [o.qa_view for o in outcomes if o.qa_view is not None],
            {o.case_id: o.error or "" for o in outcomes if o.status != "ok"},
            qa_dir=output_dir / "qa", page=output_dir / "qa.html", calibration=manifest.calibration,
            bundle_name=bundle.path.name, backend=backend_name,
        )
    return result


def _run_case(case: CaseInput, bundle: Bundle, engine, output_dir: Path, backend_name: str,
              batch_size: int, qa: bool, raise_unexpected: bool = False, mirroring: bool = True) -> CaseOutcome:
    start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        loaded = read_case(case, num_channels=bundle.manifest.num_channels)
        read_s = time.perf_counter() - t0
        prediction = predict_case(loaded, engine, bundle.manifest, batch_size=batch_size, mirroring=mirroring)
        t0 = time.perf_counter()
        ending = loaded.output_ending
        outputs = {"mask": output_dir / f"{case.case_id}{ending}"}
        write_image(prediction.mask, loaded.reference, outputs["mask"])
        if prediction.uncertainty is not None:
            outputs["uncertainty_map"] = output_dir / f"{case.case_id}_uncertainty{ending}"
            write_image(prediction.uncertainty, loaded.reference, outputs["uncertainty_map"])
        if prediction.disagreement is not None:
            outputs["disagreement_map"] = output_dir / f"{case.case_id}_disagreement{ending}"
            write_image(prediction.disagreement, loaded.reference, outputs["disagreement_map"])
        timings = {"read": read_s, **prediction.timings, "write": time.perf_counter() - t0}
        timings["total"] = time.perf_counter() - start
        calibration = bundle.manifest.calibration
        report = CaseReport.from_prediction(
            prediction, inputs=[str(f) for f in case.files],
            aggregation=calibration.aggregation if calibration else None, timings=timings, backend=backend_name,
            model_sha256=bundle.weights_sha256, bundle=str(bundle.path),
            outputs={k: str(v) for k, v in outputs.items()}, warnings=loaded.warnings)
        write_text_atomic(output_dir / f"{case.case_id}.json", report.to_json())
        view = None
        if qa:
            view = render_case(case.case_id, loaded.image[0], prediction.mask, prediction.uncertainty,
                               spacing_zyx=loaded.spacing, modality=bundle.manifest.channels.get("0", ""),
                               qa_dir=output_dir / "qa", report=report, distance_range=_distance_range(bundle))
        return CaseOutcome(case_id=case.case_id, status="ok", report=report, qa_view=view,
                           seconds=time.perf_counter() - start)
    except SegsentryError as exc:
        return _failed(case, output_dir, str(exc), start)
    except (MemoryError, FloatingPointError, OSError) as exc:
        return _failed(case, output_dir, f"{type(exc).__name__}: {exc}", start)
    except Exception as exc:  # noqa: BLE001 - a bug must fail this case, not the batch (and its summary)
        if raise_unexpected:
            raise
        log.debug("case %s: unexpected error", case.case_id, exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return _failed(case, output_dir, f"internal error: {type(exc).__name__}: {first} (rerun with --debug for "
                       "the traceback)", start)


def _failed(case: CaseInput, output_dir: Path, error: str, start: float) -> CaseOutcome:
    """Record a failed case and remove what an earlier run wrote for it, so no stale mask or ``ood: false``
    report stays beside this run's summary."""
    log.error("case %s failed: %s", case.case_id, error)
    for stale in _case_outputs(output_dir, case.case_id):
        stale.unlink(missing_ok=True)
    return CaseOutcome(case_id=case.case_id, status="failed", error=error, seconds=time.perf_counter() - start)


def _case_outputs(output_dir: Path, case_id: str) -> list[Path]:
    """The files ``ood-run`` writes for ``case_id`` (any image ending, multi-file companions, the report)."""
    names = {f"{case_id}.json"}
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
