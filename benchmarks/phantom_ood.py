"""The phantom OOD benchmark: the embedded demo model against every shift scenario, in one command.

    python benchmarks/phantom_ood.py --n 8                      # output baselines only, ~4 min on 2 cores
    python benchmarks/phantom_ood.py --n 10 --tta --mc-dropout  # + TTA and MC dropout (~19x the inference)
    python benchmarks/phantom_ood.py ... --model-folder demo-train/results/Dataset500_PhantomLung/DemoTrainer__nnUNetPlans__3d_fullres \
        --train-images demo-train/raw/Dataset500_PhantomLung/imagesTr   # + the feature-layer ablation

Generates a held-out in-distribution phantom cohort and the shifted cohorts (dataset shift, diagnostic shift,
far-OOD), derives transformation shifts from the ID cohort with TorchIO (artefact and affine at the weak, medium
and strong levels of the paper's Table 4), and runs ``ood-eval`` (Mahalanobis vs max softmax / KL / energy, and
TTA / MC dropout when asked) on all of them with the embedded demo bundle. The feature-layer ablation needs the
trained demo model folder and its training images (``scripts/train_demo_model.py`` makes both; the bundle
shipped in the package does not carry the torch checkpoint): each layer is exported and calibrated exactly as
the shipped bundle was (Ledoit-Wolf, 5-fold cross-fitted training scores). Writes
``benchmarks/results/phantom_ood/`` (report.md, report.html, cases.csv, results.json).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "phantom_ood"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="cases per set")
    parser.add_argument("--levels", nargs="+", default=["weak", "medium", "strong"],
                        choices=["weak", "medium", "strong"], help="transformation-shift levels")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--tta", action="store_true", help="add the TTA baseline (8 flips per case)")
    parser.add_argument("--mc-dropout", action="store_true", help="add the MC dropout baseline (10 passes per case)")
    parser.add_argument("--model-folder", type=Path, help="trained demo nnU-Net model folder (layer ablation)")
    parser.add_argument("--train-images", type=Path, help="its training images (calibration of each layer)")
    parser.add_argument("--layers", nargs="+", default=["encoder.stages.2", "encoder.stages.3", "decoder.stages.0"],
                        help="feature layers for the ablation (the shipped bundle taps encoder.stages.-1)")
    args = parser.parse_args(argv)
    if (args.model_folder is None) != (args.train_images is None):
        parser.error("the layer ablation needs both --model-folder and --train-images")

    from segsentry.demo import demo_bundle_path
    from segsentry.evaluation.evaluate import evaluate
    from segsentry.evaluation.shifts import shift_folder
    from segsentry.phantoms import write_cohort

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segsentry-phantom-ood-") as tmp:
        work = Path(tmp)
        write_cohort(work / "id", cohort="id", n=args.n, seed=5000, prefix="ID")
        sets = {}
        for cohort, seed in (("dataset-shift", 6000), ("diagnostic-shift", 7000), ("far-ood", 8000)):
            write_cohort(work / cohort, cohort=cohort, n=args.n, seed=seed, prefix=cohort[:2].upper())
            sets[cohort] = work / cohort
        for kind in ("artefact", "affine"):
            for level in args.levels:
                target = work / f"{kind}-{level}"
                shift_folder(work / "id", target, kind=kind, level=level, seed=1)
                sets[f"{kind}-{level}"] = target
        layers = _layer_bundles(args, work / "layers") if args.model_folder else {}
        out = work / "report"
        evaluate(demo_bundle_path(), work / "id", sets, out, backend=args.backend, tta=args.tta,
                 mc_dropout=args.mc_dropout, layers=layers)
        if RESULTS.exists():
            shutil.rmtree(RESULTS)
        RESULTS.mkdir(parents=True)
        for name in ("report.md", "report.html", "cases.csv", "results.json"):
            shutil.copy(out / name, RESULTS / name)
    elapsed = time.perf_counter() - start
    with open(RESULTS / "report.md", "a") as f:
        f.write(f"\n{args.n} cases per set; wall time {elapsed / 60:.1f} min "
                f"({time.strftime('%Y-%m-%d %H:%M')}; `python benchmarks/phantom_ood.py "
                f"{' '.join(argv if argv is not None else sys.argv[1:])}`).\n")
    print((RESULTS / "report.md").read_text())
    return 0


def _layer_bundles(args: argparse.Namespace, root: Path) -> dict[str, Path]:
    """Export and calibrate the demo network at each ablation layer, as the shipped bundle was made."""
    from segsentry.calib import calibrate
    from segsentry.export import export_nnunet

    bundles = {}
    for layer in args.layers:
        name = layer.replace("encoder.stages.", "enc").replace("decoder.stages.", "dec")
        features = export_nnunet(args.model_folder, root / f"{name}.features.onnx", layer=layer).path
        bundles[name] = calibrate(features, [args.train_images], root / f"{name}.ood.onnx",
                                  estimator="ledoit-wolf").path
    return bundles


if __name__ == "__main__":
    sys.exit(main())
