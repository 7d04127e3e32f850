"""Seconds per patch at batch 1 / 2 / 4 per CPU backend (demo bundle): the evidence for ``BackendSpec.default_batch_size``.

    python benchmarks/batch_size.py --contended      # ~3 min on 2 cores
    python benchmarks/batch_size.py --backends onnxruntime --batches 1 4 --rounds 9

Two measurements per backend and batch size, interleaved round by round (every round runs every setting once,
in a rotated order), so that a load change on the machine lands on all of them alike:

- engine calls: ``--patches`` random patches sent in calls of ``batch`` patches (the same patches per round for
  every batch size), seconds per patch;
- a volume: the sliding window of one demo phantom (``infer_volume``, every patch of the case, with the
  bundle's mirroring if it records axes), seconds per patch, and whether its labels equal batch 1's.

The median over rounds is reported with the spread (min-max), and the gain over batch 1 paired by round
(``1 - t(batch) / t(batch 1)`` within each round, so that a load change between rounds cancels out). A batch
size counts as a win only where the volume's paired gain has a median over 5 % and is positive in at least
two thirds of the rounds. Results: ``benchmarks/results/batch_size_demo.json``
and ``.md``; ``--contended`` labels them as measured on a busy machine (the load average is recorded either way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info, package_versions

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parent.parent / "segsentry" / "models" / "demo_lung.ood.onnx"
WIN = 0.05  # a batch size is worth a default only more than 5 % under batch 1's seconds per patch ...
CONSISTENT = 2 / 3  # ... in the median of the paired rounds, and faster than batch 1 in this share of them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO)
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--patches", type=int, default=8, help="patches per engine-call measurement")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--contended", action="store_true", help="label the results as from a busy machine")
    parser.add_argument("--name", default="batch_size_demo")
    args = parser.parse_args(argv)

    from segsentry.phantoms import write_cohort
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.backends import BackendOptions, create_backend
    from segsentry.runtime.io import collect_cases
    from segsentry.runtime.pipeline import infer_volume_for_case, logits_to_labels
    from segsentry.runtime.preprocess import preprocess

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((args.patches, m.num_channels, *m.patch_size)).astype(np.float32)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="segsentry-batch-") as tmp:
        write_cohort(Path(tmp), cohort="id", n=1, seed=900, prefix="BS")
        case = collect_cases([Path(tmp) / "imagesTr"], num_channels=m.num_channels)[0]
        loaded = read_case(case, num_channels=m.num_channels)
        data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
    engines = {name: create_backend(name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                                    options=BackendOptions(threads=args.threads)) for name in args.backends}
    settings = [(name, b) for name in args.backends for b in args.batches]
    calls: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    volume: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    labels: dict[tuple[str, int], np.ndarray] = {}
    n_patches = 0
    try:
        for name, b in settings:  # warm-up: one pass of each, untimed; the labels for the comparison
            v = infer_volume_for_case(data, engines[name], m, batch_size=b)
            labels[(name, b)] = logits_to_labels(v.logits, m)
            n_patches = len(v.boxes)
            for i in range(0, args.patches, b):
                engines[name].run(patches[i:i + b])
        for r in range(args.rounds):
            for name, b in settings[r % len(settings):] + settings[:r % len(settings)]:
                t0 = time.perf_counter()
                for i in range(0, args.patches, b):
                    engines[name].run(patches[i:i + b])
                calls[(name, b)].append((time.perf_counter() - t0) / args.patches)
                t0 = time.perf_counter()
                infer_volume_for_case(data, engines[name], m, batch_size=b)
                volume[(name, b)].append((time.perf_counter() - t0) / n_patches)
    finally:
        for engine in engines.values():
            engine.close()
    load_after = os.getloadavg()

    def paired(times: dict, name: str, b: int) -> list[float]:
        return [1 - t / t1 for t, t1 in zip(times[(name, b)], times[(name, args.batches[0])])]

    rows = []
    for name, b in settings:
        call_p50, volume_p50 = statistics.median(calls[(name, b)]), statistics.median(volume[(name, b)])
        volume_gains = paired(volume, name, b)
        rows.append({
            "backend": name, "batch": b,
            "call_s_per_patch_p50": call_p50, "call_s_per_patch_range": [min(calls[(name, b)]), max(calls[(name, b)])],
            "volume_s_per_patch_p50": volume_p50,
            "volume_s_per_patch_range": [min(volume[(name, b)]), max(volume[(name, b)])],
            "call_gain_vs_batch1_paired_p50": statistics.median(paired(calls, name, b)),
            "volume_gain_vs_batch1_paired_p50": statistics.median(volume_gains),
            "volume_rounds_faster_than_batch1": sum(g > 0 for g in volume_gains) / len(volume_gains),
            "labels_equal_batch1": bool(np.array_equal(labels[(name, b)], labels[(name, args.batches[0])])),
        })
    choice = {}
    for name in args.backends:
        wins = [r for r in rows if r["backend"] == name and r["batch"] != args.batches[0]
                and r["volume_gain_vs_batch1_paired_p50"] > WIN and r["volume_rounds_faster_than_batch1"] >= CONSISTENT]
        choice[name] = max(wins, key=lambda r: r["volume_gain_vs_batch1_paired_p50"])["batch"] if wins else 1
    out = {"benchmark": "batch_size", "bundle": args.bundle.name, "patch_size": m.patch_size,
           "mirror_axes": m.tiling.mirror_axes, "volume_patches": n_patches, "patches_per_call_measurement": args.patches,
           "rounds": args.rounds, "threads": args.threads, "contended": args.contended,
           "load_average_before": load_before, "load_average_after": load_after, "rows": rows,
           "default_batch_size_by_rule": choice, "rule": f"volume seconds per patch more than {WIN:.0%} under batch 1's (median of the rounds' paired gains), "
                   f"and under it in at least {CONSISTENT:.0%} of the rounds",
           "machine": machine_info(), "versions": package_versions(["onnxruntime", "openvino", "numpy"]),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    label = ("measured on a CONTENDED machine (another job was using the cores)" if args.contended
             else "measured on a quiet machine")
    md = [f"# Seconds per patch by batch size, {args.bundle.name} ({out['date']})", "",
          f"{label}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); "
          f"{out['machine']['cores']} cores, {out['machine']['cpu']}. Median of {args.rounds} interleaved rounds "
          f"(min-max). Engine calls: {args.patches} random patches per round; volume: one demo phantom's sliding "
          f"window ({n_patches} patches, mirroring axes {m.tiling.mirror_axes}).", "",
          "| backend | batch | engine ms/patch | engine gain vs batch 1 (paired) | volume ms/patch "
          "| volume gain vs batch 1 (paired) | rounds faster than batch 1 | labels == batch 1 |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["volume_s_per_patch_range"]
        clo, chi = r["call_s_per_patch_range"]
        md.append(f"| {r['backend']} | {r['batch']} | {1e3 * r['call_s_per_patch_p50']:.1f} ({1e3 * clo:.1f}-"
                  f"{1e3 * chi:.1f}) | {100 * r['call_gain_vs_batch1_paired_p50']:+.1f} % | "
                  f"{1e3 * r['volume_s_per_patch_p50']:.1f} ({1e3 * lo:.1f}-{1e3 * hi:.1f}) | "
                  f"{100 * r['volume_gain_vs_batch1_paired_p50']:+.1f} % | "
                  f"{100 * r['volume_rounds_faster_than_batch1']:.0f} % | {'yes' if r['labels_equal_batch1'] else 'NO'} |")
    md += ["", f"Rule: {out['rule']}. By that rule: "
           + ", ".join(f"{k} batch {v}" for k, v in choice.items()) + ".", "",
           "A batch here is patches per engine call. With test-time mirroring a batch's flips are calls of their "
           "own (every tile of the batch flipped alike), so a call holds `batch` patches mirrored or not, and the "
           "volume's ms per patch is per tile with all its flips."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
