"""Runtime peak memory: fixed cost and bytes per input voxel, per onnxruntime memory setting.

    python benchmarks/memory.py                                    # small benchmark net, 300 x 512 x 512, ~3-5 min
    python benchmarks/memory.py --bundle demo --shape 100 512 512 --shape 300 512 512 \\
        --variants arena no-arena no-pattern no-arena-no-pattern   # demo bundle, 2 sizes x 4 settings

Life-size phantom chest CTs are written to disk, then ``ood-run`` (``run_batch``, onnxruntime, QA off) processes
each in a fresh child process per memory setting, the settings alternating. In the child a sampler thread reads
``VmRSS`` every 10 ms, so the peak is attributed to the stage it fell in (read, preprocess, inference, scoring,
resample back, write, from the report's stage timings); ``VmHWM`` (the kernel's own peak) is the number
reported. ``ood-run`` is one process (onnxruntime's threads share it), so this is the whole process tree.
With two or more shapes, peak = fixed + bytes_per_voxel x voxels is fitted per setting (least squares), which
separates the engine's fixed cost from the volume buffers. Settings (onnxruntime ``SessionOptions``):

* ``arena``: the CPU memory arena and memory pattern on (onnxruntime's defaults; segsentry's default for patches
  below 2**19 voxels, and for every patch before the ``memory_pattern_*`` runs);
* ``no-arena``: arena off, pattern on (``--low-memory`` before those runs);
* ``no-pattern``: memory pattern off, arena on (segsentry's default since, for patches from 2**19 voxels);
* ``no-arena-no-pattern``: both off (``--low-memory`` since).

``--bundle``: ``small`` (build the 1.4 M-parameter benchmark network and calibrate it, as before; needs the
export extra), ``fullres`` (the 30.8 M-parameter one), each ``--folds N`` random-weight folds as one ensemble
bundle (mirrored as ``ood-run`` deploys it), ``demo`` (the embedded demo model) or a path. Results: ``benchmarks/results/memory.json/.md``
(``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info, package_versions, peak_rss_mb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parent.parent / "segsentry" / "models" / "demo_lung.ood.onnx"
VARIANTS = {  # name -> (arena, memory pattern)
    "arena": (True, True),
    "no-arena": (False, True),
    "no-pattern": (True, False),
    "no-arena-no-pattern": (False, False),
}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_child(script: str, *args: str) -> dict:
    """Run ``script`` with ``args`` in a fresh process (its memory is its own) and return the JSON it printed on
    its ``RESULT `` line; a failing child raises with the end of its stderr."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def _child(bundle: str, image: str, out: str, variant: str) -> None:
    arena, pattern = VARIANTS[variant]
    from segsentry.runtime import load_bundle, run_batch
    from segsentry.runtime.backends import ort_loader

    original = ort_loader.session_options

    def session_options(ort, *, threads, low_memory=False, memory_pattern=True):  # noqa: ANN001 - the knobs
        return original(ort, threads=threads, low_memory=not arena, memory_pattern=pattern)

    ort_loader.session_options = session_options
    load_bundle(bundle)
    import onnxruntime  # noqa: F401  (imports counted in the baseline)

    baseline = peak_rss_mb()
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), _rss_mb()))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    result = run_batch(bundle, [Path(image)], Path(out), backend="onnxruntime", qa=False)
    done.set()
    sampler.join()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    outcome = result.outcomes[0]
    report = outcome.report
    stage_at_peak = None
    if report is not None and samples:
        t_peak = max(samples, key=lambda s: s[1])[0] - start
        edges, total = [], 0.0
        for stage in ("read", "preprocess", "inference", "scoring", "resample_back", "write"):
            total += report.timings_s.get(stage, 0.0)
            edges.append((stage, total))
        stage_at_peak = next((s for s, end in edges if t_peak <= end), "after write")
    print("RESULT " + json.dumps({"baseline_mb": baseline, "peak_mb": peak, "seconds": seconds,
                                  "sampled_peak_mb": max((s[1] for s in samples), default=None),
                                  "stage_at_peak": stage_at_peak,
                                  "n_patches": report.n_patches if report else None,
                                  "timings": report.timings_s if report else None,
                                  "status": outcome.status, "error": outcome.error}))


def _bundle(which: str, work: Path, *, folds: int = 1) -> tuple[Path, str]:
    if which == "demo":
        return DEMO, "demo_lung (embedded demo model)"
    if which not in ("small", "fullres"):
        return Path(which), Path(which).name
    import SimpleITK as sitk

    from segsentry.calib import calibrate
    from segsentry.devtools.nnunet_folder import FULLRES_SPEC, SMALL_SPEC, make_model_folder
    from segsentry.export import export_nnunet
    from segsentry.phantoms import make_chest_ct

    spec = SMALL_SPEC if which == "small" else FULLRES_SPEC
    model_dir = make_model_folder(work / "results", spec, folds=range(folds))
    train = work / "train"
    train.mkdir()
    sitk.WriteImage(make_chest_ct(seed=1).to_sitk()[0], str(train / "t1_0000.nii.gz"))
    sitk.WriteImage(make_chest_ct(seed=2).to_sitk()[0], str(train / "t2_0000.nii.gz"))
    features = export_nnunet(model_dir, work / "m.features.onnx", folds=list(range(folds))).path
    bundle = calibrate(features, [train], work / "m.ood.onnx").path
    return bundle, f"{spec.name} (random weights, patch {list(spec.patch_size)}, {folds} fold(s), mirrored)"


