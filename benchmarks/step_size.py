"""How the tile step size moves U, the masks and the patch count (demo bundle, phantoms of every cohort).

    python benchmarks/step_size.py                 # ~20 s on 2 cores (--inplane 320: ~3 min)
    python benchmarks/step_size.py --steps 0.5 0.7 0.8

The bundle's threshold and U normalisation were calibrated at its own step size (0.5 for every bundle so far);
``predict_case(step_size=...)`` tiles differently, so U at another step is not calibrated. This measures how
far it moves: per case U and the flag at each step, the mask agreement with step 0.5 and the patch count, on
onnxruntime. Results: ``benchmarks/results/step_size_demo.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parent.parent / "segsentry" / "models" / "demo_lung.ood.onnx"
COHORTS = {"id": ("ID", 4), "dataset-shift": ("DS", 2), "diagnostic-shift": ("DX", 2), "far-ood": ("FO", 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO)
    parser.add_argument("--steps", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--seed", type=int, default=900)
    parser.add_argument("--name", default="step_size_demo", help="result file name (without .json / .md)")
    parser.add_argument("--inplane", type=int, default=160,
                        help="phantom in-plane matrix (160: the demo model's training size; 320 tiles 2-3x more "
                        "but is out of its distribution: U saturates at 1)")
    args = parser.parse_args(argv)
    if args.steps[0] != 0.5:
        args.steps = [0.5, *[s for s in args.steps if s != 0.5]]

    from segsentry.phantoms import write_cohort
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.io import collect_cases
    from segsentry.runtime.pipeline import predict_case

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    rows = []
    with tempfile.TemporaryDirectory(prefix="segsentry-step-") as tmp, \
            create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size) as b:
        for cohort, (prefix, n) in COHORTS.items():
            write_cohort(Path(tmp) / cohort, cohort=cohort, n=n, seed=args.seed, prefix=prefix,
                         inplane=args.inplane)
            for case in collect_cases([Path(tmp) / cohort / "imagesTr"], num_channels=m.num_channels):
                loaded = read_case(case, num_channels=m.num_channels)
                ref = None
                row = {"case": case.case_id, "cohort": cohort, "steps": {}}
                for step in args.steps:
                    t0 = time.perf_counter()
                    p = predict_case(loaded, b, m, step_size=step, with_uncertainty_map=False)
                    seconds = time.perf_counter() - t0
                    ref = p.mask if ref is None else ref
                    row["steps"][str(step)] = {"u": p.uncertainty_score, "ood": p.ood, "n_patches": p.n_patches,
                                               "seconds": seconds, "mask_agreement_vs_0.5": float(np.mean(p.mask == ref))}
                rows.append(row)
    base = "0.5"
    shifts = {str(s): [r["steps"][str(s)]["u"] - r["steps"][base]["u"] for r in rows] for s in args.steps[1:]}
    out = {"benchmark": "step_size", "bundle": args.bundle.name, "phantom_inplane": args.inplane, "calibrated_step": m.tiling.step_size,
           "threshold": m.calibration.threshold if m.calibration else None, "cases": rows,
           "u_shift_vs_0.5": {s: {"mean": float(np.mean(v)), "max_abs": float(np.max(np.abs(v)))}
                              for s, v in shifts.items()},
           "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [f"# Tile step size vs U, {args.bundle.name} ({out['date']})", "",
          f"Calibrated at step {m.tiling.step_size}, threshold U > {out['threshold']:.3f}; onnxruntime; "
          f"{len(rows)} fresh phantoms ({args.inplane} x {args.inplane} slices). U at another step is not "
          "calibrated.", "",
          "| case | cohort | " + " | ".join(f"U @{s} (flag, patches)" for s in args.steps)
          + " | " + " | ".join(f"mask agreement @{s}" for s in args.steps[1:]) + " |",
          "|---|---|" + "---|" * (2 * len(args.steps) - 1)]
    for r in rows:
        cells = [f"{r['steps'][str(s)]['u']:.4f} ({'OOD' if r['steps'][str(s)]['ood'] else 'in'}, "
                 f"{r['steps'][str(s)]['n_patches']})" for s in args.steps]
        cells += [f"{r['steps'][str(s)]['mask_agreement_vs_0.5']:.6f}" for s in args.steps[1:]]
        md.append(f"| {r['case']} | {r['cohort']} | " + " | ".join(cells) + " |")
    md += [""] + [f"U shift at step {s} vs 0.5: mean {v['mean']:+.4f}, max |shift| {v['max_abs']:.4f}; flags "
                  f"changed: {sum(r['steps'][s]['ood'] != r['steps'][base]['ood'] for r in rows)}"
                  for s, v in out["u_shift_vs_0.5"].items()]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
