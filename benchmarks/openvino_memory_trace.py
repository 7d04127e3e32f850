"""Where OpenVINO's memory goes, step by step: read, compile, drop the model, first patch.

    python benchmarks/openvino_memory_trace.py --bundle fullres --tag _fullres_zen5     # ~2 min

Why: ``engine_floor.py`` shows the OpenVINO engine alone at 0.56x of nnU-Net's end-to-end peak on the fullres
net, so no runtime buffer can bring the whole run to 0.5x. This splits that floor. Each fresh child process
builds the engine as the backend does (``split_head``, static one-patch shape, f32) and reads ``VmRSS`` with its
anonymous and file-backed parts after each step, for two ways in: the bundle's bytes (what ``ood-run`` does), and
an OpenVINO IR file written beforehand (weights memory-mapped, ``ENABLE_MMAP``), to see whether OpenVINO keeps the
read model's constants beside its repacked weights. Results: ``benchmarks/results/openvino_memory_trace<tag>``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from segsentry.bench import machine_info, package_versions
from segsentry.manifest import Manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import _bundle, run_child  # noqa: E402  (the same random-weight bundles and fresh children)

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = ("bundle-bytes", "ir-file")
STEPS = ("imports", "read", "model_bytes_dropped", "compiled", "model_dropped", "first_patch")


def _status() -> dict[str, float]:
    wanted = {"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb", "VmHWM": "peak_mb"}
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in wanted:
            out[wanted[key]] = int(line.split()[1]) / 1024
    return out


def _network(ov: Any, model: Any, manifest: Manifest) -> Any:
    """The backend's network as ``OpenvinoBackend`` compiles it: static one-patch shape, the head cut off."""
    from segsentry.runtime.backends.openvino import split_head

    model.reshape({"image": ov.PartialShape([1, manifest.num_channels, *manifest.patch_size])})
    return split_head(ov, model)[0]


def _child(bundle_path: str, source: str, ir_path: str) -> None:
    import openvino as ov

    from segsentry.runtime import load_bundle

    trace = {"imports": _status()}
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    core = ov.Core()
    if source == "bundle-bytes":
        model = core.read_model(model=bundle.model_bytes)
    else:
        model = core.read_model(ir_path)
    trace["read"] = _status()
    del bundle
    gc.collect()
    trace["model_bytes_dropped"] = _status()
    if source == "bundle-bytes":  # the IR file holds the network already cut
        model = _network(ov, model, m)
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    trace["compiled"] = _status()
    del model
    gc.collect()
    trace["model_dropped"] = _status()
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, m.num_channels, *m.patch_size)).astype(np.float32)
    request.infer({0: x})
    trace["first_patch"] = _status()
    print("RESULT " + json.dumps(trace))


def _write_ir(bundle_path: Path, ir_path: Path) -> None:
    """The backend's network (head cut off, static one-patch shape) saved as OpenVINO IR, weights in f32."""
    import openvino as ov

    from segsentry.runtime import load_bundle

    bundle = load_bundle(bundle_path)
    model = _network(ov, ov.Core().read_model(model=bundle.model_bytes), bundle.manifest)
    ov.save_model(model, str(ir_path), compress_to_fp16=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="fullres", help="small, fullres, demo or a bundle path")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="")
    parser.add_argument("child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0

    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="segsentry-ovtrace-") as tmp:
        bundle, network = _bundle(args.bundle, Path(tmp))
        ir = Path(tmp) / "network.xml"
        _write_ir(Path(bundle), ir)
        for r in range(args.repeats):
            for source in SOURCES:
                child = run_child(__file__, str(bundle), source, str(ir))
                runs.append({"source": source, "round": r, "trace": child})
    summary = {source: {step: {k: statistics.median(x["trace"][step][k] for x in runs if x["source"] == source)
                               for k in ("rss_mb", "anon_mb", "file_mb", "peak_mb")} for step in STEPS}
               for source in SOURCES}
    machine = machine_info()
    result = {"benchmark": "openvino_memory_trace", "bundle": network, "repeats": args.repeats,
              "summary": summary, "runs": runs, "machine": machine,
              "versions": package_versions(["segsentry", "numpy", "openvino"])}
    RESULTS.mkdir(exist_ok=True)
    stem = f"openvino_memory_trace{args.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    cpu = machine.get("cpu_id", {})
    lines = [f"# OpenVINO memory, step by step: {network}", "",
             f"VmRSS (anonymous + file-backed) after each step, medians of {args.repeats} fresh processes, MB. "
             f"{machine.get('cpu', '')}, {machine.get('cores')} cores, cpu family/model {cpu.get('cpu_family')}/"
             f"{cpu.get('model')}; OpenVINO {result['versions'].get('openvino')}.", "",
             "| source | " + " | ".join(STEPS) + " | peak |", "|---|" + "---|" * (len(STEPS) + 1)]
    for source, steps in summary.items():
        cells = [f"{s['rss_mb']:.0f} ({s['anon_mb']:.0f} + {s['file_mb']:.0f})" for s in steps.values()]
        lines.append(f"| {source} | " + " | ".join(cells) + f" | {steps['first_patch']['peak_mb']:.0f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
