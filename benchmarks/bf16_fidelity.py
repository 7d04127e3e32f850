"""OpenVINO bf16 vs fp32 on the shipped demo bundle: fidelity on fresh phantoms of every cohort, and speed.

    python benchmarks/bf16_fidelity.py                  # 10 phantoms per cohort, ~15 min on 2 cores
    python benchmarks/bf16_fidelity.py --per-cohort 4   # quicker

``--precision bf16`` (``ood-run``) runs the network with OpenVINO's bf16 inference precision and the fused
Mahalanobis head apart in fp32; the bundle's calibration (threshold, U's range) is the fp32 one. Fidelity:
``--per-cohort`` new phantoms of each cohort (id, dataset-shift, diagnostic-shift, far-ood; seed ``--seed``,
used nowhere else), each run as ``ood-run`` deploys the bundle (mirrored, the fold ensemble) on OpenVINO fp32
and bf16: voxel agreement of the masks, foreground Dice of the bf16 mask against the fp32 one, U of both and
whether the OOD flag changed. Speed: per-patch latency of network + head at batch 1, fp32 and bf16 alternating,
medians and min-max over ``--rounds`` rounds of ``--patches`` patches. Refuses to run without native bf16
(AVX512_BF16 or AMX). Results: ``benchmarks/results/bf16_demo.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info, package_versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_fidelity import latency_per_patch  # noqa: E402 - the sibling benchmark's timing loop

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parent.parent / "segsentry" / "models" / "demo_lung.ood.onnx"
COHORTS = {"id": "ID", "dataset-shift": "DS", "diagnostic-shift": "DX", "far-ood": "FO"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO)
    parser.add_argument("--per-cohort", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=9100)
    args = parser.parse_args(argv)

    from segsentry.calib.quantize import calibration_patches, compare_bundles, summarise
    from segsentry.phantoms import write_cohort
    from segsentry.runtime import load_bundle
    from segsentry.runtime.backends import BackendOptions, create_backend

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    with tempfile.TemporaryDirectory(prefix="segsentry-bf16-") as tmp:
        work = Path(tmp)
        sets = []
        for cohort, prefix in COHORTS.items():
            write_cohort(work / cohort, cohort=cohort, n=args.per_cohort, seed=args.seed, prefix=prefix)
            sets.append(work / cohort / "imagesTr")
        start = time.perf_counter()
        compared = compare_bundles(bundle.model_bytes, bundle.model_bytes, m, sets, threads=args.threads,
                                   backend="openvino", precision="bf16")
        fidelity_s = time.perf_counter() - start
        summary = summarise(compared, source=f"{len(compared)} new phantoms, seed {args.seed}", backend="openvino")
        patches = np.concatenate(list(calibration_patches(m, sets[:1], max_patches=args.patches)))
        engines = {precision: create_backend("openvino", bundle.model_bytes, channels=m.num_channels,
                                             patch_size=m.patch_size,
                                             options=BackendOptions(threads=args.threads, precision=precision))
                   for precision in ("fp32", "bf16")}
        try:
            speed = latency_per_patch(engines, patches, args.rounds)
        finally:
            for engine in engines.values():
                engine.close()

    cohort_of = {prefix: cohort for cohort, prefix in COHORTS.items()}
    cases = [{"case": c.case_id, "cohort": cohort_of[c.case_id.split("_")[0]], "voxel_agreement": c.voxel_agreement,
              "dice_vs_fp32": c.dice, "u_fp32": c.u_fp32, "u_bf16": c.u_int8, "ood_fp32": c.ood_fp32,
              "ood_bf16": c.ood_int8} for c in compared]
    out = {
        "benchmark": "bf16_fidelity", "bundle": args.bundle.name, "n_folds": m.n_folds,
        "mirror_axes": m.tiling.mirror_axes, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
        "packages": package_versions(["openvino", "onnxruntime", "onnx", "numpy"]),
        "fidelity": summary.__dict__, "fidelity_seconds": fidelity_s, "cases": cases,
        "latency_per_patch": speed, "patch_size": list(m.patch_size), "seed": args.seed,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bf16_demo.json").write_text(json.dumps(out, indent=2) + "\n")
    flags = ", ".join(k for k, v in out["machine"]["cpu_flags"].items() if v) or "unknown"
    s = summary
    per_cohort = {cohort: [c for c in cases if c["cohort"] == cohort] for cohort in COHORTS}
    md = [f"# OpenVINO bf16 vs fp32, {args.bundle.name} ({out['date']})", "",
          f"Machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, flags: {flags}; OpenVINO "
          f"{out['packages'].get('openvino')}. Network in bf16, Mahalanobis head compiled apart in fp32; the bundle's "
          f"fp32 calibration (threshold, U range) unchanged. {m.n_folds} fold(s), mirrored as deployed.", "",
          f"Fidelity, {s.n_cases} new phantoms (seed {args.seed}): voxel agreement min {s.voxel_agreement_min:.6f} / "
          f"mean {s.voxel_agreement_mean:.6f}; foreground Dice vs fp32 min {s.dice_min:.4f} / mean "
          f"{s.dice_mean:.4f}; max |ΔU| {s.max_abs_u_difference:.4f}; OOD flags changed: {s.flags_changed} of "
          f"{s.n_cases}.", "",
          "| cohort | cases | voxel agreement min / mean | Dice vs fp32 min / mean | max \\|ΔU\\| | flagged fp32 → bf16 |",
          "|---|---|---|---|---|---|"]
    for cohort, rows in per_cohort.items():
        agreement = [r["voxel_agreement"] for r in rows]
        dice = [r["dice_vs_fp32"] for r in rows]
        du = [abs(r["u_bf16"] - r["u_fp32"]) for r in rows if r["u_fp32"] is not None]
        md.append(f"| {cohort} | {len(rows)} | {min(agreement):.6f} / {np.mean(agreement):.6f} | {min(dice):.4f} / "
                  f"{np.mean(dice):.4f} | {max(du):.4f} | {sum(bool(r['ood_fp32']) for r in rows)} → "
                  f"{sum(bool(r['ood_bf16']) for r in rows)} |")
    md += ["", f"Per-patch latency (batch 1, patch {m.patch_size}, network + head of {m.n_folds} fold(s), "
           f"{args.rounds} alternating rounds of {args.patches} patches; median, min-max):", "",
           "| precision | median ms | min-max ms | vs fp32 |", "|---|---|---|---|"]
    for name, t in speed.items():
        md.append(f"| {name} | {1e3 * t['median_s']:.1f} | {1e3 * t['min_s']:.1f}-{1e3 * t['max_s']:.1f} | "
                  f"{speed['fp32']['median_s'] / t['median_s']:.2f}× |")
    (RESULTS / "bf16_demo.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