def _fit(points: list[tuple[int, float]]) -> dict[str, float] | None:
    """Least-squares peak_mb = fixed_mb + bytes_per_voxel * voxels over (voxels, peak_mb) points."""
    if len({v for v, _ in points}) < 2:
        return None
    v = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    slope, intercept = np.polyfit(v, y, 1)
    return {"fixed_mb": float(intercept), "bytes_per_voxel": float(slope * 2**20)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, action="append", help="z y x (repeatable)")
    parser.add_argument("--bundle", default="small", help="small, fullres (30.8 M parameters), demo or a bundle path")
    parser.add_argument("--folds", type=int, default=1, help="folds of the small / fullres random-weight ensemble")
    parser.add_argument("--variants", nargs="+", default=["arena"], choices=sorted(VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the result files (memory<tag>.json)")
    parser.add_argument("child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0

    import SimpleITK as sitk

    from segsentry.phantoms import make_chest_ct

    shapes = [tuple(s) for s in (args.shape or [[300, 512, 512]])]
    spacing = (0.7, 0.7, 1.0)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="segsentry-mem-") as tmp:
        work = Path(tmp)
        bundle, network = _bundle(args.bundle, work, folds=args.folds)
        images = {}
        for shape in shapes:
            image = work / f"ct{'x'.join(map(str, shape))}_0000.nii.gz"
            sitk.WriteImage(make_chest_ct(seed=3, shape=shape, spacing_xyz=spacing).to_sitk()[0], str(image))
            images[shape] = image
        for r in range(args.repeats):
            for shape in shapes:
                for variant in args.variants:  # settings alternate within every round
                    out = work / f"out_{variant}_{r}_{'x'.join(map(str, shape))}"
                    child = run_child(__file__, str(bundle), str(images[shape]), str(out), variant)
                    runs.append({"variant": variant, "shape_zyx": list(shape), "voxels": int(np.prod(shape)),
                                 "round": r, **child})
    summary = {}
    for variant in args.variants:
        mine = [x for x in runs if x["variant"] == variant]
        per_shape = {}
        for shape in shapes:
            at = [x for x in mine if tuple(x["shape_zyx"]) == shape]
            per_shape["x".join(map(str, shape))] = {
                "peak_mb_median": statistics.median(x["peak_mb"] for x in at),
                "peak_mb_range": [min(x["peak_mb"] for x in at), max(x["peak_mb"] for x in at)],
                "baseline_mb_median": statistics.median(x["baseline_mb"] for x in at),
                "seconds_median": statistics.median(x["seconds"] for x in at),
                "seconds_range": [min(x["seconds"] for x in at), max(x["seconds"] for x in at)],
                "stage_at_peak": sorted({x["stage_at_peak"] for x in at if x["stage_at_peak"]}),
                "n_patches": at[0]["n_patches"],
            }
        summary[variant] = {"shapes": per_shape, "fit": _fit([(x["voxels"], x["peak_mb"]) for x in mine])}
    result = {
        "benchmark": "memory", "bundle": network, "spacing_xyz_mm": list(spacing), "repeats": args.repeats,
        "summary": summary, "runs": runs, "machine": machine_info(),
        "versions": package_versions(["onnxruntime", "numpy", "SimpleITK"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"memory{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Runtime memory, {network} ({result['date']})", "",
          f"Peak RSS (VmHWM) of the `ood-run` process, phantom CTs at {spacing[0]} x {spacing[1]} x {spacing[2]} mm, "
          f"{args.repeats} run(s) per setting and shape (medians), onnxruntime, QA off.", "",
          "| setting | shape (z, y, x) | patches | peak MB | baseline MB | s (min–max) | peak during |",
          "|---|---|---|---|---|---|---|"]
    for variant, s in summary.items():
        for shape, row in s["shapes"].items():
            md.append(f"| {variant} | {shape} | {row['n_patches']} | {row['peak_mb_median']:.0f} | "
                      f"{row['baseline_mb_median']:.0f} | {row['seconds_median']:.1f} "
                      f"({row['seconds_range'][0]:.1f}–{row['seconds_range'][1]:.1f}) | "
                      f"{', '.join(row['stage_at_peak'])} |")
    fits = [(v, s["fit"]) for v, s in summary.items() if s["fit"]]
    if fits:
        md += ["", "Fit peak = fixed + bytes/voxel x input voxels:", ""]
        md += [f"- {v}: fixed {f['fixed_mb']:.0f} MB, {f['bytes_per_voxel']:.1f} bytes per input voxel" for v, f in fits]
    (RESULTS / f"memory{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
