"""Cohort throughput of ``ood-run --ray`` on this machine: cases per minute at 1 and 2 engine workers.

    python benchmarks/ray_throughput.py --cases 36                  # the embedded demo model, ~3 minutes
    python benchmarks/ray_throughput.py --model small --cases 12    # inference-bound: 93-98 % of a case, ~5 min

``--model demo``: the embedded demo bundle (an nnU-Net 2.8.1 network with the fused OOD head), where inference
is ~60 % of a case's CPU time, the rest reading, preprocessing, resampling back and writing. ``--model small``:
the 1.4 M-parameter nnU-Net plan of ``benchmarks/e2e_cpu.py`` (random weights, exported and calibrated on two
phantoms first, as there), where inference is 93-98 %: the CPU-bound case. Both on in-distribution phantom chest
CTs, onnxruntime with one thread per engine. Measured: the serial ``run_batch`` (one thread) as the reference,
then per worker count a fresh private Ray instance (``--ray local``) with ``workers + 1`` logical CPUs (one
CPU per engine actor plus one for the read/write tasks, which share the physical cores with the engines) and
one ``run_batch_ray``. Reported per run: wall time (Ray start-up apart), cases per minute over the whole run and
at steady state (between the first and the last case written: no actor start-up or pipeline fill), whether
every mask and map is byte-identical to the serial run's, and the median per-case stage costs, object sizes
(what crosses the object store per case) and engine memory that docs/scaling.md extrapolates from. The load
average before and after is recorded; ``--contended`` labels figures measured while other work shared the cores.
Results: ``benchmarks/results/ray/ray_throughput_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry.bench import machine_info, package_versions

RESULTS = Path(__file__).resolve().parent / "results" / "ray"
STAGES = ("read", "preprocess", "inference", "scoring", "resample_back", "write", "total")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


MODELS = {"demo": "the embedded demo model", "small": "the 1.4 M-parameter plan of e2e_cpu.py, random weights"}


def _small_bundle(work: Path) -> Path:
    """Export and calibrate the ``small`` plan (as ``benchmarks/e2e_cpu.py`` does; needs the export extra)."""
    from segsentry.calib import calibrate
    from segsentry.devtools import nnunet_folder
    from segsentry.export import export_nnunet
    from segsentry.phantoms import make_chest_ct

    model_dir = nnunet_folder.make_model_folder(work / "results", nnunet_folder.SMALL_SPEC)
    train = work / "imagesTr"
    train.mkdir(parents=True)
    for seed in (101, 102):
        image, _ = make_chest_ct(seed=seed, cohort="id").to_sitk()
        sitk.WriteImage(image, str(train / f"train{seed}_0000.nii.gz"))
    features = export_nnunet(model_dir, work / "m.features.onnx").path
    return calibrate(features, [train], work / "m.ood.onnx", score_folds=1, threshold_rule="paper").path


def _phantoms(folder: Path, n: int) -> list[Path]:
    from segsentry.phantoms import make_chest_ct

    files = []
    for i in range(n):
        target = folder / f"bench{i:03d}_0000.nii.gz"
        if not target.is_file():
            image, _ = make_chest_ct(seed=5000 + i, cohort="id").to_sitk()
            sitk.WriteImage(image, str(target), True)
        files.append(target)
    return files


def _same_outputs(a: Path, b: Path) -> bool:
    images = sorted(p.name for p in a.glob("*.nii.gz"))
    return bool(images) and images == sorted(p.name for p in b.glob("*.nii.gz")) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in images)


def _stage_medians(outcomes) -> dict[str, float]:  # noqa: ANN001
    return {s: round(statistics.median(o.report.timings_s[s] for o in outcomes), 4) for s in STAGES}


def _case_bytes(bundle_path: Path, image: Path) -> dict[str, float]:
    """MB that cross the object store for one case (read -> engine, read -> write, engine -> write) and the
    engine's resident memory (run in a fresh process, so freed memory of earlier work is not reused)."""
    from segsentry.runtime import collect_cases, load_bundle, preprocess, read_case
    from segsentry.runtime.backends import BackendOptions, create_backend
    from segsentry.runtime.pipeline import infer_volume_for_case

    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    case = collect_cases([image], num_channels=m.num_channels)[0]
    loaded = read_case(case, num_channels=m.num_channels)
    data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
    before = _rss_mb()
    with create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                        options=BackendOptions(threads=1)) as engine:
        built = _rss_mb()
        inference = infer_volume_for_case(data, engine, m)
        ran = _rss_mb()
    arrays = [inference.logits, inference.distance_map]
    return {
        "bundle_mb": round(len(bundle.model_bytes) / 1e6, 2),
        "input_shape_zyx": list(loaded.image.shape[1:]),
        "preprocessed_shape": list(data.shape[1:]),
        "read_to_engine_mb": round(data.nbytes / 1e6, 2),
        "read_to_write_mb": round(loaded.image.nbytes / 1e6, 2),
        "engine_to_write_mb": round(sum(a.nbytes for a in arrays if a is not None) / 1e6, 2),
        "engine_rss_after_build_mb": round(built - before, 1),
        "engine_rss_after_first_case_mb": round(ran - before, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", choices=["demo", "small"], default="demo")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--contended", action="store_true", help="label the figures as measured on a busy machine")
    args = parser.parse_args()

    from segsentry.demo import demo_bundle_path
    from segsentry.distributed import RayOptions, ray_session, run_batch_ray
    from segsentry.runtime import run_batch

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ray_bench") as tmp:
        tmp = Path(tmp)
        bundle = demo_bundle_path() if args.model == "demo" else _small_bundle(tmp / "model")
        inputs = tmp / "in"
        inputs.mkdir()
        _phantoms(inputs, args.cases)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:  # clean RSS
            sizes = fresh.submit(_case_bytes, bundle, inputs / "bench000_0000.nii.gz").result()

        t0 = time.perf_counter()
        serial = run_batch(bundle, [inputs], tmp / "serial", backend="onnxruntime", threads=1, qa=False,
                           mirroring=False)
        serial_s = time.perf_counter() - t0
        assert all(o.status == "ok" for o in serial.outcomes), [o.error for o in serial.outcomes]
        runs = [{"run": "serial run_batch, 1 thread", "workers": 1, "wall_s": round(serial_s, 2),
                 "cases_per_min": round(60 * args.cases / serial_s, 2), "steady_cases_per_min": None,
                 "ray_start_s": None, "identical_to_serial": True, "stages_median_s": _stage_medians(serial.outcomes)}]
        for workers in args.workers:
            t0 = time.perf_counter()
            with ray_session("local", num_cpus=workers + 1):
                start_s = time.perf_counter() - t0
                done: list[float] = []
                out = tmp / f"ray{workers}"
                t0 = time.perf_counter()
                result = run_batch_ray(bundle, [inputs], out, backend="onnxruntime", qa=False, mirroring=False,
                                       ray_options=RayOptions(workers=workers, cpus_per_worker=1),
                                       on_case=lambda _o: done.append(time.perf_counter()))
                wall = time.perf_counter() - t0
            assert all(o.status == "ok" for o in result.outcomes), [o.error for o in result.outcomes]
            steady = 60 * (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 else None
            runs.append({"run": f"--ray local, {workers} worker(s) x 1 thread", "workers": workers,
                         "wall_s": round(wall, 2), "cases_per_min": round(60 * args.cases / wall, 2),
                         "steady_cases_per_min": round(steady, 2) if steady else None, "ray_start_s": round(start_s, 2),
                         "identical_to_serial": _same_outputs(tmp / "serial", out),
                         "stages_median_s": _stage_medians(result.outcomes)})
            print(json.dumps(runs[-1]))
    by_workers = {r["workers"]: r for r in runs[1:]}
    speedup = None
    if 1 in by_workers and 2 in by_workers:
        speedup = {k: round(by_workers[2][k] / by_workers[1][k], 3) for k in ("cases_per_min", "steady_cases_per_min")
                   if by_workers[1][k] and by_workers[2][k]}
    record = {
        "benchmark": "ray_throughput",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine_info(),
        "versions": package_versions(["segsentry", "ray", "onnxruntime", "numpy", "SimpleITK"]),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "model": args.model,
        "bundle": bundle.name,
        "cases": args.cases,
        "per_case": sizes,
        "runs": runs,
        "speedup_2_vs_1_worker": speedup,
        "contended": bool(args.contended),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ray_throughput_{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / f"ray_throughput_{args.model}.md").write_text(_markdown(record))
    print(_markdown(record))


def _markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# ood-run --ray throughput ({r['date']})", "",
        f"{m['cpu']}, {m['cores']} cores, Python {m['python']}; ray {r['versions']['ray']}, onnxruntime "
        f"{r['versions']['onnxruntime']}. Bundle `{r['bundle']}` ({MODELS[r['model']]}), {r['cases']} phantom "
        f"chest CTs of {r['per_case']['input_shape_zyx']} voxels (z, y, x), onnxruntime, 1 thread per engine, "
        "no QA page.", "",
        (f"**Contended:** the cores are shared with other work (load average {r['load_average_before']} before, "
         f"{r['load_average_after']} after); rerun on an idle machine for clean figures." if r.get("contended") else
         f"Quiet machine (load average {r['load_average_before']} before, {r['load_average_after']} after)."), "",
        "| run | wall s | cases/min | steady cases/min | Ray start s | outputs = serial |",
        "|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        lines.append(f"| {run['run']} | {run['wall_s']} | {run['cases_per_min']} | "
                     f"{run['steady_cases_per_min'] or '–'} | {run['ray_start_s'] or '–'} | "
                     f"{'byte-identical' if run['identical_to_serial'] else 'DIFFERENT'} |")
    if r["speedup_2_vs_1_worker"]:
        lines += ["", "2 workers vs 1: " + ", ".join(f"{k} {v}x" for k, v in r["speedup_2_vs_1_worker"].items())]
    lines += ["", "Median per-case stage seconds (serial run): " + ", ".join(
        f"{k} {v}" for k, v in r["runs"][0]["stages_median_s"].items()), "",
        "Per case through the object store: " + ", ".join(f"{k} {v}" for k, v in r["per_case"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
