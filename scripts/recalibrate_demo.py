"""Calibrate the shipped demo network again, without its training folder: same phantoms, other choices.

    python scripts/recalibrate_demo.py --subject-score patch-min        # rewrites segsentry/models/demo_lung.ood.onnx
    python scripts/recalibrate_demo.py --out /tmp/check.ood.onnx        # same choices: reproduces the shipped one
    python scripts/recalibrate_demo.py --layer decoder.stages.2 --out /tmp/dec2.ood.onnx   # another feature tap
    python scripts/recalibrate_demo.py --fuse-layers decoder.stages.2   # the shipped bundle: two taps, one U

The training folder of ``scripts/train_demo_model.py`` is not kept (nnU-Net's checkpoints are large), but its
phantoms are seeded: this regenerates the training cohort (seed ``--seed``, 60 cases) and the unlabelled
calibration cohort (seed ``--seed`` + 500, 40 cases), takes the network out of the shipped bundle
(:func:`segsentry.devtools.head_forms.features_bundle`: the graph without its fused head, as ``ood-export``
wrote it) and runs ``ood-calib``'s :func:`~segsentry.calib.calibrate` with the recipe's settings (Ledoit-Wolf,
cross-fit training scores, conformal threshold on the calibration cohort, the folds' disagreement fused) and
``--subject-score``; ``--layer`` taps another layer of the network first (:func:`segsentry.devtools.retap.retap`:
the features ``ood-export --layer`` gives); ``--fuse-layers`` calibrates each further layer the same way and fuses
the taps into one bundle (:func:`segsentry.calib.taps.fuse_taps`, ``segsentry fuse-taps``), as the shipped bundle
is (``encoder.stages.4`` with ``decoder.stages.2``). It then compares the new calibration with the old one: with the old
choices the scores must come back (relative difference printed; engines differ in the last digits).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "segsentry" / "models" / "demo_lung.ood.onnx"


def _max_rel(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(x - y) / np.abs(y))) if x.shape == y.shape and x.size else float("inf")


def main(argv: list[str] | None = None) -> int:
    from segsentry._atomic import write_bytes_atomic
    from segsentry.calib import calibrate
    from segsentry.calib.taps import fuse_taps
    from segsentry.contract import SubjectScore
    from segsentry.devtools.head_forms import features_bundle
    from segsentry.devtools.retap import retap
    from segsentry.phantoms import write_cohort
    from segsentry.runtime import load_bundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="the calibrated bundle to start from")
    parser.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--subject-score", choices=[s.value for s in SubjectScore], default="mean")
    parser.add_argument("--layer", help="tap this layer (a dotted module path, e.g. decoder.stages.2) instead of "
                                            "the bundle's own")
    parser.add_argument("--fuse-layers", nargs="+", default=[], metavar="LAYER",
                        help="further layers, each calibrated alike and fused into the bundle's U (segsentry fuse-taps)")
    parser.add_argument("--seed", type=int, default=0, help="train_demo_model.py's --seed")
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--calibration-cases", type=int, default=40)
    parser.add_argument("--work", type=Path, help="phantom folder (default: a temporary one)")
    args = parser.parse_args(argv)

    shipped = load_bundle(args.bundle).manifest
    old, old_layer = shipped.calibration, shipped.features.layer
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        train, cal = work / "train", work / "calibration"
        for folder, n, seed, prefix in ((train, args.cases, args.seed, "PH"),
                                        (cal, args.calibration_cases, args.seed + 500, "CAL")):
            if not (folder / "dataset.json").exists():
                write_cohort(folder, cohort="id", n=n, seed=seed, prefix=prefix)
        features = work / "demo_lung.features.onnx"
        network = features_bundle(args.bundle.read_bytes())  # at the bundle's own layer; every retap starts here
        features.write_bytes(retap(network, args.layer) if args.layer and args.layer != old_layer else network)
        staged = work / "recalibrated.ood.onnx"

        def recipe(features_path: Path, out: Path):
            return calibrate(features_path, [train / "imagesTr"], out, estimator="ledoit-wolf",
                             calibration_images=[cal / "imagesTr"], subject_score=args.subject_score,
                             ensemble_score="fused" if load_bundle(features_path).manifest.n_folds > 1
                             else "distance")

        result = recipe(features, staged)
        new = result.calibration
        if args.fuse_layers:
            extra = []
            for layer in args.fuse_layers:
                tapped = work / f"{layer}.features.onnx"
                tapped.write_bytes(retap(network, layer))
                extra.append(recipe(tapped, work / f"{layer}.ood.onnx").path)
            fused = fuse_taps(staged, extra, work / "fused.ood.onnx")
            print(f"fused {', '.join(args.fuse_layers)} into U: threshold U > {fused.calibration.threshold:.4f} "
                  f"(was {old.threshold:.4f}; the first tap alone: {new.threshold:.4f})")
            old_taps = {t.features.layer: t.calibration for t in old.taps}
            for tap in fused.calibration.taps:
                if tap.features.layer in old_taps and tap.calibration.subject_score == args.subject_score:
                    was = old_taps[tap.features.layer]
                    print(f"tap {tap.features.layer} as before: training scores max relative difference "
                          f"{_max_rel(tap.calibration.train_scores, was.train_scores):.2e}, calibration scores "
                          f"{_max_rel(tap.calibration.calibration_scores, was.calibration_scores):.2e}")
            staged = fused.path
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.out, staged.read_bytes())
    layer = args.layer or old_layer
    print(f"feature layer {layer} (was {old_layer})")
    same = new.subject_score == old.subject_score and layer == old_layer
    print(f"wrote {args.out}: subject score {new.subject_score}, first tap's own threshold U > {new.threshold:.4f} "
          f"(bundle's was {old.threshold:.4f}, {old.subject_score}); training range [{new.train_score_min:.6g}, "
          f"{new.train_score_max:.6g}]")
    if same:
        print(f"same choices as {args.bundle.name}: training scores max relative difference "
              f"{_max_rel(new.train_scores, old.train_scores):.2e}, calibration scores "
              f"{_max_rel(new.calibration_scores, old.calibration_scores):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
