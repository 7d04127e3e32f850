"""End-to-end CPU benchmark: nnU-Net's own ``nnUNetPredictor`` vs ``ood-run`` on the same checkpoint and volume.

    python benchmarks/e2e_cpu.py --preset small            # 1.4 M-parameter plan, ~1 minute
    python benchmarks/e2e_cpu.py --preset fullres          # 3d_fullres-sized (30.8 M), long
    python benchmarks/e2e_cpu.py --folds 5 --tta           # nnU-Net's default: 5-fold ensemble, mirrored

Each measured run is a fresh child process (so peak RSS is per pipeline): nnU-Net = build predictor from the
model folder, read the image with its SimpleITKIO, predict (step 0.5, CPU; ``--folds N`` ensembles folds
0..N-1 with different weights, ``--tta`` turns on mirroring in both pipelines, ``--step-size S`` tiles both
at nnU-Net's ``tile_step_size`` S), write the mask;
segsentry = ``run_batch`` (load bundle, read, preprocess, sliding window with the fused OOD head, scores,
write mask + uncertainty map + report). Repeats alternate between the two; medians and ratios are written
to ``benchmarks/results/e2e_cpu_<preset>.json`` and ``.md``, with machine and package versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info, package_versions, peak_rss_mb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    # (model spec name, phantom shape z, y, x)
    "small": ("SMALL_SPEC", (60, 256, 256)),
    "fullres": ("FULLRES_SPEC", (120, 384, 384)),
}


def _child(args: argparse.Namespace) -> None:
    """One measured pipeline run; prints a JSON line with wall seconds and peak RSS."""
    out = Path(args.out)
    image = Path(args.image)
    if args.variant == "nnunet":
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

        from segsentry.devtools.nnunet_reference import make_predictor

        start = time.perf_counter()
        predictor = make_predictor(Path(args.model_dir), folds=list(range(args.folds)), use_mirroring=args.tta)
        predictor.tile_step_size = args.step_size  # nnU-Net reads the attribute at every sliding window
        img, props = SimpleITKIO().read_images([str(image)])
        mask = predictor.predict_single_npy_array(img, props)
        SimpleITKIO().write_seg(mask, str(out / "mask.nii.gz"), props)
        seconds = time.perf_counter() - start
    else:
        from segsentry.runtime import run_batch

        start = time.perf_counter()
        result = run_batch(args.bundle, [image], out, backend=args.backend, threads=args.threads, qa=False,
                           low_memory=bool(args.low_memory), mirroring=args.tta, precision=args.precision,
                           batch_size=args.batch_size, step_size=args.step_size)
        seconds = time.perf_counter() - start
        assert result.outcomes[0].status == "ok", result.outcomes[0].error
        timings = result.outcomes[0].report.timings_s
        (out / "timings.json").write_text(json.dumps(timings))
    peak_mb = peak_rss_mb()
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def _measure(variant: str, workdir: Path, run: int, flags: list[str], tag: str = "", **paths: str) -> dict:
    out = workdir / f"{variant}{tag}_{run}"
    out.mkdir()
    cmd = [sys.executable, __file__, "child", "--variant", variant, "--out", str(out), *flags]
    for key, value in paths.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} run failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return {**json.loads(line[7:]), "out": out}


def _option_flags(option: str) -> dict[str, str]:
    """The child's flags for a ``NAME:option`` backend spec: low-memory, batchN, int8 (none: the int8 bundle is
    passed instead), or a precision (bf16 / fp32)."""
    if not option:
        return {}
    if option == "low-memory":
        return {"low_memory": "1"}
    if option.startswith("batch"):
        return {"batch_size": option.removeprefix("batch")}
    if option == "int8":
        return {}  # the int8 bundle (segsentry quantize) instead of the float32 one
    return {"precision": option}


def _versions() -> dict:
    return package_versions(["segsentry", "numpy", "SimpleITK", "onnx", "onnxruntime", "openvino", "torch",
                             "nnunetv2", "scipy", "scikit-image"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    child = sub.add_parser("child")
    child.add_argument("--variant", choices=["nnunet", "segsentry"], required=True)
    for name in ("out", "image", "model-dir", "bundle"):
        child.add_argument(f"--{name}")
    child.add_argument("--threads", type=int, default=None)
    child.add_argument("--backend", default="onnxruntime")
    child.add_argument("--low-memory", default=None)
    child.add_argument("--precision", default=None)
    child.add_argument("--batch-size", type=int, default=None)
    for p in (parser, child):
        p.add_argument("--folds", type=int, default=1, help="ensemble folds 0..N-1 (default 1: one network)")
        p.add_argument("--tta", action="store_true", help="test-time mirroring in both pipelines")
        p.add_argument("--step-size", type=float, default=0.5, help="tile step in both pipelines (nnU-Net's "
                       "-step_size; segsentry's U is calibrated at the bundle's own, 0.5)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="override the preset's volume (z y x)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--suffix", default="", help="appended to the result files' names (e.g. the machine)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="backend threads (default: all cores)")
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "onnxruntime:low-memory", "openvino"],
                        help="segsentry CPU backends to compare with nnU-Net (NAME, NAME:low-memory, "
                             "openvino:bf16 for OpenVINO's bf16 network on a CPU with AVX512_BF16 / AMX, or "
                             "NAME:batchN for --batch-size N, or NAME:int8 for the bundle quantised by "
                             "segsentry quantize from the calibration phantoms)")
    args = parser.parse_args(argv)
    if args.cmd == "child":
        _child(args)
        return 0

    import SimpleITK as sitk

    from segsentry.calib import calibrate
    from segsentry.devtools import nnunet_folder
    from segsentry.export import export_nnunet
    from segsentry.phantoms import make_chest_ct

    spec_name, shape = PRESETS[args.preset]
    shape = tuple(args.shape) if args.shape else shape
    spec = getattr(nnunet_folder, spec_name)
    setting = {"folds": args.folds, "tta": args.tta, "step_size": args.step_size}
    tag = "" if (args.folds, args.tta, args.shape) == (1, False, None) else (
        f"_f{args.folds}" + ("_tta" if args.tta else "") + ("_" + "x".join(map(str, shape)) if args.shape else ""))
    tag += "" if args.step_size == 0.5 else f"_step{args.step_size:g}"
    tag += f"_{args.suffix}" if args.suffix else ""
    with tempfile.TemporaryDirectory(prefix="segsentry-bench-") as tmp:
        work = Path(tmp)
        model_dir = nnunet_folder.make_model_folder(work / "results", spec, folds=range(args.folds))
        train = work / "imagesTr"
        train.mkdir()
        for seed in (101, 102):  # calibration only needs a working bundle: default-size phantoms
            image, _ = make_chest_ct(seed=seed, cohort="id").to_sitk()
            sitk.WriteImage(image, str(train / f"train{seed}_0000.nii.gz"))
        image, _ = make_chest_ct(seed=7, cohort="id", shape=shape).to_sitk()
        case = work / "case_0000.nii.gz"
        sitk.WriteImage(image, str(case))
        t0 = time.perf_counter()
        features = export_nnunet(model_dir, work / "m.features.onnx").path
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        bundle = calibrate(features, [train], work / "m.ood.onnx").path
        calib_s = time.perf_counter() - t0
        int8_bundle, quantize_s = None, None
        if any(b.partition(":")[2] == "int8" for b in args.backends):
            from segsentry.calib.quantize import quantize_bundle

            t0 = time.perf_counter()
            int8_bundle = quantize_bundle(bundle, work / "m.int8.ood.onnx", calibration_images=[train],
                                          max_patches=8).path
            quantize_s = time.perf_counter() - t0

        runs: dict[str, list[dict]] = {"nnunet": [], **{f"segsentry_{b}": [] for b in args.backends}}
        extra = {"threads": args.threads} if args.threads else {}
        flags = ["--folds", str(args.folds), "--step-size", str(args.step_size)] + (["--tta"] if args.tta else [])
        for r in range(args.repeats):
            runs["nnunet"].append(_measure("nnunet", work, r, flags, image=case, model_dir=model_dir))
            for b in args.backends:
                name, _, option = b.partition(":")
                chosen = _option_flags(option)
                graph = int8_bundle if option == "int8" else bundle
                runs[f"segsentry_{b}"].append(_measure("segsentry", work, r, flags, image=case, bundle=graph,
                                                       backend=name, tag=b.replace(":", "_"), **chosen, **extra))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(runs["nnunet"][0]["out"] / "mask.nii.gz")))
        agreement, stages = {}, {}
        for b in args.backends:
            out = runs[f"segsentry_{b}"][0]["out"]
            ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case.nii.gz")))
            agreement[b] = {"fraction": float(np.mean(ours == ref)), "mismatched_voxels": int(np.sum(ours != ref))}
            stages[b] = json.loads((out / "timings.json").read_text())
        report = json.loads((runs[f"segsentry_{args.backends[0]}"][0]["out"] / "case.json").read_text())

    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    rss = {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in runs.items()}
    result = {
        "benchmark": "e2e_cpu",
        "preset": args.preset,
        "model": {"spec": spec.name, "patch_size": list(spec.patch_size), "features": list(spec.features)},
        "volume_shape_zyx": list(shape),
        "setting": setting,
        "n_patches": report["n_patches"],
        "repeats": args.repeats,
        "seconds": {k: [round(r["seconds"], 3) for r in v] for k, v in runs.items()},
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "speedup_vs_nnunet": {k: round(med["nnunet"] / v, 3) for k, v in med.items() if k != "nnunet"},
        "median_peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "rss_ratio_vs_nnunet": {k: round(v / rss["nnunet"], 3) for k, v in rss.items() if k != "nnunet"},
        "segsentry_stage_seconds": stages,
        "mask_agreement_vs_nnunet": agreement,
        "export_seconds": round(export_s, 2),
        "calibration_seconds": round(calib_s, 2),
        "quantize_seconds": None if quantize_s is None else round(quantize_s, 2),
        "machine": machine_info(),
        "versions": _versions(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": "Random-weight nnU-Net folder (same checkpoint for all); synthetic chest-CT phantom. Each run is "
                 "a fresh process. nnU-Net time includes building the predictor from the folder; segsentry time "
                 "includes loading the bundle and writing mask, uncertainty map and report (QA page off).",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"e2e_cpu_{args.preset}{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"# End-to-end CPU, preset `{args.preset}`, {args.folds} fold(s), mirroring {'on' if args.tta else 'off'}, "
        f"step {args.step_size:g} ({result['date']})",
        "",
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores; volume {list(shape)} (z, y, x), "
        f"{result['n_patches']} patches of {list(spec.patch_size)}; {args.repeats} run(s) each, medians.",
        "",
        "| pipeline | median s | speed-up vs nnU-Net | peak RSS MB | RSS vs nnU-Net | mask agreement |",
        "|---|---|---|---|---|---|",
        f"| nnUNetPredictor (torch, {args.folds} fold(s), {'mirroring' if args.tta else 'no mirroring'}, "
        f"tile_step_size {args.step_size:g}) | {med['nnunet']:.2f} | 1.00x | {rss['nnunet']:.0f} | 1.00x | – |",
    ]
    for b in args.backends:
        k = f"segsentry_{b}"
        name, _, option = b.partition(":")
        flag = "".join(f" --{k.replace('_', '-')}" + ("" if k == "low_memory" else f" {v}")
                       for k, v in _option_flags(option).items()) + (" (int8 bundle)" if option == "int8" else "")
        md.append(f"| ood-run --backend {name}{flag} (with OOD head) | {med[k]:.2f} | {result['speedup_vs_nnunet'][k]:.2f}x | "
                  f"{rss[k]:.0f} | {result['rss_ratio_vs_nnunet'][k]:.2f}x | {agreement[b]['fraction']:.6f} "
                  f"({agreement[b]['mismatched_voxels']} voxels differ) |")
    md += ["", "ood-run stages (s, first run): " + "; ".join(
        f"{b}: " + ", ".join(f"{k} {v:.2f}" for k, v in stages[b].items()) for b in args.backends), ""]
    (RESULTS / f"e2e_cpu_{args.preset}{tag}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
