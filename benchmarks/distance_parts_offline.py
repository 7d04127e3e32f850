"""Offline: other ways the shipped ensemble's distances could become a subject score, on the dev cohorts.

    python benchmarks/distance_parts_offline.py            # ~10 min on 2 cores (cohorts + 200 cases)

The deployed raw score is the mean over the volume of the voxel map of each patch's distance, itself the mean of
the folds' squared distances (design.md steps 5-6). Three questions, each answered with the bundle's own graph
(every per-fold head tensor exposed as an extra output) and the runtime's own tiling and voxel map:

* **where in the volume**: mean of the voxel map (deployed), its median, 90th / 99th percentile and maximum,
  and the largest / smallest patch distance -- could a localised finding (a nodule, an effusion) hide in the
  mean?
* **which fold**: the mean of the folds' distances (deployed), each fold alone, and the larger / smaller of the
  folds' scores after z-scoring each on the bundle's calibration cases;
* **which part of the head**: a Ledoit-Wolf distance is the whitened distance inside the span of the training
  patches plus a scaled residual outside it; each part alone (summed over the folds).

AUC of new ID cases vs each shifted set, 95 % percentile bootstrap intervals (as ``ood-eval``); also the
bundle's calibration cases vs the new ID cases, which should sit near 0.5. The cohorts are the phantom
benchmark's **dev** seeds (``phantom_ood.SEED_SETS['dev']``), the cases the scoring choices are made on: a
development measurement. Distances never depend on mirroring, so the network runs once per patch, unmirrored,
with no logits. Results: ``benchmarks/results/distance_parts_offline.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_fusion_offline import ci  # noqa: E402 - a sibling script
from phantom_ood import SEED_SETS  # noqa: E402

from segsentry.bench import machine_info, package_versions  # noqa: E402
from segsentry.demo import demo_bundle_path  # noqa: E402
from segsentry.evaluation.metrics import auc, bootstrap_interval  # noqa: E402
from segsentry.manifest import Manifest  # noqa: E402
from segsentry.phantoms import write_cohort  # noqa: E402
from segsentry.runtime.backends import create_backend  # noqa: E402
from segsentry.runtime.backends.base import Backend  # noqa: E402
from segsentry.runtime.bundle import load_bundle  # noqa: E402
from segsentry.runtime.io import CaseInput, read_case  # noqa: E402
from segsentry.runtime.preprocess import preprocess  # noqa: E402
from segsentry.runtime.sliding import (  # noqa: E402
    crop_box,
    distance_map,
    importance_for,
    iterate_patches,
    pad_to_patch,
    tile_boxes,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CALIBRATION = Path("/work/demo-train/calibration/imagesTr")  # the shipped bundle's 40 unlabelled ID cases
COHORTS = ("id", "dataset-shift", "diagnostic-shift", "far-ood")
PARTS = ("dist_span", "dist_complement")
RESAMPLES = 1000  # as ood-eval
Case = dict[str, float]


def _head_parts_model(model: bytes, n_folds: int) -> tuple[bytes, list[str]]:
    """The bundle with every fold's head parts as extra graph outputs, and the names of those outputs."""
    import onnx

    proto = onnx.load_model_from_string(model)
    produced = {o for node in proto.graph.node for o in node.output}
    extra = [f"ood_head/f{f}/{p}" for f in range(n_folds) for p in (*PARTS, "distance")]
    missing = [n for n in extra if n not in produced]
    if missing:
        raise SystemExit(f"the bundle's head has no {', '.join(missing)}: this script reads the compact head of "
                         "ood-calib round 2 (re-calibrate older bundles)")
    for name in extra:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return proto.SerializeToString(), [*extra, "distance"]


def score_case(path: Path, manifest: Manifest, engine: Backend, names: list[str], gaussian: np.ndarray) -> Case:
    """Every candidate raw score of one case: per head tensor the mean of its voxel map (``gaussian``: the
    bundle's importance map), and for the deployed distance the other spatial summaries."""
    loaded = read_case(CaseInput(path.name, (path,)), num_channels=manifest.num_channels)
    data, _ = preprocess(loaded.image, loaded.spacing, manifest.preprocessing)
    padded, pad_box = pad_to_patch(data, manifest.patch_size)
    shape = padded.shape[1:]
    boxes = tile_boxes(shape, manifest.patch_size, manifest.tiling.step_size)
    patches: dict[str, list[float]] = {n: [] for n in names}
    for batch in iterate_patches(padded, engine, boxes):  # the runtime's tiler, one patch per call, unmirrored
        for name in names:
            patches[name].extend(float(v) for v in np.asarray(batch.outputs[name]).reshape(-1))
    aggregation = manifest.calibration.aggregation
    out: Case = {}
    for name in names:
        vm = crop_box(distance_map(shape, boxes, patches[name], gaussian, aggregation=aggregation), pad_box)
        out[name] = float(np.mean(vm, dtype=np.float64))
        if name == "distance":
            for q in (0.5, 0.9, 0.99, 1.0):
                out[f"distance q{q}"] = float(np.quantile(vm, q))
            out["distance max patch"] = max(patches[name])
            out["distance min patch"] = min(patches[name])
    out["patches"] = len(boxes)
    return out


