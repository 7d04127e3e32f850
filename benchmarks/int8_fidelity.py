"""INT8 fidelity and speed of the demo bundle: ``segsentry quantize`` vs the float32 bundle on phantoms.

    python benchmarks/int8_fidelity.py              # ~2-4 min on 2 cores
    python benchmarks/int8_fidelity.py --rounds 9   # more timing rounds

Calibration: ``--calib-cases`` new in-distribution phantoms (their own seed), ``--max-patches`` patches through
the runtime's preprocessing and tiler. Fidelity: fresh phantoms of every cohort (id, dataset-shift,
diagnostic-shift, far-ood), each run through both bundles on onnxruntime: voxel agreement, foreground Dice of the
int8 mask against the float32 one, U of both and whether the OOD flag changed (the int8 bundle keeps the float32
calibration: U is not re-calibrated). Speed: per-patch latency of the network + head at batch 1 for
onnxruntime and (when installed) OpenVINO, fp32 and int8 runs alternating, medians and min-max over
``--rounds`` rounds of ``--patches`` patches. CPU flags (VNNI, BF16, AVX2) are recorded with the results:
INT8 speed depends on them. Results: ``benchmarks/results/int8_demo.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info, package_versions

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parent.parent / "segsentry" / "models" / "demo_lung.ood.onnx"
COHORTS = {"id": ("ID", 4), "dataset-shift": ("DS", 2), "diagnostic-shift": ("DX", 2), "far-ood": ("FO", 2)}


def latency_per_patch(backends: dict, patches: np.ndarray, rounds: int) -> dict[str, dict[str, float]]:
    """Seconds per patch (batch 1) per backend, the backends alternating within every round."""
    times: dict[str, list[float]] = {name: [] for name in backends}
    for backend in backends.values():  # warm-up
        backend.run(patches[:1])
    for _ in range(rounds):
        for name, backend in backends.items():
            start = time.perf_counter()
            for p in patches:
                backend.run(p[None])
            times[name].append((time.perf_counter() - start) / len(patches))
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "rounds": len(t)}
            for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO)
    parser.add_argument("--calib-cases", type=int, default=8)
    parser.add_argument("--max-patches", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=700)
    parser.add_argument("--contended", action="store_true", help="label the timings as measured on a busy machine")
    args = parser.parse_args(argv)

    from segsentry.calib.quantize import calibration_patches, compare_bundles, quantize_bundle, summarise
    from segsentry.phantoms import write_cohort
    from segsentry.runtime import load_bundle
    from segsentry.runtime.backends import BackendOptions, create_backend

    with tempfile.TemporaryDirectory(prefix="segsentry-int8-") as tmp:
        work = Path(tmp)
        write_cohort(work / "calib", cohort="id", n=args.calib_cases, seed=args.seed, prefix="CAL")
        sets = []
        for cohort, (prefix, n) in COHORTS.items():
            write_cohort(work / cohort, cohort=cohort, n=n, seed=args.seed + 1, prefix=prefix)
            sets.append(work / cohort / "imagesTr")
        start = time.perf_counter()
        result = quantize_bundle(args.bundle, work / "int8.onnx", calibration_images=[work / "calib" / "imagesTr"],
                                 fidelity_images=sets, max_patches=args.max_patches, threads=args.threads)
        quantize_s = time.perf_counter() - start
        fp32, int8 = load_bundle(args.bundle), load_bundle(result.path)
        m = fp32.manifest
        fidelity = {"onnxruntime": (result.quantization.fidelity, result.cases)}
        patches = np.concatenate(list(calibration_patches(m, sets[:1], max_patches=args.patches)))
        engines = {}
        names = ["onnxruntime"]
        try:
            import openvino  # noqa: F401

            names.append("openvino")
            ov_cases = compare_bundles(fp32.model_bytes, int8.model_bytes, m, sets, threads=args.threads,
                                       backend="openvino")
            fidelity["openvino"] = (summarise(ov_cases, source="same phantoms", backend="openvino"), ov_cases)
        except ImportError:
            pass
        options = BackendOptions(threads=args.threads)
        opened = []
        for name in names:
            for label, bundle in (("fp32", fp32), ("int8", int8)):
                engine = create_backend(name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                                        options=options)
                opened.append(engine)
                engines[f"{name} {label}"] = engine
        speed = latency_per_patch(engines, patches, args.rounds)
        for engine in opened:
            engine.close()

    cohort_of = {prefix: cohort for cohort, (prefix, _) in COHORTS.items()}
    cases = [{"case": c.case_id, "cohort": cohort_of[c.case_id.split("_")[0]], "backend": engine,
              "voxel_agreement": c.voxel_agreement, "dice_vs_fp32": c.dice, "u_fp32": c.u_fp32, "u_int8": c.u_int8,
              "ood_fp32": c.ood_fp32, "ood_int8": c.ood_int8}
             for engine, (_, engine_cases) in fidelity.items() for c in engine_cases]
    q = result.quantization
    out = {
        "benchmark": "int8_fidelity", "bundle": str(args.bundle.name), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "contended": args.contended, "machine": machine_info(),
        "packages": package_versions(["onnxruntime", "openvino", "onnx", "numpy"]),
        "quantization": {k: v for k, v in q.__dict__.items() if k != "fidelity"},
        "fidelity": {engine: summary.__dict__ for engine, (summary, _) in fidelity.items()},
        "quantize_seconds": quantize_s, "cases": cases, "latency_per_patch": speed,
        "patch_size": list(m.patch_size),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "int8_demo.json").write_text(json.dumps(out, indent=2) + "\n")
    flags = ", ".join(k for k, v in out["machine"]["cpu_flags"].items() if v) or "unknown"
    md = [f"# INT8 vs float32, {args.bundle.name} ({out['date']})", "",
          f"Machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, flags: {flags}."
          + (" **Timings contended** (other jobs shared the cores)." if args.contended else ""), "",
          f"Quantised ({q.method}, {'/'.join(q.op_types)}, weights {q.weights}, activations {q.activations}) from "
          f"{q.n_calibration_patches} patches of {q.n_calibration_cases} ID phantoms in {quantize_s:.1f} s (fidelity "
          f"runs included); {len(q.fp32_nodes)} nodes kept float32 (Mahalanobis head, InstanceNorms). The int8 "
          "bundle keeps the float32 calibration (U not re-calibrated).", ""]
    for engine, (f, _) in fidelity.items():
        md.append(f"Fidelity on {engine}, {f.n_cases} fresh phantoms: voxel agreement min "
                  f"{f.voxel_agreement_min:.6f} / mean {f.voxel_agreement_mean:.6f}; foreground Dice vs fp32 min "
                  f"{f.dice_min:.4f} / mean {f.dice_mean:.4f}; max |ΔU| {f.max_abs_u_difference:.4f}; OOD flags "
                  f"changed: {f.flags_changed}.")
        md.append("")
    md += ["| engine | case | cohort | voxel agreement | Dice vs fp32 | U fp32 | U int8 | flag fp32 → int8 |",
           "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        md.append(f"| {c['backend']} | {c['case']} | {c['cohort']} | {c['voxel_agreement']:.6f} | "
                  f"{c['dice_vs_fp32']:.4f} | {c['u_fp32']:.4f} | {c['u_int8']:.4f} | {c['ood_fp32']} → "
                  f"{c['ood_int8']} |")
    md += ["", f"Per-patch latency (batch 1, patch {m.patch_size}, {args.rounds} alternating rounds of "
           f"{args.patches} patches; median, min-max):", "", "| engine | median ms | min-max ms | vs fp32 |",
           "|---|---|---|---|"]
    for name, s in speed.items():
        base = speed[name.replace("int8", "fp32")]["median_s"]
        md.append(f"| {name} | {1e3 * s['median_s']:.1f} | {1e3 * s['min_s']:.1f}-{1e3 * s['max_s']:.1f} | "
                  f"{base / s['median_s']:.2f}× |")
    (RESULTS / "int8_demo.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
