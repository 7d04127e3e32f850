"""Command-line interface: thin typer wrappers over ``segsentry.export``, ``segsentry.calib``, ``segsentry.runtime``.

Console scripts ``ood-export``, ``ood-calib``, ``ood-run`` and the umbrella ``segsentry`` (sub-commands
``export``, ``calib``, ``run``) share the same command functions. Exit codes: 0 success / all cases in
distribution, 1 error or at least one failed case, 2 usage error, 3 at least one case flagged OOD.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

from enum import Enum

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from segsentry.contract import Aggregation, EnsembleScore, Estimator, FeatureNorm, SubjectScore, ThresholdRule
from segsentry.errors import BackendError, SegsentryError

console = Console(stderr=True)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_OOD = 0, 1, 2, 3

_settings = {"pretty_exceptions_show_locals": False, "add_completion": False, "no_args_is_help": True}
app = typer.Typer(help="segsentry: OOD detection for 3D segmentation networks, shipped as ONNX.", **_settings)

def _print_version(value: bool) -> None:
    if value:
        from segsentry import __version__

        typer.echo(f"segsentry {__version__}")
        raise typer.Exit(EXIT_OK)


VersionOpt = Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the segsentry version and exit.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show full tracebacks for unexpected errors.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Patches per backend call.")]
RunBatchOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, help="Tiles per backend call (default: 1; a mirrored tile's flips are calls of their "
    "own; more saves 5-20 % on small nets but took 2.2x the memory on a fullres net).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for the backend.")]
MonitorLogOpt = Annotated[Optional[Path], typer.Option(
    "--monitor-log", help="Append one JSON line per case (time, U, flag, scanner) to this drift-watch log.")]


def _backend_name(value: str | None) -> str | None:
    """Validate a backend name at the boundary: an unknown one is a usage error (exit 2), not a failed run."""
    if value is None:
        return None
    from segsentry.runtime.backends import resolve_backend_name

    if value.strip().lower() != "auto":
        try:
            resolve_backend_name(value)
        except BackendError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


def _backend_names(values: list[str] | None) -> list[str] | None:
    return None if values is None else [_backend_name(v) for v in values]


BackendOpt = Annotated[str, typer.Option(
    "--backend", callback=_backend_name,
    help="Inference backend: auto (tensorrt / ort-gpu when installed and a CUDA GPU is present, else "
    "openvino if installed, else onnxruntime), onnxruntime, openvino, torch, ort-gpu, tensorrt.")]


def _open_unit_interval(value: float) -> float:
    from segsentry.runtime.scoring import check_alpha

    try:
        check_alpha(value)
    except SegsentryError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _optional_unit_interval(value: float | None) -> float | None:
    return None if value is None else _open_unit_interval(value)


class ShiftKind(str, Enum):
    ARTEFACT = "artefact"
    AFFINE = "affine"


class ShiftLevel(str, Enum):
    WEAK = "weak"
    MEDIUM = "medium"
    STRONG = "strong"


class Cohort(str, Enum):  # segsentry.phantoms.COHORTS (checked equal in tests/cli)
    ID = "id"
    DATASET_SHIFT = "dataset-shift"
    DIAGNOSTIC_SHIFT = "diagnostic-shift"
    FAR_OOD = "far-ood"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )


def _guarded(debug: bool, body: Callable[[], int]) -> None:
    """Run ``body``; turn segsentry errors into one red line and the right exit code."""
    try:
        code = body()
    except SegsentryError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as exc:
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(first)} (rerun with --debug for "
                      "details)", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    raise typer.Exit(code)


def export_command(
    model_dir: Annotated[Path, typer.Argument(help="nnU-Net v2 trained-model folder (plans.json, dataset.json, fold_N/).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .features.onnx file.")],
    folds: Annotated[Optional[list[str]], typer.Option("--folds", help="Folds to ensemble in one bundle, as nnU-Net's -f: --folds 0 1 2 (default: every fold_N with the checkpoint).")] = None,
    more_folds: Annotated[Optional[list[str]], typer.Argument(hidden=True, help="The values after --folds' first.")] = None,
    fold: Annotated[Optional[str], typer.Option("--fold", "-f", help="Export this one fold (a number or 'all').")] = None,
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="Checkpoint file name in fold_N/.")] = "checkpoint_final.pth",
    configuration: Annotated[Optional[str], typer.Option("--configuration", "-c", help="Plans configuration (default: from the checkpoint).")] = None,
    layer: Annotated[str, typer.Option("--layer", help="Feature layer, a dotted module path.")] = "encoder.stages.-1",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare ONNX with torch on random patches.")] = True,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """Export an nnU-Net v2 model to ONNX with two outputs: logits and pooled bottleneck features.

    Several folds make one ensemble bundle (per-fold logits and features behind one input)."""
    _setup_logging(verbose)
    # click options take one value each: "--folds 0 1 2" leaves "1 2" as extra positionals, gathered here
    if more_folds and folds is None:
        raise typer.BadParameter(f"unexpected arguments {' '.join(more_folds)} (folds go after --folds)")
    if fold is not None and folds is not None:
        raise typer.BadParameter("give --fold N or --folds N [N ...], not both")
    chosen = None if folds is None else [*folds, *(more_folds or [])]
    for value in chosen or []:
        if not (value.isdigit() or value == "all"):
            raise typer.BadParameter(f"fold {value!r} is not a number or 'all'")

    def body() -> int:
        from segsentry.export import export_nnunet

        with console.status("exporting to ONNX…"):
            result = export_nnunet(model_dir, output, folds=chosen, fold=fold, checkpoint=checkpoint,
                                   configuration=configuration, layer=layer, verify=verify)
        m = result.manifest
        console.print(f"[green]wrote[/] {escape(str(result.path))}  patch {m.patch_size}, {m.num_channels} channel(s), "
                      f"{m.num_classes} classes, features '{escape(m.features.layer)}' {m.features.layer_shape} "
                      f"-> pool {m.features.pooling} -> D={m.features.dim}; folds "
                      f"{', '.join(f.fold for f in m.folds) or '-'}", highlight=False)
        if result.verification:
            v = result.verification
            console.print(f"ONNX vs torch on {v.n_patches} random patches: logits max |diff| "
                          f"{v.logits_max_abs:.2e}, features max |diff| {v.features_max_abs:.2e}", highlight=False)
        return EXIT_OK

    _guarded(debug, body)


def calib_command(
    bundle: Annotated[Path, typer.Argument(help="The .features.onnx written by ood-export.")],
    images: Annotated[list[Path], typer.Argument(help="Training images: nnU-Net imagesTr folder(s) or files.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output calibrated .ood.onnx file.")],
    estimator: Annotated[Estimator, typer.Option("--estimator", help="Covariance: ledoit-wolf, empirical (the paper: pinv) or oas.")] = Estimator.LEDOIT_WOLF,
    aggregation: Annotated[Aggregation, typer.Option("--aggregation", help="normalised (divide by weights) or paper (plain sum).")] = Aggregation.NORMALISED,
    keep_features: Annotated[bool, typer.Option("--keep-features", help="Keep the features output in the bundle.")] = False,
    score_folds: Annotated[int, typer.Option("--score-folds", min=1, help="Score training cases out of sample with this many folds (1 = in-sample, as the paper).")] = 5,
    feature_norm: Annotated[FeatureNorm, typer.Option("--feature-norm", help="none (the paper) or l2 (Mahalanobis++: unit-length features before the fit and in the head).")] = FeatureNorm.NONE,
    threshold_rule: Annotated[ThresholdRule, typer.Option("--threshold-rule", help="conformal (false alarms <= alpha on new in-distribution cases) or paper (95 % TPR boundary).")] = ThresholdRule.CONFORMAL,
    alpha: Annotated[float, typer.Option("--alpha", callback=_open_unit_interval, help="False-alarm rate the conformal threshold holds (needs >= 1/alpha - 1 calibration cases).")] = 0.05,
    calibration_images: Annotated[Optional[list[Path]], typer.Option("--calibration-images", help="Unlabelled in-distribution scans the Gaussian never sees, to set the threshold (repeatable; default: the cross-fitted training scores).")] = None,
    ensemble_score: Annotated[Optional[EnsembleScore], typer.Option("--ensemble-score", help="Fold ensembles: fused (U also holds the folds' disagreement; needs --calibration-images; the default with them) or distance (the folds' mean distance alone; the default without).")] = None,
    subject_score: Annotated[SubjectScore, typer.Option("--subject-score", help="How a case's patch distances become its score: mean (the paper: mean of the voxel map), patch-min (its most typical patch) or lower-half (mean of the smaller half).")] = SubjectScore.MEAN,
    backend: BackendOpt = "auto",
    batch_size: BatchOpt = 1,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """Fit the Gaussian on training patches and fold the Mahalanobis head into the graph."""
    _setup_logging(verbose)

    def body() -> int:
        from rich.progress import Progress

        from segsentry.calib import calibrate

        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("training cases", total=None)

            def on_case(case_id: str, n: int, error: str | None) -> None:
                progress.advance(task)
                if error:
                    console.print(f"[yellow]skipped[/] {escape(case_id)}: {escape(error)}", highlight=False)

            result = calibrate(bundle, images, output, estimator=estimator, aggregation=aggregation,
                               keep_features=keep_features, backend=backend, batch_size=batch_size,
                               threads=threads, score_folds=score_folds, feature_norm=feature_norm,
                               threshold_rule=threshold_rule,
                               alpha=alpha, calibration_images=calibration_images,
                               ensemble_score=ensemble_score, subject_score=subject_score, on_case=on_case)
        c = result.calibration
        console.print(f"[green]wrote[/] {escape(str(result.path))}: {c.n_patches} patches from {c.n_cases} cases, D="
                      f"{result.fit.n_features}, {c.estimator} (shrinkage {c.shrinkage:.4g}, rank {c.rank}), "
                      f"train scores [{c.train_score_min:.4g}, {c.train_score_max:.4g}], "
                      f"threshold U > {c.threshold:.4f} ({c.aggregation}, subject score {c.subject_score}; training "
                      f"scores {c.score_fit})",
                      highlight=False)
        rule = (f"conformal, alpha {c.alpha:g}: false alarms <= {100 * c.false_alarm_bound:.1f} % on new "
                "in-distribution cases" if c.threshold_rule == ThresholdRule.CONFORMAL
                else "paper: 95 % TPR boundary")
        console.print(f"threshold rule {rule}; set on {escape(c.calibration_source)}", highlight=False)
        if c.fusion is not None:
            console.print(f"U = mean of the distance U and the folds' disagreement mapped onto its scale "
                          f"({c.fusion.offset:.4g} + {c.fusion.scale:.4g} x (1 - fold agreement))", highlight=False)
        if c.false_alarm_bound is not None and c.alpha is not None and c.false_alarm_bound > c.alpha + 1e-12:
            from segsentry.runtime.scoring import min_calibration_cases

            console.print(f"[yellow]warning:[/] alpha {c.alpha:g} needs at least {min_calibration_cases(c.alpha)} "
                          f"calibration cases; with {len(c.calibration_scores)} the threshold only holds "
                          f"{100 * c.false_alarm_bound:.1f} %", highlight=False)
        return EXIT_FAILED if result.failed else EXIT_OK

    _guarded(debug, body)


def run_command(
    bundle: Annotated[Optional[Path], typer.Argument(help="A calibrated .ood.onnx (or an uncalibrated .features.onnx).")] = None,
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="Image files (CASE_0000.nii.gz…), folders, or DICOM series folders.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = ...,
    demo: Annotated[bool, typer.Option("--demo", help="Run the embedded demo model on generated phantom CTs.")] = False,
    qa: Annotated[bool, typer.Option("--qa/--no-qa", help="Write the QA page (qa.html + PNGs).")] = True,
    backend: BackendOpt = "auto",
    batch_size: RunBatchOpt = None,
    threads: ThreadsOpt = None,
    low_memory: Annotated[bool, typer.Option(
        "--low-memory", help="Lower peak memory for some speed (onnxruntime: no CPU memory arena and no memory "
        "pattern; on a fullres net 7-16 % less peak RSS than the default, 8-9 % slower).")] = False,
    disable_tta: Annotated[bool, typer.Option(
        "--disable-tta", help="No test-time mirroring (nnU-Net's flag): faster, but the masks are no longer "
        "nnU-Net's default predictions. The OOD score does not depend on it.")] = False,
    prefetch: Annotated[bool, typer.Option(
        "--prefetch/--no-prefetch", help="Read and preprocess the next case in a background thread while this one "
        "is inferred (one case ahead; same outputs). Not used with --ray, which runs its stages apart.")] = True,
    write_behind: Annotated[bool, typer.Option(
        "--write-behind/--no-write-behind", help="Write each case's outputs in a background thread while the next "
        "case is inferred (one case behind; same outputs, one more case in memory). Off by default: no gain "
        "measured on 2 cores. Not used with --ray.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the case reports as JSON on stdout.")] = False,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg", help="Also write CASE.seg.dcm (DICOM SEG) and CASE.sr.dcm "
                                            "(SR with the OOD verdict) for DICOM series inputs (segsentry[dicom]).")] = False,
    monitor_log: MonitorLogOpt = None,
    allow_irregular_slices: Annotated[bool, typer.Option(
        "--allow-irregular-slices", help="Process DICOM series with missing or unevenly spaced slices instead of "
        "refusing them; each such case's report carries the warning.")] = False,
    precision: Annotated[Optional[str], typer.Option(
        "--precision", help="The network's precision: fp32 (default on the CPU), fp16 (GPU backends; tensorrt's "
        "default) or bf16 (--backend openvino on a CPU with AVX512_BF16 or AMX; Mahalanobis head kept in fp32). A "
        "reduced precision is an explicit trade: faster, masks no longer nnU-Net's float32 ones, U's threshold set "
        "in fp32 (see the README's numbers).")] = None,
    step_size: Annotated[Optional[float], typer.Option(
        "--step-size", help="Tile step as a fraction of the patch (nnU-Net's "
        "-step_size; default the bundle's, 0.5, which U is calibrated at: another step gives an uncalibrated U).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip cases whose outputs an earlier run of the same model "
                                         "left complete in the output folder.")] = False,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS", help="Run on Ray (segsentry[distributed]): "
                                               "'local' (a private instance), 'auto' or HOST:PORT (a cluster).")] = None,
    ray_workers: Annotated[Optional[int], typer.Option("--ray-workers", min=1, help="Inference actors on Ray "
                                                       "(default: as many as fit; --threads CPUs each).")] = None,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """Segment cases, score them for OOD, write masks, uncertainty maps, reports and a QA page."""
    _setup_logging(verbose)
    if demo and (bundle is not None or inputs):
        raise typer.BadParameter("--demo takes no BUNDLE or INPUTS")
    if demo and (ray or resume):
        raise typer.BadParameter("--demo runs here and from scratch: no --ray or --resume")
    if step_size is not None and not 0 < step_size <= 1:
        raise typer.BadParameter(f"--step-size must be in (0, 1], got {step_size}")
    from segsentry.runtime.backends.options import PRECISIONS

    if precision is not None and precision not in PRECISIONS:
        raise typer.BadParameter(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if demo and precision is not None:
        raise typer.BadParameter("--demo runs the embedded model at the backend's default precision: no --precision")
    if ray_workers is not None and ray is None:
        raise typer.BadParameter("--ray-workers needs --ray ADDRESS")
    if not demo and (bundle is None or not inputs):
        raise typer.BadParameter("give a BUNDLE and at least one INPUT (or --demo)")
    if demo and (dicom_seg or monitor_log):
        raise typer.BadParameter("--demo runs NIfTI phantoms: it takes no --dicom-seg or --monitor-log")
    if ray is not None and (dicom_seg or monitor_log):
        raise typer.BadParameter("--dicom-seg and --monitor-log run in this process: not yet with --ray")
    if dicom_seg:
        _check_dicom_inputs(inputs or [])

    def body() -> int:
        from rich.progress import Progress

        from segsentry.runtime import run_batch

        hooks = [] if demo else _run_hooks(bundle, dicom_seg, monitor_log)

        with Progress(console=console, transient=True, disable=as_json) as progress:
            task = progress.add_task("cases", total=None)
            advance = lambda _o: progress.advance(task)  # noqa: E731
            if demo:
                from segsentry.demo import run_demo

                result = run_demo(output, backend=backend, threads=threads, on_case=advance)
            elif ray is not None:
                from segsentry.distributed import RayOptions, run_batch_ray

                options = RayOptions(address=ray, workers=ray_workers, cpus_per_worker=threads or 1)
                result = run_batch_ray(bundle, inputs, output, ray_options=options, backend=backend,
                                       batch_size=batch_size, low_memory=low_memory, qa=qa, resume=resume,
                                       on_case=advance, raise_unexpected=debug,
                                       allow_irregular_slices=allow_irregular_slices, step_size=step_size,
                                       mirroring=not disable_tta, precision=precision)
            else:
                result = run_batch(bundle, inputs, output, backend=backend, batch_size=batch_size, threads=threads,
                                   low_memory=low_memory, qa=qa, on_case=advance, raise_unexpected=debug,
                                   case_hooks=hooks, allow_irregular_slices=allow_irregular_slices, resume=resume,
                                   step_size=step_size, mirroring=not disable_tta, prefetch=prefetch,
                                   write_behind=write_behind, precision=precision)
        if as_json:
            typer.echo(json.dumps({
                "backend": result.backend,
                "output": str(result.output_dir),
                "qa_page": str(result.qa_page) if result.qa_page else None,
                "cases": [{"case": o.case_id, "status": o.status, "error": o.error,
                           **(o.report.to_dict() if o.report is not None else {"seconds": round(o.seconds, 4)})}
                          for o in result.outcomes],
            }, indent=2))
        else:
            _print_run_table(result)
            if resumed := sum(o.resumed for o in result.outcomes):
                console.print(f"{resumed} case(s) complete from an earlier run: skipped (--resume)", highlight=False)
            if result.qa_page:
                console.print(f"QA page: {escape(str(result.qa_page))}", highlight=False)
        return result.exit_code()

    _guarded(debug, body)


def _check_dicom_inputs(inputs: list[Path]) -> None:
    from segsentry.runtime.io import is_dicom_folder

    others = [str(p) for p in inputs if not is_dicom_folder(Path(p))]
    if others:
        raise typer.BadParameter(f"--dicom-seg needs DICOM series folders as inputs; not DICOM: {', '.join(others)}"
                                 " (DICOM SEG/SR reference the source SOP instances, which NIfTI files lack)")


def _run_hooks(bundle: Path | None, dicom_seg: bool, monitor_log: Path | None) -> list:
    """ood-run's per-case output adapters (segsentry.dicom); a missing dicom extra stops the run here."""
    hooks = []
    if dicom_seg:
        from segsentry.dicom.outputs import DicomResultWriter

        hooks.append(DicomResultWriter(bundle))
    if monitor_log is not None:
        from segsentry.dicom.monitor import MonitorLog

        hooks.append(MonitorLog(monitor_log))
    return hooks


