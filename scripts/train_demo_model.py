"""Train segsentry's embedded demo model with nnU-Net itself, on phantom chest CTs, on the CPU.

    python scripts/train_demo_model.py --work /tmp/demo-train            # the shipped bundle: folds 0 + 1, ~65 min
    python scripts/train_demo_model.py --work /tmp/demo-train --resume   # keep finished folds, continue an
                                                                         # interrupted one, then export
    python scripts/train_demo_model.py --work /tmp/demo-train --folds 0 --out /tmp/one.ood.onnx
                                                                         # fold 0 alone: one network, ~30 min

Reproducible recipe (seeded phantoms, fixed plan):
1. write the in-distribution phantom cohort in nnU-Net raw layout (Dataset500_PhantomLung, lesion label 1);
2. nnU-Net fingerprint + planning, then a deliberately small 3d_fullres plan: spacing 3.0 x 1.6 x 1.6 mm,
   patch 32 x 64 x 64, PlainConvUNet with 5 stages of 8..128 features (1.4 M parameters); nnU-Net
   preprocessing;
3. nnU-Net training of folds 0 and 1 (``--folds``; each from the same torch seed) with a trainer subclass that
   only shortens the schedule (epochs x iterations), constructed directly with device=cpu (nnU-Net's trainer lookup cannot import timm here);
4. segsentry export + calibration (Ledoit-Wolf, normalised aggregation) on the training images, with the
   conformal threshold set on a separate unlabelled in-distribution cohort (``--calibration-cases``, its own
   seed), written to ``segsentry/models/demo_lung.ood.onnx``; with several folds U also holds the folds'
   disagreement (``--ensemble-score fused``, mapped onto the distance's scale on the same calibration cohort);
5. Dice on held-out ID phantoms and on each shifted cohort, written to benchmarks/results/demo_model.json/.md
   (``demo_model_<n>folds.*`` for an ensemble).

nnU-Net reads its folders from environment variables; this script sets them for its own run only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

DATASET_ID = 500
DATASET = "Dataset500_PhantomLung"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "segsentry" / "models" / "demo_lung.ood.onnx"
RESULTS = REPO / "benchmarks" / "results"

SMALL_PLAN = {
    "spacing": [3.0, 1.6, 1.6],
    "patch_size": [32, 64, 64],
    "batch_size": 2,
    "features": [8, 16, 32, 64, 128],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
}


def _reduce_plan(plans_path: Path) -> dict:
    plans = json.loads(plans_path.read_text())
    config = plans["configurations"]["3d_fullres"]
    n = len(SMALL_PLAN["features"])
    config["spacing"] = SMALL_PLAN["spacing"]
    config["patch_size"] = SMALL_PLAN["patch_size"]
    config["batch_size"] = SMALL_PLAN["batch_size"]
    arch = config["architecture"]["arch_kwargs"]
    arch.update({
        "n_stages": n,
        "features_per_stage": SMALL_PLAN["features"],
        "kernel_sizes": [[3, 3, 3]] * n,
        "strides": SMALL_PLAN["strides"],
        "n_conv_per_stage": [2] * n,
        "n_conv_per_stage_decoder": [2] * (n - 1),
    })
    for other in [k for k in plans["configurations"] if k != "3d_fullres"]:
        del plans["configurations"][other]
    plans_path.write_text(json.dumps(plans, indent=2))
    return plans


def _training_seconds_from_log(fold_dir: Path) -> float:
    """Wall time of a finished nnU-Net training, from its log (first entry to 'Training done.')."""
    from datetime import datetime

    stamps = []
    for log in sorted(fold_dir.glob("training_log_*.txt")):
        for line in log.read_text().splitlines():
            if line[:4].isdigit() and ": " in line:
                stamps.append((datetime.strptime(line.split(": ", 1)[0], "%Y-%m-%d %H:%M:%S.%f"), line))
    done = [t for t, line in stamps if "Training done" in line]
    return (done[-1] - stamps[0][0]).total_seconds() if stamps and done else float("nan")


def _dice(a, b) -> float:
    import numpy as np

    a, b = a > 0, b > 0
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(a, b).sum() / denom)


def evaluate(bundle: Path, work: Path, *, n_cases: int) -> dict:
    """Dice of the exported bundle (segsentry runtime) per phantom cohort, with the OOD scores."""
    import numpy as np
    import SimpleITK as sitk

    from segsentry.phantoms import write_cohort
    from segsentry.runtime import run_batch

    out: dict = {}
    for cohort, seed in (("id", 1000), ("dataset-shift", 2000), ("diagnostic-shift", 3000), ("far-ood", 4000)):
        folder = work / "eval" / cohort
        write_cohort(folder, cohort=cohort, n=n_cases, seed=seed, prefix="EV")
        result = run_batch(bundle, [folder / "imagesTr"], work / "eval_out" / cohort)
        rows = []
        for o in result.outcomes:
            pred = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "eval_out" / cohort / f"{o.case_id}.nii.gz")))
            ref = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{o.case_id}.nii.gz")))
            rows.append({"case": o.case_id, "dice": _dice(pred, ref), "uncertainty": o.report.uncertainty,
                         "ood": o.report.ood, "fold_agreement": o.report.fold_agreement})
        out[cohort] = {
            "n": len(rows),
            "mean_dice": float(np.mean([r["dice"] for r in rows])),
            "flagged_ood": int(sum(r["ood"] for r in rows)),
            "mean_uncertainty": float(np.mean([r["uncertainty"] for r in rows])),
            "cases": rows,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("demo-train"))
    parser.add_argument("--cases", type=int, default=60, help="training phantoms (fold 0 trains on 80%)")
    parser.add_argument("--calibration-cases", type=int, default=40,
                        help="unlabelled ID phantoms (seed --seed + 500) that set the conformal threshold")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-cases", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1],
                        help="nnU-Net folds to train and export as one bundle (the shipped demo: folds 0 and 1, an "
                             "ensemble bundle; one fold: a single network)")
    parser.add_argument("--ensemble-score", default="fused", choices=["fused", "distance"],
                        help="several folds: U fuses the folds' disagreement with the distance, or the distance alone")
    parser.add_argument("--resume", "--continue-training", action="store_true", dest="resume",
                        help="reuse --work: folds with checkpoint_final.pth are kept, an interrupted fold continues "
                             "from nnU-Net's checkpoint_latest.pth, missing folds are trained")
    args = parser.parse_args(argv)

    work = args.work.resolve()
    keep = args.resume
    if not keep:
        if work.exists():
            shutil.rmtree(work)
        for name in ("raw", "preprocessed", "results"):
            (work / name).mkdir(parents=True)
    os.environ.update({
        "nnUNet_raw": str(work / "raw"),
        "nnUNet_preprocessed": str(work / "preprocessed"),
        "nnUNet_results": str(work / "results"),
        "nnUNet_n_proc_DA": "2",  # planning calls torch.set_num_threads with it; 0 (fastest here) for training
        "nnUNet_compile": "false",
    })
    import numpy as np
    import torch

    from segsentry.phantoms import write_cohort

    timings: dict[str, float] = {}
    calibration_dir = work / "calibration"
    if not keep:
        t0 = time.perf_counter()
        write_cohort(work / "raw" / DATASET, cohort="id", n=args.cases, seed=args.seed, prefix="PH")
        write_cohort(calibration_dir, cohort="id", n=args.calibration_cases, seed=args.seed + 500, prefix="CAL")
        timings["phantoms"] = time.perf_counter() - t0

    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans_path = work / "preprocessed" / DATASET / "nnUNetPlans.json"
    if not keep:
        t0 = time.perf_counter()
        extract_fingerprints([DATASET_ID], num_processes=2, check_dataset_integrity=True)
        plan_experiments([DATASET_ID])
        _reduce_plan(plans_path)
        preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(2,))
        timings["plan_and_preprocess"] = time.perf_counter() - t0

    class DemoTrainer(nnUNetTrainer):
        """nnU-Net's default trainer with a short schedule (everything else unchanged)."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = args.epochs
            self.num_iterations_per_epoch = args.iterations
            self.num_val_iterations_per_epoch = 10
            self.save_every = 5  # checkpoint_latest.pth every 5 epochs: an interrupted run loses little

    os.environ["nnUNet_n_proc_DA"] = "0"  # single-threaded augmentation is fastest on 2 cores
    dataset_json = json.loads((work / "preprocessed" / DATASET / "dataset.json").read_text())
    validation: dict[int, float] = {}
    trainer = None
    for fold in args.folds:
        torch.manual_seed(args.seed)  # every fold starts as fold 0 did; the folds differ by their data split
        np.random.seed(args.seed)  # (seed 1 for fold 1 collapsed to all-background in 60 epochs: Dice 0.0)
        plans = json.loads(plans_path.read_text())
        plans["continue_training"] = False  # nnU-Net 2.8.1 pops this key in the trainer
        trainer = DemoTrainer(plans, "3d_fullres", fold, dataset_json, device=torch.device("cpu"))
        fold_dir = Path(trainer.output_folder)
        final, latest = fold_dir / "checkpoint_final.pth", fold_dir / "checkpoint_latest.pth"
        if keep and final.is_file():  # trained in an earlier session: reuse it
            trainer.initialize()
            trainer.load_checkpoint(str(final))
        elif keep and latest.is_file():  # interrupted: continue from nnU-Net's latest checkpoint
            trainer.initialize()
            trainer.load_checkpoint(str(latest))
            trainer.run_training()
        else:
            trainer.run_training()
        timings[f"training_fold{fold}"] = _training_seconds_from_log(fold_dir)
        summary_json = fold_dir / "validation" / "summary.json"
        if not summary_json.is_file():
            t0 = time.perf_counter()
            trainer.perform_actual_validation(False)  # nnU-Net's own prediction of the fold's validation cases
            timings[f"nnunet_validation_fold{fold}"] = time.perf_counter() - t0
        validation[fold] = json.loads(summary_json.read_text())["foreground_mean"]["Dice"]
    assert trainer is not None
    model_dir = Path(trainer.output_folder_base)

    from segsentry.calib import calibrate
    from segsentry.export import export_nnunet

    t0 = time.perf_counter()
    features = export_nnunet(model_dir, work / "demo_lung.features.onnx", folds=args.folds).path
    args.out.parent.mkdir(parents=True, exist_ok=True)
    calibration = calibrate(features, [work / "raw" / DATASET / "imagesTr"], args.out, estimator="ledoit-wolf",
                            calibration_images=[calibration_dir / "imagesTr"],
                            ensemble_score=args.ensemble_score if len(args.folds) > 1 else "distance")
    timings["export_and_calibrate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dice = evaluate(args.out, work, n_cases=args.eval_cases)
    timings["evaluation"] = time.perf_counter() - t0

    summary = {
        "recipe": {**SMALL_PLAN, "training_cases": args.cases, "epochs": args.epochs,
                   "iterations_per_epoch": args.iterations, "seed": args.seed, "trainer": "nnUNetTrainer "
                   "(shortened schedule)", "nnunetv2": "2.8.1", "folds": args.folds},
        "parameters": int(sum(p.numel() for p in trainer.network.parameters())),
        "nnunet_validation_dice": {str(k): v for k, v in validation.items()},
        "dice_per_cohort_segsentry_runtime": {k: {kk: vv for kk, vv in v.items() if kk != "cases"}
                                              for k, v in dice.items()},
        "calibration": {"n_patches": calibration.calibration.n_patches, "n_cases": calibration.calibration.n_cases,
                        "score_fit": calibration.calibration.score_fit,
                        "threshold_rule": calibration.calibration.threshold_rule,
                        "alpha": calibration.calibration.alpha,
                        "calibration_source": calibration.calibration.calibration_source,
                        "threshold": calibration.calibration.threshold, "D": calibration.fit.n_features,
                        "fusion": (None if calibration.calibration.fusion is None else
                                   {"offset": calibration.calibration.fusion.offset,
                                    "scale": calibration.calibration.fusion.scale,
                                    "mirrored": calibration.calibration.fusion.mirrored}),
                        "shrinkage": calibration.calibration.shrinkage},
        "bundle_bytes": args.out.stat().st_size,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "cases": {k: v["cases"] for k, v in dice.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "demo_model" if len(args.folds) == 1 else f"demo_model_{len(args.folds)}folds"
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# Demo model (nnU-Net 2.8.1 on phantom chest CTs, CPU)", "",
             f"{summary['parameters'] / 1e6:.2f} M parameters, patch {SMALL_PLAN['patch_size']}, spacing "
             f"{SMALL_PLAN['spacing']} mm, {args.epochs} epochs x {args.iterations} iterations, "
             f"{len(args.folds)} nnU-Net folds, training "
             + ", ".join(f"{timings[f'training_fold{k}'] / 60:.1f}" for k in args.folds)
             + f" min; bundle {summary['bundle_bytes'] / 1e6:.1f} MB; nnU-Net validation Dice per fold "
             + ", ".join(f"{v:.3f}" for v in validation.values()) + ".", "",
             "| cohort | n | mean Dice | mean U | flagged OOD |", "|---|---|---|---|---|"]
    for cohort, v in dice.items():
        lines.append(f"| {cohort} | {v['n']} | {v['mean_dice']:.3f} | {v['mean_uncertainty']:.3f} | "
                     f"{v['flagged_ood']}/{v['n']} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
