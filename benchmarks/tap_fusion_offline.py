"""Offline: the shipped tap (``encoder.stages.4``) and the decoder tap (``decoder.stages.2``) fused into one U.

    python scripts/recalibrate_demo.py --layer decoder.stages.2 --out /tmp/dec2.ood.onnx        # ~5 min
    python benchmarks/phantom_ood.py --seeds final --levels none --backend openvino \\
        --out benchmarks/results/phantom_ood_final_shipped
    python benchmarks/phantom_ood.py --seeds final --levels none --backend openvino \\
        --bundle /tmp/dec2.ood.onnx --out benchmarks/results/phantom_ood_final_decoder2
    python benchmarks/tap_fusion_offline.py --seeds final --decoder-bundle /tmp/dec2.ood.onnx
    python benchmarks/tap_fusion_offline.py --seeds final   # since it ships: both taps from the fused bundle

Each tap alone is a whole bundle, the same network and folds with its own Gaussians, calibrated by the same
recipe (training and calibration phantoms regenerated from their seeds), whose deployed U is the distance U
fused with the folds' disagreement. The candidate (fixed on the dev seeds, before the ``final`` seeds were
drawn): the decoder tap's U mapped onto the shipped tap's scale by matching the median and the 95th percentile
of both on the bundles' unlabelled calibration cases (as ``ood-calib`` maps the disagreement onto the distance),
the deployed U the mean of the shipped U and the mapped one, and the threshold the split-conformal rule at
alpha = 5 % on those calibration cases' fused U. Every number comes from the two bundles' ``ood-eval`` runs on the
same cases (``cases.csv``: each bundle's deployed U and Dice) and their manifests (calibration scores, the
disagreement fusion); the recomputed single-tap U and flags must equal the runs' own, or the script stops.

Reported per bundle: AUC of new ID cases vs each shifted set (95 % bootstrap), the deployed flag's false alarms
and detections (Wilson), E-AURC with risk = 1 - Dice over the chest cohorts, and the adoption rule fixed before
the ``final`` draw: the fused U replaces the shipped one only if its mean AUC over the three shifts is higher,
its dataset-shift detection rate at most 5 points lower, and its false alarms at most 10 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from segsentry.calib.taps import calibration_uncertainties
from segsentry.demo import demo_bundle_path
from segsentry.evaluation.metrics import auc, bootstrap_interval, e_aurc, wilson_interval
from segsentry.manifest import Calibration
from segsentry.runtime.bundle import load_bundle
from segsentry.runtime.scoring import conformal_threshold

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RUNS = {  # seed set -> (the shipped bundle's run, the decoder tap's run)
    "dev": ("phantom_ood_2folds", "phantom_ood_dev_decoder2"),
    "final": ("phantom_ood_final_shipped", "phantom_ood_final_decoder2"),
}
SHIFTS = ("dataset-shift", "diagnostic-shift", "far-ood")
CHEST = ("id", "dataset-shift", "diagnostic-shift")
ALPHA = 0.05
RESAMPLES = 1000  # as ood-eval


def read_run(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """group -> {"u": deployed U, "flagged": deployed flag, "dice": Dice} from an ``ood-eval`` cases.csv."""
    with open(folder / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict[str, np.ndarray]] = {}
    for group in ("id", *SHIFTS):
        mine = [r for r in rows if r["group"] == group]
        if not mine:
            raise SystemExit(f"{folder}/cases.csv has no {group} cases")
        out[group] = {"case": np.array([r["case"] for r in mine]),
                      "u": np.array([float(r["mahalanobis"]) for r in mine]),
                      "flagged": np.array([r["flagged"] == "1" for r in mine]),
                      "dice": np.array([float(r["dice"]) for r in mine])}
    return out


def calibration_u(calibration: Calibration) -> np.ndarray:
    """The deployed U of the bundle's calibration cases, from its manifest (the threshold's own scores)."""
    if calibration.fusion is None:
        raise SystemExit("the bundles must fuse the folds' disagreement (ood-calib --ensemble-score fused)")
    return calibration_uncertainties(calibration)


def tap_calibrations(encoder_bundle: Path, decoder_bundle: Path | None) -> tuple[Calibration, Calibration,
                                                                                   Calibration | None]:
    """``(encoder tap, decoder tap, shipped fused)`` calibrations: from two single-tap bundles, or from the
    fused bundle shipped since the fusion was adopted (``segsentry fuse-taps``), which holds both; its first
    tap's own threshold, overwritten by the fused one, is recomputed by the same rule."""
    encoder = load_bundle(encoder_bundle).manifest.calibration
    if not encoder.taps:
        if decoder_bundle is None:
            raise SystemExit(f"{encoder_bundle} holds one tap: give --decoder-bundle")
        return encoder, load_bundle(decoder_bundle).manifest.calibration, None
    (tap,) = encoder.taps
    if tap.features.layer != "decoder.stages.2":
        raise SystemExit(f"{encoder_bundle}'s second tap is {tap.features.layer}, not decoder.stages.2")
    own, _ = conformal_threshold(calibration_u(encoder), alpha=encoder.alpha or ALPHA)
    return dataclasses.replace(encoder, taps=[], threshold=float(own)), tap.calibration, encoder


