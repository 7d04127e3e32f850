"""``ood-run`` with and without its stage overlaps, side by side: prefetch (the next case read and preprocessed
while this one is inferred) and write-behind (the last case written while this one is inferred).

    python benchmarks/prefetch.py --contended          # demo bundle, 6 phantoms, 3 runs each
    python benchmarks/prefetch.py --backends onnxruntime --repeats 5 --variants serial both

The same folder of chest-CT phantoms (the shapes and spacings of ``cohort.py``'s small preset) goes through
``segsentry run BUNDLE IN -o OUT --backend B`` (``--no-qa`` unless ``--qa``) with each variant's flags
(:data:`VARIANTS`: ``serial`` is ``--no-prefetch --no-write-behind``, ``both`` turns both on), each run a fresh
process, the variants in turn (their order reversed every other round). Wall seconds, cases per minute and the
peak summed RSS / PSS of the process tree (``cohort.run_tree``, sampled every 50 ms); medians and min-max over
``--repeats``; ratios against ``serial``. The masks and uncertainty maps of every variant are compared byte for
byte with serial's. Results: ``benchmarks/results/<--name>.json`` and ``.md``; ``--contended`` labels them as
measured on a busy machine (the load average is recorded either way).
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
VARIANTS = {"serial": ["--no-prefetch", "--no-write-behind"], "prefetch": ["--no-write-behind"],
            "write-behind": ["--no-prefetch", "--write-behind"], "both": ["--prefetch", "--write-behind"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO)
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=500)
    parser.add_argument("--contended", action="store_true", help="label the timings as measured on a busy machine")
    parser.add_argument("--name", default="prefetch_demo")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--qa", action="store_true", help="write the QA page too (as ood-run does by default)")
    args = parser.parse_args(argv)
    variants = ["serial", *(v for v in args.variants if v != "serial")]
    qa_flags = [] if args.qa else ["--no-qa"]

    cases = PRESETS["small"][1]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    identical: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="segsentry-prefetch-") as tmp:
        work = Path(tmp)
        inputs = work / "imagesTs"
        ids = _write_cases(inputs, cases, seed=args.seed)
        for b in args.backends:
            order = list(variants)
            for r in range(args.repeats):
                for variant in order if r % 2 == 0 else order[::-1]:
                    out = work / f"{b}_{variant}_{r}"
                    result = run_tree([sys.executable, "-m", "segsentry.cli", "run", str(args.bundle), str(inputs),
                                       "-o", str(out), "--backend", b, *qa_flags, *VARIANTS[variant]])
                    if result["returncode"] not in (0, 3):  # 3: a case is flagged
                        raise RuntimeError(f"{b} {variant} failed ({result['returncode']}):\n{result['stderr_tail']}")
                    runs.setdefault(f"{b} {variant}", []).append({**result, "out": out,
                                                                   "load_average": os.getloadavg()})
            first = {v: runs[f"{b} {v}"][0]["out"] for v in variants}
            identical[b] = all((first[v] / f).read_bytes() == (first["serial"] / f).read_bytes()
                               for v in variants for c in ids for f in (f"{c}.nii.gz", f"{c}_uncertainty.nii.gz"))
        reports = [json.loads((runs[f"{args.backends[0]} serial"][0]["out"] / f"{c}.json").read_text()) for c in ids]
        patches = [r["n_patches"] for r in reports]
        mirrored = reports[0].get("mirror_axes") or "off"
    load_after = os.getloadavg()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    summary = {name: {"seconds_median": med(name, "seconds"),
                      "seconds_range": [min(r["seconds"] for r in v), max(r["seconds"] for r in v)],
                      "cases_per_minute": 60 * len(ids) / med(name, "seconds"),
                      "peak_rss_mb_median": med(name, "peak_rss_mb"), "peak_pss_mb_median": med(name, "peak_pss_mb")}
               for name, v in runs.items()}
    for b in args.backends:
        serial = summary[f"{b} serial"]
        for v in variants[1:]:
            on = summary[f"{b} {v}"]
            on["throughput_vs_serial"] = on["cases_per_minute"] / serial["cases_per_minute"]
            on["rss_vs_serial"] = on["peak_rss_mb_median"] / serial["peak_rss_mb_median"]
    result = {
        "benchmark": "prefetch", "bundle": args.bundle.name, "contended": args.contended, "qa": args.qa,
        "variants": {v: VARIANTS[v] for v in variants}, "mirroring": mirrored,
        "load_average_before": load_before, "load_average_after": load_after,
        "cases": [{"case": c, "shape_zyx": list(s), "spacing_xyz_mm": list(sp), "n_patches": n}
                  for c, (s, sp), n in zip(ids, cases, patches)],
        "repeats": args.repeats, "summary": summary, "outputs_byte_identical": identical,
        "runs": {k: [{kk: vv for kk, vv in r.items() if kk not in ("out", "stderr_tail")} for r in v]
                 for k, v in runs.items()},
        "machine": machine_info(), "versions": package_versions(["segsentry", "numpy", "onnxruntime", "openvino"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": "Each run is a fresh process; its time includes start-up and model loading. The bundle's defaults "
                 "otherwise (mirroring, every fold).",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    label = ("**Contended**: another job was using the cores (load average below); the gain a quiet machine "
             "shows may differ." if args.contended else "Quiet machine.")
    md = [f"# ood-run with and without its stage overlaps, {args.bundle.name} ({result['date']})", "",
          f"{result['machine']['cpu']}, {result['machine']['cores']} cores. {label} Load average (1 min) "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after.",
          f"{len(ids)} phantoms ({', '.join('x'.join(map(str, s)) for s, _ in cases)}; {sum(patches)} patches); "
          f"{args.repeats} runs each, alternating, medians; QA page {'on' if args.qa else 'off'}, "
          f"mirroring {mirrored}.", "",
          "Variants: " + "; ".join(f"{v} = `{' '.join(VARIANTS[v])}`" for v in variants) + ".", "",
          "| backend, variant | s (min-max) | cases/min | vs serial | peak RSS MB | RSS vs serial | peak PSS MB |",
          "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        ratio, rss = s.get("throughput_vs_serial"), s.get("rss_vs_serial")
        md.append(f"| {name} | {s['seconds_median']:.1f} ({s['seconds_range'][0]:.1f}-{s['seconds_range'][1]:.1f}) | "
                  f"{s['cases_per_minute']:.2f} | {'–' if ratio is None else f'{ratio:.3f}x'} | "
                  f"{s['peak_rss_mb_median']:.0f} | {'–' if rss is None else f'{rss:.2f}x'} | "
                  f"{s['peak_pss_mb_median']:.0f} |")
    md += ["", "Masks and uncertainty maps byte-identical to serial's, every variant: "
           + ", ".join(f"{b} {'yes' if v else 'NO'}" for b, v in identical.items()) + "."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
