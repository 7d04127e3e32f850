"""Offline multi-layer fusion on the phantom benchmark's dev seeds: what a subject-level fusion of the feature
layers' U would have scored, computed from an existing ``cases.csv`` -- no bundle computes it.

    python benchmarks/phantom_ood.py --model-folder ... --variants conformal \\
        --layers encoder.stages.2 encoder.stages.3 --levels none --out benchmarks/results/phantom_ood_layers
    python benchmarks/layer_fusion_offline.py            # reads that run's cases.csv, writes fusion_offline.md

Each layer's U (bundle ``conformal`` = the default layer ``encoder.stages.4``, ``stage3``, ``stage2``) is already
on [0, 1] by its own training-score range; a fusion is the case-wise mean or max of the layers' U. Reported:
AUC per shifted set (ID vs that set, OOD = positive) and AURC / E-AURC with risk = 1 - Dice over the chest
cohorts (every set but far-OOD), 95 % percentile-bootstrap intervals as in ``ood-eval``. No threshold: a fused
score has none until it is calibrated, so there is no deployed flag here. These numbers are measured on the
cohorts the layer choice would be made on (the benchmark's seeds), so they are development numbers, not a
held-out evaluation.
"""

from __future__ import annotations

import argparse
import csv
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

from segsentry.evaluation.metrics import aurc, auc, bootstrap_interval, e_aurc

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "phantom_ood_layers"
LAYERS = {"stage4": "mahalanobis[conformal]", "stage3": "mahalanobis[stage3]", "stage2": "mahalanobis[stage2]"}
FUSIONS = {"mean": np.mean, "max": np.max}
RESAMPLES = 1000  # as ood-eval


def read_cases(path: Path, columns: dict[str, str] = LAYERS, *,
               hint: str = "run phantom_ood.py with --variants conformal --layers encoder.stages.2 encoder.stages.3",
               ) -> tuple[list[str], list[str | None], dict[str, np.ndarray]]:
    """(group per case, Dice per case or None, name -> the ``columns[name]`` score per case) from an ``ood-eval``
    cases.csv; ``hint`` says how to get a file that has the columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [key for key in columns.values() if not rows or key not in rows[0]]
    if missing:
        raise SystemExit(f"{path} has no column {', '.join(missing)}; {hint}")
    scores = {name: np.array([float(r[key]) for r in rows]) for name, key in columns.items()}
    return [r["group"] for r in rows], [r["dice"] or None for r in rows], scores


def ci(value: float, interval: tuple[float, float]) -> str:
    return f"{value:.3f} [{interval[0]:.2f}–{interval[1]:.2f}]"


def table(groups: list[str], dice: list[str | None], scores: dict[str, np.ndarray]) -> list[str]:
    group = np.array(groups)
    shifted = [g for g in dict.fromkeys(groups) if g != "id"]
    chest = np.array([g != "far-ood" and d is not None for g, d in zip(groups, dice)])
    risk = 1.0 - np.array([float(d) for d, keep in zip(dice, chest) if keep])
    lines = ["| score | " + " | ".join(f"AUC {s}" for s in shifted) + " | AURC | E-AURC |",
             "|---|" + "---|" * (len(shifted) + 2)]
    for label, u in scores.items():
        cells = [ci(auc(u[group == "id"], u[group == s]),
                    bootstrap_interval(auc, u[group == "id"], u[group == s], n_resamples=RESAMPLES, seed=0))
                 for s in shifted]
        pairs = np.stack([u[chest], risk], axis=1)
        for metric in (aurc, e_aurc):
            cells.append(ci(metric(u[chest], risk), bootstrap_interval(lambda p, m=metric: m(p[:, 0], p[:, 1]), pairs,
                                                                       n_resamples=RESAMPLES, seed=0)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Chest cohorts for AURC: {', '.join(sorted(set(group[chest])))} ({int(chest.sum())} cases; random "
                 f"order AURC = mean risk {risk.mean():.3f}).")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=Path, default=RESULTS / "cases.csv")
    parser.add_argument("--out", type=Path, help="default: fusion_offline.md beside --cases")
    args = parser.parse_args(argv)
    groups, dice, layers = read_cases(args.cases)
    scores = dict(layers)
    for k in (2, 3):
        for subset in combinations(LAYERS, k):
            for how, reduce in FUSIONS.items():
                scores[f"{how}({' + '.join(subset)})"] = reduce(np.stack([layers[n] for n in subset]), axis=0)
    cases = args.cases.resolve()
    shown = cases.relative_to(REPO) if cases.is_relative_to(REPO) else cases
    medians = ", ".join(f"{n} {np.median(u[np.array(groups) == 'id']):.3f}" for n, u in layers.items())
    lines = ["# Offline multi-layer fusion (dev seeds; not a deployed bundle)", "",
             f"Computed offline from `{shown}` by `benchmarks/layer_fusion_offline.py`: the phantom benchmark's "
             "dev cohorts (`benchmarks/phantom_ood.py` SEED_SETS['dev']), the same cases the layer choice is "
             "looked at on, so this is a development measurement, not a held-out one. No bundle computes a fused score; it has no "
             "calibrated threshold, hence no deployed flag or false-alarm rate here.", "",
             "Layers (one network, the main bundle's folds -- fold 0 of the demo model in `phantom_ood_layers` --"
             " each bundle Ledoit-Wolf + conformal alpha 5 %): "
             + ", ".join(f"{n} = `{k}`" for n, k in LAYERS.items())
             + ". Fusion: the case-wise mean or max of the layers' U (each on [0, 1] by its own training-score "
               f"range; their scales differ: median ID U {medians}).", "",
             "AUC: ID vs each shifted set (OOD = positive); AURC / E-AURC: risk = 1 − Dice. 95 % percentile "
             f"bootstrap ({RESAMPLES} resamples, seed 0; each set resampled on its own for the AUC).", "",
             *table(groups, dice, scores)]
    out = args.out or args.cases.parent / "fusion_offline.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