def onto_scale(values: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The affine map sending ``source``'s median and 95th percentile to ``target``'s, applied to ``values``."""
    s_mid, s_hi = np.median(source), np.quantile(source, 0.95)
    t_mid, t_hi = np.median(target), np.quantile(target, 0.95)
    return t_mid + (values - s_mid) * (t_hi - t_mid) / (s_hi - s_mid)


def summary(scores: dict[str, np.ndarray], threshold: float, dice: dict[str, np.ndarray]) -> dict:
    """AUC per shift, deployed rates per set and E-AURC over the chest cohorts, with intervals."""
    row: dict = {"threshold": threshold, "auc": {}, "rate": {}}
    for group in SHIFTS:
        row["auc"][group] = {"value": auc(scores["id"], scores[group]),
                             "interval": bootstrap_interval(auc, scores["id"], scores[group],
                                                            n_resamples=RESAMPLES, seed=0)}
    for group in ("id", *SHIFTS):
        k, n = int(np.sum(scores[group] > threshold)), len(scores[group])
        row["rate"][group] = {"value": k / n, "k": k, "n": n, "interval": wilson_interval(k, n)}
    u = np.concatenate([scores[g] for g in CHEST])
    risk = 1.0 - np.concatenate([dice[g] for g in CHEST])
    pairs = np.stack([u, risk], axis=1)  # resampled by case, as ood-eval does
    row["e_aurc"] = {"value": e_aurc(u, risk),
                     "interval": bootstrap_interval(lambda p: e_aurc(p[:, 0], p[:, 1]), pairs,
                                                    n_resamples=RESAMPLES, seed=0)}
    row["mean_auc"] = float(np.mean([row["auc"][g]["value"] for g in SHIFTS]))
    return row


def adopt(fused: dict, shipped: dict) -> dict:
    """The rule fixed before the final draw, evaluated."""
    checks = {
        "mean AUC over the shifts higher": fused["mean_auc"] > shipped["mean_auc"],
        "dataset-shift detection at most 5 points lower":
            fused["rate"]["dataset-shift"]["value"] >= shipped["rate"]["dataset-shift"]["value"] - 0.05 - 1e-12,
        "false alarms at most 10 %": fused["rate"]["id"]["value"] <= 0.10 + 1e-12,
    }
    return {"checks": checks, "adopt": all(checks.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", choices=list(RUNS), default="dev")
    parser.add_argument("--encoder-bundle", type=Path, default=demo_bundle_path())
    parser.add_argument("--decoder-bundle", type=Path,
                        help="the shipped network recalibrated at decoder.stages.2 (scripts/recalibrate_demo.py); "
                             "not needed when --encoder-bundle fuses both taps, as the shipped bundle does")
    args = parser.parse_args(argv)
    encoder_dir, decoder_dir = (RESULTS / name for name in RUNS[args.seeds])
    runs = {"encoder": read_run(encoder_dir), "decoder": read_run(decoder_dir)}
    encoder, decoder, shipped = tap_calibrations(args.encoder_bundle, args.decoder_bundle)
    calibrations = {"encoder": encoder, "decoder": decoder}
    cal = {tap: calibration_u(c) for tap, c in calibrations.items()}
    for tap, c in calibrations.items():  # the manifests must reproduce each bundle's own threshold and flags
        threshold, _ = conformal_threshold(cal[tap], alpha=c.alpha or ALPHA)
        if abs(threshold - c.threshold) > 1e-6:
            raise SystemExit(f"{tap}: recomputed threshold {threshold} is not the bundle's {c.threshold}")
        for group, run in runs[tap].items():
            if not np.array_equal(run["u"] > c.threshold, run["flagged"]):
                raise SystemExit(f"{tap} {group}: the run's flags are not U > threshold (input guard fired?)")
    for group in runs["encoder"]:
        if not np.array_equal(runs["encoder"][group]["case"], runs["decoder"][group]["case"]):
            raise SystemExit(f"{group}: the two runs hold different cases")
    dice = {g: runs["encoder"][g]["dice"] for g in runs["encoder"]}
    mapped = {g: onto_scale(runs["decoder"][g]["u"], cal["decoder"], cal["encoder"]) for g in dice}
    fused = {g: 0.5 * (runs["encoder"][g]["u"] + mapped[g]) for g in dice}
    fused_cal = 0.5 * (cal["encoder"] + onto_scale(cal["decoder"], cal["decoder"], cal["encoder"]))
    fused_threshold, bound = conformal_threshold(fused_cal, alpha=ALPHA)
    if shipped is not None and abs(fused_threshold - shipped.threshold) > 1e-6:
        raise SystemExit(f"the fused threshold {fused_threshold} is not the shipped bundle's {shipped.threshold}")
    table = {
        "encoder.stages.4 (shipped, as deployed)": summary({g: r["u"] for g, r in runs["encoder"].items()},
                                                           calibrations["encoder"].threshold, dice),
        "decoder.stages.2 (as deployed)": summary({g: r["u"] for g, r in runs["decoder"].items()},
                                                  calibrations["decoder"].threshold, dice),
        "both taps fused (candidate)": summary(fused, fused_threshold, dice),
    }
    verdict = adopt(table["both taps fused (candidate)"], table["encoder.stages.4 (shipped, as deployed)"])
    result = {"seeds": args.seeds, "runs": [str(encoder_dir.relative_to(REPO)), str(decoder_dir.relative_to(REPO))],
              "calibration_cases": len(fused_cal), "alpha": ALPHA, "false_alarm_bound": bound,
              "bundles": table, "rule": verdict, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = RESULTS / f"tap_fusion_{args.seeds}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))

    def ci(cell: dict, percent: bool = False) -> str:
        lo, hi = cell["interval"]
        if percent:
            return f"{100 * cell['value']:.1f} % [{100 * lo:.0f}–{100 * hi:.0f}]"
        return f"{cell['value']:.3f} [{lo:.2f}–{hi:.2f}]"

    n = len(dice["id"])
    lines = [f"# Two feature taps fused into one U ({args.seeds} seeds, {n} cases per set; {result['date']})", "",
             f"Runs: `{result['runs'][0]}`, `{result['runs'][1]}`; the fused threshold is the conformal rule at "
             f"alpha = {ALPHA} on the {len(fused_cal)} calibration cases (bound {bound:.3f}). AUC: 95 % bootstrap; "
             "rates: Wilson; E-AURC over the chest cohorts, risk = 1 − Dice.", "",
             "| U | " + " | ".join(f"AUC {s}" for s in SHIFTS) + " | mean AUC | false alarms (ID) | "
             + " | ".join(f"detected {s}" for s in SHIFTS) + " | E-AURC |",
             "|---|" + "---|" * (2 * len(SHIFTS) + 3)]
    for label, row in table.items():
        lines.append(f"| {label} | " + " | ".join(ci(row["auc"][s]) for s in SHIFTS) + f" | {row['mean_auc']:.3f} | "
                     + " | ".join(ci(row["rate"][s], percent=True) for s in ("id", *SHIFTS))
                     + f" | {ci(row['e_aurc'])} |")
    lines += ["", "Adoption rule (fixed before the final draw): "
              + "; ".join(f"{name} {'✔' if ok else '✘'}" for name, ok in verdict["checks"].items())
              + f" → **{'adopt' if verdict['adopt'] else 'keep the shipped U'}**."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
