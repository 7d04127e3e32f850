"""Offline: how else a fold ensemble's disagreement could enter U, computed from an existing ``cases.csv`` of the
phantom benchmark and the bundle's own calibration cases -- no bundle computes the alternatives.

    python benchmarks/phantom_ood.py --bundle ENS.ood.onnx --model-folder ... --variants conformal --levels none \\
        --out benchmarks/results/phantom_ood_2folds
    python benchmarks/ensemble_fusion_offline.py --cases benchmarks/results/phantom_ood_2folds/cases.csv

The bundle (default: the shipped demo, a fused 2-fold ensemble) supplies the calibration cases' distance U
(``calibration_scores``, normalised by the training range as ``ood-run`` does) and their disagreement
(``fusion.calibration_disagreements``); the cases.csv supplies each benchmark case's distance U (the
``conformal`` variant: ``mahalanobis[conformal]``) and disagreement (``fold_disagreement``). The disagreement
part is the bundle's own affine map onto the distance U's scale. Rules:

* ``mean`` (what ``ood-calib --ensemble-score fused`` deploys): (U_distance + U_disagreement) / 2;
* ``max``: the larger of the two;
* ``min-p``: the smaller of the two conformal p-values on the calibration cases (as a score: 1 - p);
* ``distance`` and ``disagreement`` alone.

Each rule gets its own split-conformal threshold at alpha on the calibration cases' combined values, so the
false alarms and detections are what a bundle deploying that rule would flag. AUC per shifted set and AURC /
E-AURC (risk = 1 - Dice, chest cohorts) with 95 % bootstrap intervals, as in ``ood-eval``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_fusion_offline import ci, read_cases, table  # noqa: E402 - a sibling script

from segsentry.demo import demo_bundle_path  # noqa: E402
from segsentry.evaluation.metrics import wilson_interval  # noqa: E402
from segsentry.runtime.bundle import load_bundle  # noqa: E402
from segsentry.runtime.scoring import conformal_threshold, normalise_score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
Rule = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _p_score(values: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """1 - the conformal p-value of each value among the calibration values: (#calibration >= v + 1) / (n + 1)."""
    return 1.0 - (np.sum(calibration[None, :] >= values[:, None], axis=1) + 1) / (len(calibration) + 1)


RULES: dict[str, Rule] = {  # (distance U, disagreement U, calibration distance U, calibration disagreement U)
    "mean (deployed)": lambda u, a, cu, ca: 0.5 * (u + a),
    "max": lambda u, a, cu, ca: np.maximum(u, a),
    "min-p": lambda u, a, cu, ca: np.maximum(_p_score(u, cu), _p_score(a, ca)),
    "distance alone": lambda u, a, cu, ca: u,
    "disagreement alone": lambda u, a, cu, ca: a,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, required=True, help="a phantom_ood.py cases.csv of a fused ensemble")
    parser.add_argument("--bundle", type=Path, help="the fused ensemble bundle (default: the shipped demo)")
    parser.add_argument("--out", type=Path, help="default: ensemble_fusion_offline.md beside --cases")
    args = parser.parse_args(argv)
    calibration = load_bundle(args.bundle or demo_bundle_path()).manifest.calibration
    if calibration is None or calibration.fusion is None:
        raise SystemExit("the bundle's U does not fuse the folds' disagreement (ood-calib --ensemble-score fused)")
    fusion, alpha = calibration.fusion, calibration.alpha or 0.05
    cal_u = np.array([normalise_score(s, train_min=calibration.train_score_min, train_max=calibration.train_score_max)
                      for s in calibration.calibration_scores])
    def mapped(disagreements: Iterable[float]) -> np.ndarray:  # the bundle's own map onto the distance U's scale
        return np.array([fusion.uncertainty(1.0 - d) for d in disagreements])

    cal_a = mapped(fusion.calibration_disagreements)
    groups, dice, columns = read_cases(args.cases, {"u": "mahalanobis[conformal]", "d": "fold_disagreement"},
                                       hint="an ensemble run of phantom_ood.py with --variants conformal")
    u, a = columns["u"], mapped(columns["d"])
    group = np.array(groups)
    scores = {name: rule(u, a, cal_u, cal_a) for name, rule in RULES.items()}

    sets = list(dict.fromkeys(groups))
    lines = [f"# Offline: combining the folds' disagreement with the distance ({args.cases.parent.name})", "",
             f"From `{args.cases}` and the calibration cases of `{(args.bundle or demo_bundle_path()).name}` "
             f"({len(cal_u)} cases, alpha = {alpha}); computed by `benchmarks/ensemble_fusion_offline.py`. Each rule "
             "has its own conformal threshold on the calibration cases' combined values: the rates are what a bundle "
             "deploying that rule would flag (Wilson 95 % intervals).", "",
             "| rule | " + " | ".join(("false alarms" if s == "id" else f"detected {s}") for s in sets) + " |",
             "|---|" + "---|" * len(sets)]
    for name, rule in RULES.items():
        threshold, _ = conformal_threshold(rule(cal_u, cal_a, cal_u, cal_a), alpha=alpha)
        flagged = scores[name] > threshold
        cells = []
        for s in sets:
            k, n = int(flagged[group == s].sum()), int((group == s).sum())
            cells.append(ci(k / n, wilson_interval(k, n)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *table(groups, dice, scores), ""]
    out = args.out or args.cases.parent / "ensemble_fusion_offline.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
