"""The engine's own memory floor: one bundle, one engine, one patch, nothing else in the process.

    python benchmarks/engine_floor.py --bundle fullres \\
        --reference benchmarks/results/e2e_cpu_fullres_f1_44x190x210_zen4.json     # ~3 min

Why: the end-to-end memory target (peak RSS <= 0.5x nnU-Net's) can be missed by the runtime's own buffers or by
the engine itself. Each engine here runs in a fresh child process that loads the bundle, builds segsentry's
backend exactly as ``ood-run`` does (``create_backend``; the bundle's bytes dropped once it is built) and runs
two patches of random input, each followed by one mirrored flip (``run_network``, as a mirrored tile's flips go). ``VmRSS`` is read after the imports, after the build and after each patch;
``VmHWM`` (the kernel's peak) is the number reported. Engines alternate within every round. ``--reference``
takes nnU-Net's peak from an ``e2e_cpu.py`` result on the same net (its median, this machine) and states the
0.5x budget beside each engine. Results: ``benchmarks/results/engine_floor<tag>.json/.md``.

Engines: ``openvino`` (fp32, static one-patch engine), ``onnxruntime`` (segsentry's defaults) and
``onnxruntime:low-memory`` (``--low-memory``: arena and memory pattern off).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info, package_versions, peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import _bundle, _rss_mb, run_child  # noqa: E402  (the same random-weight bundles, RSS reader, children)

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = ("openvino", "onnxruntime", "onnxruntime:low-memory")


def _child(bundle_path: str, engine: str) -> None:
    from dataclasses import replace

    from segsentry.runtime import load_bundle
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.backends.options import BackendOptions

    name, _, option = engine.partition(":")
    __import__(name)  # the engine's library counts in the imports, not in the build
    imports = _rss_mb()
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    backend = create_backend(name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                             manifest=m, options=BackendOptions(low_memory=option == "low-memory"))
    bundle = replace(bundle, model_bytes=b"")  # as run_batch does once the engine holds its copy
    gc.collect()
    built, build_peak = _rss_mb(), peak_rss_mb()
    x = np.random.default_rng(0).standard_normal((1, m.num_channels, *m.patch_size)).astype(np.float32)
    after = []
    with backend:
        for _ in range(2):  # one patch and one of its mirrored flips, as iterate_patches sends them
            backend.run(x)
            after.append(_rss_mb())
            backend.run_network(np.ascontiguousarray(x[:, :, ::-1]))
            after.append(_rss_mb())
    print("RESULT " + json.dumps({"imports_mb": imports, "built_mb": built, "build_peak_mb": build_peak,
                                  "after_patch_mb": after, "peak_mb": peak_rss_mb()}))


def _machine_line(machine: dict) -> str:
    cpu_id = machine.get("cpu_id", {})
    flags = ", ".join(k for k, v in machine.get("cpu_flags", {}).items() if v)
    return (f"{machine.get('cpu', '')}, {machine.get('cores')} cores, cpu family/model {cpu_id.get('cpu_family')}/"
            f"{cpu_id.get('model')} ({flags}).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="fullres", help="small, fullres, demo or a bundle path")
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", type=Path, help="an e2e_cpu.py result JSON: nnU-Net's peak on the same net")
    parser.add_argument("--tag", default="")
    parser.add_argument("child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0

    reference = None
    if args.reference:
        e2e = json.loads(args.reference.read_text())
        reference = {"file": args.reference.name, "nnunet_peak_mb": e2e["median_peak_rss_mb"]["nnunet"]}
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="segsentry-floor-") as tmp:
        bundle, network = _bundle(args.bundle, Path(tmp), folds=args.folds)
        for r in range(args.repeats):
            for engine in args.engines:
                child = run_child(__file__, str(bundle), engine)
                runs.append({"engine": engine, "round": r, **child})
    summary = {}
    for engine in args.engines:
        mine = [x for x in runs if x["engine"] == engine]
        med = {k: statistics.median(x[k] for x in mine) for k in ("imports_mb", "built_mb", "build_peak_mb", "peak_mb")}
        med["held_after_first_patch_mb"] = statistics.median(x["after_patch_mb"][0] - x["built_mb"] for x in mine)
        med["peak_mb_range"] = [min(x["peak_mb"] for x in mine), max(x["peak_mb"] for x in mine)]
        if reference:
            med["vs_nnunet"] = med["peak_mb"] / reference["nnunet_peak_mb"]
        summary[engine] = med
    machine = machine_info()
    result = {"benchmark": "engine_floor", "bundle": network, "repeats": args.repeats, "reference": reference,
              "summary": summary, "runs": runs, "machine": machine,
              "versions": package_versions(["segsentry", "numpy", "onnxruntime", "openvino"])}
    RESULTS.mkdir(exist_ok=True)
    stem = f"engine_floor{args.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Engine memory floor: {network}", "",
             f"One patch of random input through segsentry's backend, nothing else in the process; medians of "
             f"{args.repeats} fresh processes (MB, VmRSS / VmHWM). {_machine_line(machine)}", ""]
    if reference:
        budget = 0.5 * reference["nnunet_peak_mb"]
        lines += [f"nnU-Net's end-to-end peak on this net (`{reference['file']}`): "
                  f"{reference['nnunet_peak_mb']:.0f} MB, so 0.5x allows {budget:.0f} MB for the whole process.", ""]
    lines += ["| engine | imports | built | build peak | held after patch 1 − built | peak (range) "
              "| peak vs nnU-Net |",
              "|---|---|---|---|---|---|---|"]
    for engine, s in summary.items():
        ratio = f"{s['vs_nnunet']:.2f}x" if "vs_nnunet" in s else "–"
        lines.append(f"| {engine} | {s['imports_mb']:.0f} | {s['built_mb']:.0f} | {s['build_peak_mb']:.0f} | "
                     f"{s['held_after_first_patch_mb']:.0f} | {s['peak_mb']:.0f} ({s['peak_mb_range'][0]:.0f}–"
                     f"{s['peak_mb_range'][1]:.0f}) | {ratio} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
