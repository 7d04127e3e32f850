"""Masks of the shipped bundle as ``ood-run`` deploys it vs nnU-Net's own predictor on the trained checkpoints.

    python benchmarks/nnunet_parity.py --model-folder demo-train/results/Dataset500_PhantomLung/DemoTrainer__nnUNetPlans__3d_fullres

The parity tests compare against ``nnUNetPredictor`` on tiny random-weight folders, whose logits are nearly
tied everywhere. This runs the real thing: the trained fold ensemble the bundle was exported from (each fold's
``checkpoint_final.pth``, checked against the sha256 in the bundle's manifest), nnU-Net's default prediction
(``nnUNetPredictor(tile_step_size=0.5, use_mirroring=True)`` over every fold of the bundle) against ``run_batch``
with the bundle's defaults (mirroring on, every fold), on ``--per-cohort`` new phantoms of each cohort (seed
``--seed``, used nowhere else). Per case: the voxels whose label differs, the foreground Dice between the two
masks, and nnU-Net's own foreground probability at the differing voxels (near 0.5: a tie that float16
accumulation decides either way). Results: ``benchmarks/results/nnunet_parity_demo.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info, package_versions
from segsentry.runtime.agreement import dice

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parent.parent / "segsentry" / "models" / "demo_lung.ood.onnx"
COHORTS = {"id": "ID", "dataset-shift": "DS", "diagnostic-shift": "DX", "far-ood": "FO"}


def _checked_folds(manifest, model_folder: Path) -> list[str]:
    """The bundle's folds, after checking that ``model_folder`` holds the very checkpoints it was exported from."""
    folds = []
    for source in manifest.folds:
        checkpoint = model_folder / f"fold_{source.fold}" / source.checkpoint
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        if digest != source.sha256:
            raise SystemExit(f"{checkpoint} is not the checkpoint the bundle was exported from "
                             f"(sha256 {digest[:12]}…, manifest {source.sha256[:12]}…)")
        folds.append(source.fold)
    return folds


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Foreground Dice of two label maps; None when neither has a foreground (nothing to compare)."""
    a, b = a > 0, b > 0
    return dice(a, b) if a.any() or b.any() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-folder", type=Path, required=True, help="the nnU-Net folder the bundle came from")
    parser.add_argument("--bundle", type=Path, default=DEMO)
    parser.add_argument("--per-cohort", type=int, default=5)
    parser.add_argument("--seed", type=int, default=9200)
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--name", default="nnunet_parity_demo")
    args = parser.parse_args(argv)

    import SimpleITK as sitk

    from segsentry.devtools.nnunet_reference import make_predictor
    from segsentry.phantoms import write_cohort
    from segsentry.runtime import load_bundle, run_batch

    manifest = load_bundle(args.bundle).manifest
    folds = _checked_folds(manifest, args.model_folder)
    predictor = make_predictor(args.model_folder, folds=folds, use_mirroring=True)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    cases: list[dict] = []
    seconds = {"nnunet": 0.0, **{b: 0.0 for b in args.backends}}
    with tempfile.TemporaryDirectory(prefix="segsentry-parity-") as tmp:
        work = Path(tmp)
        images = {}
        for cohort, prefix in COHORTS.items():
            write_cohort(work / cohort, cohort=cohort, n=args.per_cohort, seed=args.seed, prefix=prefix)
            images[cohort] = work / cohort / "imagesTr"
        masks: dict[str, dict[str, np.ndarray]] = {b: {} for b in args.backends}
        for backend in args.backends:
            start = time.perf_counter()
            result = run_batch(args.bundle, list(images.values()), work / f"out-{backend}", backend=backend,
                               qa=False)
            seconds[backend] = time.perf_counter() - start
            for outcome in result.outcomes:
                if outcome.status != "ok":
                    raise SystemExit(f"{backend}: case {outcome.case_id} failed: {outcome.error}")
                masks[backend][outcome.case_id] = sitk.GetArrayFromImage(
                    sitk.ReadImage(outcome.report.outputs["mask"]))
        for cohort, folder in images.items():
            for image in sorted(folder.glob("*_0000.nii.gz")):
                case_id = image.name[: -len("_0000.nii.gz")]
                start = time.perf_counter()
                data, properties = SimpleITKIO().read_images([str(image)])
                reference, probabilities = predictor.predict_single_npy_array(
                    data, properties, save_or_return_probabilities=True)
                seconds["nnunet"] += time.perf_counter() - start
                foreground = probabilities[1:].sum(axis=0)
                row = {"case": case_id, "cohort": cohort, "voxels": int(reference.size),
                       "foreground_nnunet": int((reference > 0).sum())}
                for backend in args.backends:
                    ours = masks[backend][case_id]
                    differ = ours != reference
                    row[backend] = {
                        "differing": int(differ.sum()),
                        "agreement": 1.0 - float(differ.mean()),
                        "dice": _dice(ours, reference),
                        "max_abs_p_minus_half": (float(np.abs(foreground[differ] - 0.5).max())
                                                 if differ.any() else None),
                    }
                cases.append(row)
                print(case_id, {b: row[b]["differing"] for b in args.backends}, flush=True)

    summary = {}
    for backend in args.backends:
        differing = sum(c[backend]["differing"] for c in cases)
        voxels = sum(c["voxels"] for c in cases)
        margins = [c[backend]["max_abs_p_minus_half"] for c in cases if c[backend]["max_abs_p_minus_half"] is not None]
        dices = [c[backend]["dice"] for c in cases if c[backend]["dice"] is not None]
        summary[backend] = {
            "differing": differing, "voxels": voxels, "agreement": 1.0 - differing / voxels,
            "min_case_agreement": min(c[backend]["agreement"] for c in cases),
            "min_dice": min(dices) if dices else None,
            "cases_identical": sum(c[backend]["differing"] == 0 for c in cases),
            "max_abs_p_minus_half": max(margins) if margins else None,
        }
    out = {
        "bundle": args.bundle.name, "model_folder": str(args.model_folder), "folds": folds,
        "nnunet": "nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True), CPU",
        "segsentry": "run_batch with the bundle's defaults (mirroring on, every fold), qa off",
        "seed": args.seed, "per_cohort": args.per_cohort, "summary": summary, "cases": cases,
        "seconds": seconds, "machine": machine_info(),
        "versions": package_versions(["segsentry", "nnunetv2", "torch", "onnxruntime", "openvino", "numpy"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"{args.name}.md").write_text(render(out))
    print(render(out))
    return 0


def render(out: dict) -> str:
    m = out["machine"]
    lines = [
        f"# Masks vs nnU-Net's default prediction on the trained ensemble ({out['date']})", "",
        f"{out['bundle']}, folds {', '.join(out['folds'])} (checkpoints checked against the manifest's sha256), "
        f"mirroring on in both; {out['nnunet']} vs {out['segsentry']}. "
        f"{out['per_cohort']} new phantoms per cohort (seed {out['seed']}), {len(out['cases'])} cases; "
        f"{m['cpu']}, {m['cores']} cores.", "",
        "| engine | voxels differing | agreement (all cases) | lowest case agreement | cases identical "
        "| lowest foreground Dice vs nnU-Net | max \\|p − 0.5\\| at a differing voxel |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, s in out["summary"].items():
        dice = "–" if s["min_dice"] is None else f"{s['min_dice']:.5f}"
        margin = "–" if s["max_abs_p_minus_half"] is None else f"{s['max_abs_p_minus_half']:.4f}"
        lines.append(f"| {backend} | {s['differing']} of {s['voxels']} | {s['agreement']:.7f} | "
                     f"{s['min_case_agreement']:.6f} | {s['cases_identical']} of {len(out['cases'])} | {dice} "
                     f"| {margin} |")
    lines += ["", "p: nnU-Net's own foreground probability (the mean of the folds' and flips' softmax, on the "
              "input grid) at the voxels where the labels differ; 0 differing voxels leave it empty.",
              "Seconds (not a speed comparison: one pass each, nnU-Net without its export workers): "
              + ", ".join(f"{k} {v:.0f}" for k, v in out["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