def rules(n_folds: int, calibration: list[Case]) -> dict[str, Callable[[Case], float]]:
    """Candidate score -> function of a case's raw values (calibration cases supply the z-score scales)."""
    def z(key: str) -> Callable[[Case], float]:
        values = np.array([c[key] for c in calibration])
        mean, std = values.mean(), values.std()
        return lambda c: (c[key] - mean) / std

    folds = [f"ood_head/f{f}/distance" for f in range(n_folds)]
    fold_z = [z(k) for k in folds]
    out: dict[str, Callable[[Case], float]] = {"mean over the volume (deployed)": lambda c: c["distance"]}
    for label, key in (("median voxel", "distance q0.5"), ("90th percentile voxel", "distance q0.9"),
                       ("99th percentile voxel", "distance q0.99"), ("max voxel", "distance q1.0"),
                       ("max patch", "distance max patch"), ("min patch", "distance min patch")):
        out[label] = lambda c, k=key: c[k]
    for f, key in enumerate(folds):
        out[f"fold {f} alone"] = lambda c, k=key: c[k]
    out["max of the folds' z-scores"] = lambda c: max(g(c) for g in fold_z)
    out["min of the folds' z-scores"] = lambda c: min(g(c) for g in fold_z)
    for part in PARTS:
        out[f"{part} only"] = lambda c, p=part: sum(c[f"ood_head/f{f}/{p}"] for f in range(n_folds))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=demo_bundle_path())
    parser.add_argument("--calibration-images", type=Path, default=CALIBRATION,
                        help="the bundle's own unlabelled calibration cases (scripts/train_demo_model.py writes them)")
    parser.add_argument("-n", type=int, default=40, help="cases per cohort")
    parser.add_argument("--out", type=Path, default=RESULTS / "distance_parts_offline")
    args = parser.parse_args(argv)
    if not args.calibration_images.is_dir():
        raise SystemExit(f"{args.calibration_images}: no calibration cases (run scripts/train_demo_model.py)")
    bundle = load_bundle(args.bundle)
    manifest = bundle.manifest
    if manifest.calibration is None or manifest.n_folds < 2:
        raise SystemExit(f"{args.bundle}: needs a calibrated fold ensemble")
    model, names = _head_parts_model(bundle.model_bytes, manifest.n_folds)
    gaussian = importance_for(manifest.patch_size, sigma_scale=manifest.tiling.sigma_scale,
                              value_scaling_factor=manifest.tiling.value_scaling_factor)
    seeds = SEED_SETS["dev"]
    t0 = time.perf_counter()
    cases: dict[str, list[Case]] = {}
    with tempfile.TemporaryDirectory(prefix="segsentry-parts-") as tmp, create_backend(
            "onnxruntime", model, channels=manifest.num_channels, patch_size=manifest.patch_size) as engine:
        folders = {"calibration": args.calibration_images}
        for cohort in COHORTS:
            write_cohort(Path(tmp) / cohort, cohort=cohort, n=args.n, seed=seeds[cohort], prefix=cohort[:2].upper())
            folders[cohort] = Path(tmp) / cohort / "imagesTr"
        for group, folder in folders.items():
            cases[group] = [score_case(p, manifest, engine, names, gaussian) for p in sorted(folder.glob("*_0000.nii.gz"))]
            print(f"{group}: {len(cases[group])} cases", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    table = {}
    for label, rule in rules(manifest.n_folds, cases["calibration"]).items():
        ident = np.array([rule(c) for c in cases["id"]])
        row = {}
        for group in (*COHORTS[1:], "calibration"):
            other = np.array([rule(c) for c in cases[group]])
            row[group] = {"auc": auc(ident, other),
                          "interval": bootstrap_interval(auc, ident, other, n_resamples=RESAMPLES, seed=0)}
        table[label] = row
    result = {"bundle": str(args.bundle.resolve().relative_to(REPO) if args.bundle.resolve().is_relative_to(REPO)
                            else args.bundle), "seeds": {c: seeds[c] for c in COHORTS}, "n": args.n,
              "calibration_cases": len(cases["calibration"]), "minutes": round(minutes, 1), "auc": table,
              "cases": cases, "machine": machine_info(), "versions": package_versions(("numpy", "onnxruntime", "SimpleITK")),
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.joinpath(args.out.name + ".json").write_text(json.dumps(result, indent=1))
    groups = (*COHORTS[1:], "calibration")
    lines = [f"# Subject-score alternatives from the shipped ensemble's distances (dev seeds; {result['date']})", "",
             f"`{result['bundle']}` ({manifest.n_folds} folds, its own Gaussians), {args.n} new cases per cohort from "
             "the phantom benchmark's dev seeds, the bundle's "
             f"{len(cases['calibration'])} calibration cases; {minutes:.1f} min. No alternative has a calibrated "
             "threshold, so there is no deployed flag here: AUC only (new ID cases vs each set; 95 % bootstrap, "
             f"{RESAMPLES} resamples). 'calibration' is the bundle's calibration cases vs the new ID cases (0.5: "
             "exchangeable).", "",
             "| score | " + " | ".join(f"AUC {g}" for g in groups) + " |", "|---|" + "---|" * len(groups)]
    for label, row in table.items():
        lines.append(f"| {label} | " + " | ".join(ci(row[g]["auc"], row[g]["interval"]) for g in groups) + " |")
    mean = {g: float(np.mean([c["distance"] for c in cases[g]])) for g in ("id", *groups)}
    lines += ["", "Mean raw score (deployed form) per set: " + ", ".join(f"{g} {v:.0f}" for g, v in mean.items())
              + f"; patches per case {np.mean([c['patches'] for g in COHORTS for c in cases[g]]):.1f}."]
    args.out.parent.joinpath(args.out.name + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
