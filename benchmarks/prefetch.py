"""``ood-run`` with and without prefetch (the next case read and preprocessed while this one is inferred), side by side.

    python benchmarks/prefetch.py --contended          # demo bundle, 6 phantoms, 3 runs each: ~4 min on 2 cores
    python benchmarks/prefetch.py --backends onnxruntime --repeats 5

The same folder of chest-CT phantoms (the shapes and spacings of ``cohort.py``'s small preset) goes through
``segsentry run BUNDLE IN -o OUT --backend B --no-qa`` and the same with ``--no-prefetch``, each run a fresh
process, the two alternating (which goes first alternates too). Wall seconds, cases per minute and the peak
summed RSS / PSS of the process tree (``cohort.run_tree``, sampled every 50 ms); medians and min-max over
``--repeats``. The masks and uncertainty maps of the two are compared byte for byte. Results:
``benchmarks/results/prefetch_demo.json`` and ``.md``; ``--contended`` labels them as measured on a busy
machine (the load average is recorded either way).
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

from cohort import PRESETS, _write_cases, run_tree

from segsentry.bench import machine_info, package_versions

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parent.parent / "segsentry" / "models" / "demo_lung.ood.onnx"
VARIANTS = {"prefetch": [], "no prefetch": ["--no-prefetch"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO)
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=500)
    parser.add_argument("--contended", action="store_true", help="label the timings as measured on a busy machine")
    parser.add_argument("--name", default="prefetch_demo")
    args = parser.parse_args(argv)

    cases = PRESETS["small"][1]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    identical: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="segsentry-prefetch-") as tmp:
        work = Path(tmp)
        inputs = work / "imagesTs"
        ids = _write_cases(inputs, cases, seed=args.seed)
        for b in args.backends:
            order = list(VARIANTS)
            for r in range(args.repeats):
                for variant in order if r % 2 == 0 else order[::-1]:
                    out = work / f"{b}_{variant.replace(' ', '_')}_{r}"
                    result = run_tree([sys.executable, "-m", "segsentry.cli", "run", str(args.bundle), str(inputs),
                                       "-o", str(out), "--backend", b, "--no-qa", *VARIANTS[variant]])
                    if result["returncode"] not in (0, 3):  # 3: a case is flagged
                        raise RuntimeError(f"{b} {variant} failed ({result['returncode']}):\n{result['stderr_tail']}")
                    runs.setdefault(f"{b} {variant}", []).append({**result, "out": out,
                                                                   "load_average": os.getloadavg()})
            first = {v: runs[f"{b} {v}"][0]["out"] for v in VARIANTS}
            identical[b] = all((first["prefetch"] / f).read_bytes() == (first["no prefetch"] / f).read_bytes()
                               for c in ids for f in (f"{c}.nii.gz", f"{c}_uncertainty.nii.gz"))
        patches = [json.loads((runs[f"{args.backends[0]} prefetch"][0]["out"] / f"{c}.json").read_text())["n_patches"]
                   for c in ids]
    load_after = os.getloadavg()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    summary = {name: {"seconds_median": med(name, "seconds"),
                      "seconds_range": [min(r["seconds"] for r in v), max(r["seconds"] for r in v)],
                      "cases_per_minute": 60 * len(ids) / med(name, "seconds"),
                      "peak_rss_mb_median": med(name, "peak_rss_mb"), "peak_pss_mb_median": med(name, "peak_pss_mb")}
               for name, v in runs.items()}
    for b in args.backends:
        on, off = summary[f"{b} prefetch"], summary[f"{b} no prefetch"]
        on["throughput_vs_no_prefetch"] = on["cases_per_minute"] / off["cases_per_minute"]
        on["rss_vs_no_prefetch"] = on["peak_rss_mb_median"] / off["peak_rss_mb_median"]
    result = {
        "benchmark": "prefetch", "bundle": args.bundle.name, "contended": args.contended,
        "load_average_before": load_before, "load_average_after": load_after,
        "cases": [{"case": c, "shape_zyx": list(s), "spacing_xyz_mm": list(sp), "n_patches": n}
                  for c, (s, sp), n in zip(ids, cases, patches)],
        "repeats": args.repeats, "summary": summary, "outputs_byte_identical": identical,
        "runs": {k: [{kk: vv for kk, vv in r.items() if kk not in ("out", "stderr_tail")} for r in v]
                 for k, v in runs.items()},
        "machine": machine_info(), "versions": package_versions(["segsentry", "numpy", "onnxruntime", "openvino"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": "Each run is a fresh process; its time includes start-up and model loading. Mirroring as the "
                 "bundle records (the demo bundle records none).",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    label = ("**Contended**: another job was using the cores (load average below); the gain a quiet machine "
             "shows may differ." if args.contended else "Quiet machine.")
    md = [f"# ood-run with and without prefetch, {args.bundle.name} ({result['date']})", "",
          f"{result['machine']['cpu']}, {result['machine']['cores']} cores. {label} Load average (1 min) "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after.",
          f"{len(ids)} phantoms ({', '.join('x'.join(map(str, s)) for s, _ in cases)}; {sum(patches)} patches); "
          f"{args.repeats} runs each, alternating, medians.", "",
          "| backend, variant | s (min-max) | cases/min | vs no prefetch | peak RSS MB | peak PSS MB |",
          "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        ratio = s.get("throughput_vs_no_prefetch")
        md.append(f"| {name} | {s['seconds_median']:.1f} ({s['seconds_range'][0]:.1f}-{s['seconds_range'][1]:.1f}) | "
                  f"{s['cases_per_minute']:.2f} | {'–' if ratio is None else f'{ratio:.3f}x'} | "
                  f"{s['peak_rss_mb_median']:.0f} | {s['peak_pss_mb_median']:.0f} |")
    md += ["", "Masks and uncertainty maps byte-identical, prefetch vs not: "
           + ", ".join(f"{b} {'yes' if v else 'NO'}" for b, v in identical.items()) + "."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