def monitor_command(
    log_file: Annotated[Path, typer.Argument(help="Monitoring log written by ood-run/ood-serve --monitor-log.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the HTML page here.")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", callback=_optional_unit_interval, help="False-alarm rate to test against (default: the bundle's, from the log).")] = None,
    window: Annotated[int, typer.Option("--window", min=1, help="Rolling window, in cases.")] = 50,
    significance: Annotated[float, typer.Option("--significance", min=1e-9, max=0.5, help="Binomial test level.")] = 0.01,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """Drift watch: rolling flag rate against alpha (exact binomial test) and U per scanner/protocol."""
    _setup_logging(False)

    def body() -> int:
        from segsentry.dicom.monitor import read_log, summarise

        entries, skipped = read_log(log_file)
        summary = summarise(entries, alpha=alpha, window=window, significance=significance, skipped_lines=skipped)
        table = Table(title=escape(f"drift watch: {log_file}"))
        for column in ("scanner / protocol", "cases", "flagged", "median U", "binomial p"):
            table.add_column(column)
        for g in summary.groups:
            table.add_row(escape(g.name), str(g.n), f"{g.flags} ({100 * g.flags / g.n:.1f} %)", f"{g.u_median:.3f}",
                          f"{g.p_value:.2g}")
        console.print(table)
        last = summary.rolling[-1] if summary.rolling else None
        verdict = "[bold red]significantly above alpha[/]" if summary.alarm else "[green]not significantly above alpha[/]"
        console.print(f"{summary.n_scored} scored case(s), {summary.flags} flagged ({100 * summary.rate:.1f} %), alpha "
                      f"{summary.alpha:g}: {verdict} (binomial p = {summary.p_value:.2g})"
                      + (f"; last {last.n} cases: {last.flags} flagged, p = {last.p_value:.2g}" if last else "")
                      + (f"; {skipped} unreadable line(s) skipped" if skipped else ""), highlight=False)
        if output is not None:
            from segsentry.dicom.monitor_html import write_monitor_page

            write_monitor_page(summary, output, log_name=log_file.name)
            console.print(f"page: {escape(str(output))}", highlight=False)
        return EXIT_OK

    _guarded(debug, body)


def serve_command(
    bundle: Annotated[Path, typer.Argument(help="A calibrated .ood.onnx bundle.")],
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="DICOM port to listen on.")],
    work: Annotated[Path, typer.Option("--work", help="Work folder: received series, queue, outputs (WORK/<study>/<series>/).")],
    forward: Annotated[Optional[str], typer.Option("--forward", help="Send SEG + SR here: AE@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242).")] = None,
    ae_title: Annotated[str, typer.Option("--ae-title", help="This node's AE title (callers must use it).")] = "SEGSENTRY",
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface, for a scanner on the network).")] = "127.0.0.1",
    series_timeout: Annotated[float, typer.Option("--series-timeout", min=0.0, help="Seconds without a new instance after which a series is complete.")] = 10.0,
    retries: Annotated[int, typer.Option("--retries", min=0, help="Forwarding retries (exponential backoff from 1 s).")] = 5,
    monitor_log: MonitorLogOpt = None,
    backend: BackendOpt = "auto",
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """DICOM node: receive CT/MR series (C-STORE), run each once, send DICOM SEG + SR on (default log: WORK/monitor.jsonl)."""
    # a daemon's log: plain timestamped lines (no wrapping), one per series at INFO
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not verbose:
        for noisy in ("pynetdicom", "highdicom"):  # per-PDU and per-module chatter
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if len(ae_title) > 16 or not ae_title.strip():
        raise typer.BadParameter(f"--ae-title must have 1 to 16 characters, got {ae_title!r}")
    from segsentry.dicom.serve import ForwardTarget

    try:
        target = ForwardTarget.parse(forward) if forward else None
    except SegsentryError as exc:
        raise typer.BadParameter(str(exc)) from None

    def body() -> int:
        import signal

        from segsentry.dicom.serve import DicomNode, ServeOptions

        node = DicomNode(ServeOptions(bundle=bundle, work=work, port=port, forward=target, host=host,
                                      ae_title=ae_title, series_timeout=series_timeout, retries=retries,
                                      backend=backend, threads=threads, monitor_log=monitor_log))
        node.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, node.request_stop)
        node.wait()
        node.stop()
        return EXIT_OK

    _guarded(debug, body)


def _print_run_table(result) -> None:  # noqa: ANN001 - BatchResult, imported lazily
    table = Table(title=escape(f"ood-run ({result.backend}) -> {result.output_dir}"))
    table.add_column("case", no_wrap=True)
    for column in ("status", "U", "threshold", "flag", "patches", "seconds"):
        table.add_column(column)
    for o in result.outcomes:
        r = o.report
        if o.status != "ok" or r is None:
            table.add_row(escape(o.case_id), "[red]failed[/]", "", "", escape(o.error or ""), "", "")
            continue
        flag = "" if r.ood is None else ("[bold red]OOD[/]" if r.ood else "[green]in-dist[/]")
        table.add_row(escape(o.case_id), "ok", "" if r.uncertainty is None else f"{r.uncertainty:.3f}",
                      "" if r.threshold is None else f"{r.threshold:.3f}", flag, str(r.n_patches),
                      f"{r.total_seconds:.1f}")
    console.print(table)


def bench_command(
    bundle: Annotated[Path, typer.Argument(help="A bundle (.ood.onnx or .features.onnx).")],
    backends: Annotated[Optional[list[str]], typer.Option("--backend", callback=_backend_names, help="Backend to measure (repeatable; default: auto).")] = None,
    batch_sizes: Annotated[Optional[list[int]], typer.Option("--batch", min=1, help="Batch size (repeatable; default 1, 2, 4).")] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed calls per measurement.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed calls first.")] = 2,
    volume: Annotated[Optional[Path], typer.Option("--volume", help="A case (CASE_0000.nii.gz) for the end-to-end time.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the results as JSON here.")] = None,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """Measure per-patch latency, throughput, end-to-end stages and OOD-head overhead per backend."""
    _setup_logging(verbose)

    def body() -> int:
        from segsentry._atomic import write_text_atomic
        from segsentry.bench import run_bench

        with console.status("benchmarking…"):
            results = run_bench(bundle, backends=backends or ["auto"], batch_sizes=batch_sizes or [1, 2, 4],
                                warmup=warmup, repeats=repeats, threads=threads, volume=volume)
        text = json.dumps(results, indent=2)
        if output:
            write_text_atomic(output, text + "\n")
        if as_json:
            typer.echo(text)
            return EXIT_OK
        table = Table(title=f"ood-bench {bundle.name} (patch {results['patch_size']}, D={results['feature_dim']})")
        for column in ("backend", "folds", "batch", "p50 ms/call", "p95 ms/call", "patches/s", "network only p50 ms",
                       "head alone ms", "mirrored patches/s"):
            table.add_column(column)
        for r in results["results"]:
            for b in r["batches"]:
                head, mirrored = b["head_only_p50_s_per_call"], b["mirrored_patches_per_s"]
                table.add_row(r["backend"], str(r["n_folds"]), str(b["batch"]), f"{b['p50_s_per_call'] * 1e3:.1f}",
                              f"{b['p95_s_per_call'] * 1e3:.1f}", f"{b['patches_per_s']:.2f}",
                              f"{b['network_only_p50_s_per_call'] * 1e3:.1f}",
                              "–" if head is None else f"{head * 1e3:.3f}",
                              "–" if mirrored is None else f"{mirrored:.2f} ({r['mirror_terms']} terms)")
        console.print(table)
        for r in results["results"]:
            if "volume" in r:
                v = r["volume"]
                stages = ", ".join(f"{k} {t:.2f}" for k, t in v["stages_s"].items())
                share = v.get("ood_overhead_fraction_of_e2e")
                console.print(f"{r['backend']}: {v['n_patches']} patches, {v['wall_s']:.2f} s end to end ({stages})"
                              + (f"; OOD head + aggregation {100 * share:.2f} % of it" if share is not None else ""),
                              highlight=False)
        return EXIT_OK

    _guarded(debug, body)


def quantize_command(
    bundle: Annotated[Path, typer.Argument(help="A float32 bundle (.ood.onnx or .features.onnx).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output INT8 bundle.")],
    calibration_images: Annotated[list[Path], typer.Option("--calibration-images", help="In-distribution scans whose patches set the activation ranges (repeatable).")],
    fidelity_images: Annotated[Optional[list[Path]], typer.Option("--fidelity-images", help="Scans on which the INT8 bundle is compared with the float32 one; recorded in the manifest (repeatable).")] = None,
    max_patches: Annotated[int, typer.Option("--max-patches", min=1, help="Calibration patches at most, spread over the cases.")] = 64,
    fidelity_backend: Annotated[str, typer.Option("--fidelity-backend", callback=_backend_name, help="Engine the fidelity comparison runs on (INT8 kernels differ between engines).")] = "onnxruntime",
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """INT8 post-training quantisation (onnxruntime static QDQ; head and normalisations stay float32)."""
    _setup_logging(verbose)

    def body() -> int:
        from segsentry.calib.quantize import quantize_bundle

        with console.status("quantising…"):
            result = quantize_bundle(bundle, output, calibration_images=calibration_images,
                                     fidelity_images=fidelity_images or (), max_patches=max_patches, threads=threads,
                                     fidelity_backend=fidelity_backend)
        q = result.quantization
        console.print(f"[green]wrote[/] {escape(str(result.path))}: int8 {'/'.join(q.op_types)} from "
                      f"{q.n_calibration_patches} patches of {q.n_calibration_cases} cases; "
                      f"{len(q.fp32_nodes)} nodes kept float32", highlight=False)
        f = q.fidelity
        if f is not None:
            du = "n/a" if f.max_abs_u_difference is None else f"{f.max_abs_u_difference:.4f}"
            console.print(f"vs float32 on {f.n_cases} cases ({f.backend}): voxel agreement min {f.voxel_agreement_min:.6f}, "
                          f"Dice min {f.dice_min:.4f}, max |dU| {du}, flags changed {f.flags_changed} "
                          "(U is not re-calibrated for int8)", highlight=False)
        return EXIT_OK

    _guarded(debug, body)


def fuse_taps_command(
    first: Annotated[Path, typer.Argument(help="A calibrated .ood.onnx: its tap, scale, guard and threshold rule lead.")],
    others: Annotated[list[Path], typer.Argument(help="Calibrated .ood.onnx of the same network graph at other layers (segsentry retap of the first's features bundle, then ood-calib with the same options and --calibration-images).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .ood.onnx holding every tap.")],
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """Fuse several feature taps of one network into one bundle: one Gaussian each, one U, one threshold."""
    _setup_logging(verbose)

    def body() -> int:
        from segsentry.calib.taps import fuse_taps

        result = fuse_taps(first, others, output)
        c = result.calibration
        layers = ", ".join(t.features.layer for t in c.taps)
        console.print(f"[green]wrote[/] {escape(str(result.path))}: U = mean of the first tap's U and {escape(layers)} "
                      f"mapped onto its scale; threshold U > {c.threshold:.4f} ({c.threshold_rule}"
                      + (f", false alarms <= {100 * c.false_alarm_bound:.1f} %" if c.false_alarm_bound is not None
                         else "") + f"); distances equal the tap bundles' within {result.max_rel_error:.1g}",
                      highlight=False)
        return EXIT_OK

    _guarded(debug, body)


def retap_command(
    bundle: Annotated[Path, typer.Argument(help="A .features.onnx from ood-export (not calibrated).")],
    layer: Annotated[str, typer.Option("--layer", help="The module to tap instead, as a dotted path (e.g. decoder.stages.2).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .features.onnx tapped at --layer.")],
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """Tap the same network graph at another layer (no torch needed), e.g. a second tap for fuse-taps."""
    _setup_logging(verbose)

    def body() -> int:
        from segsentry._atomic import write_bytes_atomic
        from segsentry.devtools.retap import retap
        from segsentry.errors import BundleError
        from segsentry.runtime.bundle import load_bundle

        if output.resolve() == bundle.resolve():
            raise BundleError("the output must not overwrite the input bundle; choose another -o")
        try:
            data = retap(load_bundle(bundle).model_bytes, layer)
        except ValueError as exc:
            raise BundleError(str(exc)) from exc
        write_bytes_atomic(output, data)
        spec = load_bundle(output).manifest.features
        console.print(f"[green]wrote[/] {escape(str(output))}: features of {escape(spec.layer)} "
                      f"{spec.layer_shape} pooled to D={spec.dim}", highlight=False)
        return EXIT_OK

    _guarded(debug, body)


def phantoms_command(
    output: Annotated[Path, typer.Argument(help="Folder for the nnU-Net raw layout (imagesTr/, labelsTr/, dataset.json).")],
    cohort: Annotated[Cohort, typer.Option("--cohort", help="Which cohort to generate.")] = Cohort.ID,
    n: Annotated[int, typer.Option("--n", min=1, help="Number of cases.")] = 10,
    seed: Annotated[int, typer.Option("--seed", help="Cohort seed (case i always gets the same volume).")] = 0,
    prefix: Annotated[str, typer.Option("--prefix", help="Case id prefix.")] = "PH",
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """Generate a cohort of procedural chest-CT phantoms (with lesion labels) in nnU-Net raw layout."""
    _setup_logging(verbose)
    from segsentry.phantoms import write_cohort

    def body() -> int:
        with console.status(f"writing {n} {cohort.value} phantoms…"):
            ids = write_cohort(output, cohort=cohort.value, n=n, seed=seed, prefix=prefix)
        console.print(f"[green]wrote[/] {len(ids)} {cohort.value} cases to {escape(str(output))}", highlight=False)
        return EXIT_OK

    _guarded(debug, body)


def _name_value_pairs(items: list[str], option: str, form: str) -> dict[str, Path]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise typer.BadParameter(f"{option} expects {form}, got {item!r}")
        if name in pairs:
            raise typer.BadParameter(f"{option} name {name!r} given twice")
        pairs[name] = Path(value)
    return pairs


def eval_run_command(
    bundle: Annotated[Path, typer.Argument(help="A calibrated .ood.onnx bundle.")],
    id_set: Annotated[Path, typer.Option("--id", help="In-distribution test set (nnU-Net raw layout; labelsTr/ optional).")],
    ood: Annotated[list[str], typer.Option("--ood", help="An OOD set as NAME=FOLDER (repeatable).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Report folder.")],
    tta: Annotated[bool, typer.Option("--tta", help="Add the TTA baseline (8 flipped passes per case: 8x slower).")] = False,
    mc_dropout: Annotated[bool, typer.Option(
        "--mc-dropout", help="Add the MC dropout baseline (p = 0.5 after the encoder stages, on onnxruntime).")] = False,
    mc_passes: Annotated[int, typer.Option("--mc-passes", min=2, help="MC dropout passes per case.")] = 10,
    layer: Annotated[Optional[list[str]], typer.Option(
        "--layer", help="Feature-layer ablation: NAME=BUNDLE, another calibrated bundle of the same network "
        "tapped at another layer (repeatable).")] = None,
    backend: BackendOpt = "auto",
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """Compare the Mahalanobis score with the output baselines on an ID set and named OOD sets."""
    _setup_logging(verbose)
    sets = _name_value_pairs(ood, "--ood", "NAME=FOLDER")
    layers = _name_value_pairs(layer or [], "--layer", "NAME=BUNDLE")

    def body() -> int:
        from segsentry.evaluation.evaluate import evaluate

        with console.status("evaluating…"):
            result = evaluate(bundle, id_set, sets, output, backend=backend, threads=threads, tta=tta,
                              mc_dropout=mc_dropout, mc_passes=mc_passes, layers=layers)
        for name, rows in result["scenarios"].items():
            table = Table(title=f"{name}")
            for column in ("method", "ESCE", "Error", "FPR", "AUC"):
                table.add_column(column)
            for r in rows:
                table.add_row(r["method"], *("–" if r[k] is None else f"{r[k]:.3f}" for k in ("esce", "error", "fpr", "auc")))
            console.print(table)
        for r in result.get("layer_ablation", []):
            console.print(f"layer {r['layer']}: " + ", ".join(
                f"{name} AUC {r[name]['auc']:.3f}" for name in result["scenarios"]), highlight=False)
        console.print(f"report: {escape(str(output / 'report.html'))}", highlight=False)
        return EXIT_OK

    _guarded(debug, body)


def eval_shift_command(
    input_dir: Annotated[Path, typer.Argument(help="A set in nnU-Net raw layout (imagesTr/, optional labelsTr/).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder for the shifted set.")],
    kind: Annotated[ShiftKind, typer.Option("--kind", help="Artefacts (ghosting, spike, blur, noise) or affine.")] = ShiftKind.ARTEFACT,
    level: Annotated[ShiftLevel, typer.Option("--level", help="Shift strength.")] = ShiftLevel.STRONG,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (per case derived from it).")] = 0,
    verbose: VerboseOpt = False,
    debug: DebugOpt = False,
    version: VersionOpt = False,
) -> None:
    """Apply a transformation shift (paper Table 4, TorchIO) to images and labels, in nnU-Net raw layout."""
    _setup_logging(verbose)

    def body() -> int:
        from segsentry.evaluation.shifts import shift_folder

        with console.status(f"{kind.value} shift ({level.value})…"):
            failed = shift_folder(input_dir, output, kind=kind.value, level=level.value, seed=seed)
        for case in failed:
            console.print(f"[yellow]failed[/] {escape(str(case))}", highlight=False)
        console.print(f"[green]wrote[/] {escape(str(output))} ({kind.value}, {level.value}, seed {seed})",
                      highlight=False)
        return EXIT_FAILED if failed else EXIT_OK

    _guarded(debug, body)


app.command("export")(export_command)
app.command("calib")(calib_command)
app.command("run")(run_command)
app.command("bench")(bench_command)
app.command("phantoms")(phantoms_command)
app.command("monitor")(monitor_command)
app.command("serve")(serve_command)
app.command("quantize")(quantize_command)
app.command("retap")(retap_command)
app.command("fuse-taps")(fuse_taps_command)


def _single(command: Callable[..., None]) -> typer.Typer:
    single = typer.Typer(**_settings)
    single.command()(command)
    return single


export_app = _single(export_command)
calib_app = _single(calib_command)
run_app = _single(run_command)
bench_app = _single(bench_command)
serve_app = _single(serve_command)
eval_app = typer.Typer(help="Evaluate OOD detection against the paper's baselines and metrics.", **_settings)


@app.callback()
@eval_app.callback()
def _groups(version: VersionOpt = False) -> None:  # the umbrella and ood-eval: --version before a sub-command
    pass


eval_app.command("run")(eval_run_command)
eval_app.command("shift")(eval_shift_command)
app.add_typer(eval_app, name="eval")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
