"""The FP32 ceiling of a full-size network on this CPU: FLOPs per patch, what each engine reaches, what is left.

    python benchmarks/conv_ceiling.py                  # 3d_fullres-sized net (30.8 M, patch 64x128x128), ~5 min
    python benchmarks/conv_ceiling.py --preset small   # the 1.4 M-parameter benchmark net, ~1 min

Issue 13 asks, where 2x over nnU-Net in FP32 cannot be had, for the ceiling. The patch count is nnU-Net's tiling
and the time is the network, so the question is how far each engine's convolutions are from what the cores can
do. This script counts the network's arithmetic from its ONNX graph (2 x multiply-adds of every Conv and
ConvTranspose at batch 1; the InstanceNorm / LeakyReLU / Concat elements are counted apart, they are memory-bound),
measures the machine's dense FP32 rate as numpy's float32 matrix product (OpenBLAS on every core, n = 4096: the
best FP32 rate a library reaches here, a practical peak, not the data-sheet one) and times one patch through
OpenVINO (fp32), onnxruntime and torch eager (what ``nnUNetPredictor`` runs per patch on a CPU, fp32, inference
mode), batch 1, the engines alternating within every round, medians and min-max over ``--rounds``.

It reports each engine's GFLOP/s and share of the matrix-product rate, and the inference-only speed-up over torch
an engine would reach at that rate: the ceiling of an FP32 end-to-end speed-up, before nnU-Net's own overheads
outside the network (its end-to-end time per patch is in ``e2e_cpu_*.md``). Results:
``benchmarks/results/conv_ceiling_<preset>[_suffix].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info, package_versions

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {"small": "SMALL_SPEC", "fullres": "FULLRES_SPEC"}
ENGINES = ("openvino", "onnxruntime", "torch")


def graph_arithmetic(model_bytes: bytes, patch_size: list[int], channels: int) -> dict:
    """FLOPs (2 x multiply-adds) of the graph's Conv / ConvTranspose nodes at batch 1, and the element count of its
    other tensors' producers (InstanceNormalization, LeakyRelu, Concat, ...), from ONNX shape inference."""
    import onnx

    from segsentry.graph import GraphIndex, infer_types

    model = onnx.load_model_from_string(model_bytes)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, [1, channels, *patch_size]):
        dim.Clear()
        dim.dim_value = size
    index = GraphIndex(infer_types(model, message="cannot infer the network's tensor shapes").graph)

    def shape(name: str) -> list[int] | None:
        info = index.value_info(name)
        return None if info is None else [d.dim_value for d in info.type.tensor_type.shape.dim]

    conv = transposed = 0
    other: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = index.initializer(node.input[1]).dims  # (Cout, Cin/group, *k)
            conv += 2 * math.prod(shape(node.output[0])) * w[1] * math.prod(w[2:])
        elif node.op_type == "ConvTranspose":
            w = index.initializer(node.input[1]).dims  # (Cin, Cout/group, *k)
            transposed += 2 * math.prod(shape(node.input[0])) * w[1] * math.prod(w[2:])
        elif node.output and shape(node.output[0]) is not None:
            other[node.op_type] = other.get(node.op_type, 0) + math.prod(shape(node.output[0]))
    return {"conv_flops": conv, "conv_transpose_flops": transposed, "flops": conv + transposed,
            "other_elements": other}


def matmul_rate(n: int = 4096, repeats: int = 5) -> dict:
    """float32 ``a @ b`` with numpy (its BLAS, every core): GFLOP/s, median and max over ``repeats``."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: threads and pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return {"n": n, "gflops_median": flops / statistics.median(times) / 1e9, "gflops_max": flops / min(times) / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fullres")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--suffix", default="", help="appended to the result's name (e.g. the machine)")
    args = parser.parse_args(argv)

    import torch

    from segsentry.devtools import nnunet_folder
    from segsentry.export import export_nnunet
    from segsentry.export.nnunet import load_folds
    from segsentry.runtime import load_bundle
    from segsentry.runtime.backends import BackendOptions, create_backend

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    spec = getattr(nnunet_folder, PRESETS[args.preset])
    with tempfile.TemporaryDirectory(prefix="segsentry-ceiling-") as tmp:
        folder = nnunet_folder.make_model_folder(Path(tmp) / "results", spec)
        bundle = load_bundle(export_nnunet(folder, Path(tmp) / "m.features.onnx", verify=False).path)
        network = load_folds(folder)[0].network.eval()
    m = bundle.manifest
    arithmetic = graph_arithmetic(bundle.model_bytes, m.patch_size, m.num_channels)
    params = sum(p.numel() for p in network.parameters())
    rate = matmul_rate()
    x = np.random.default_rng(1).standard_normal((1, m.num_channels, *m.patch_size), dtype=np.float32)
    runners = {}
    for name in args.engines:
        if name == "torch":
            tensor = torch.from_numpy(x)

            def run_torch(tensor=tensor):
                with torch.inference_mode():
                    network(tensor)
            runners[name] = run_torch
        else:
            engine = create_backend(name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                                    options=BackendOptions())
            runners[name] = lambda engine=engine: engine.run(x)
    for run in runners.values():
        run()  # first call: kernels chosen, arenas grown
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)

    gflop = arithmetic["flops"] / 1e9
    peak = rate["gflops_median"]
    rows = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        rows[name] = {"seconds_median": median, "seconds_min": min(ts), "seconds_max": max(ts),
                      "gflops": gflop / median, "share_of_matmul_rate": gflop / median / peak}
    at_peak = gflop / peak
    torch_s = rows.get("torch", {}).get("seconds_median")
    result = {"preset": args.preset, "patch_size": list(m.patch_size), "parameters": params,
              "arithmetic": arithmetic, "matmul": rate, "threads": threads, "rounds": args.rounds,
              "engines": rows, "seconds_per_patch_at_matmul_rate": at_peak,
              "ceiling_speedup_over_torch": None if torch_s is None else torch_s / at_peak,
              "machine": machine_info(),
              "versions": package_versions(("numpy", "torch", "onnxruntime", "openvino")),
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    name = f"conv_ceiling_{args.preset}{'_' + args.suffix if args.suffix else ''}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    machine = result["machine"]
    cpu_id = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in machine.get("cpu_id", {}).items())
    lines = [f"# FP32 ceiling, preset `{args.preset}` ({result['date']})", "",
             f"{machine['cpu']} ({cpu_id}), {threads} cores; {params / 1e6:.1f} M parameters, patch "
             f"{' x '.join(map(str, m.patch_size))}; **{gflop:.0f} GFLOP per patch** (Conv "
             f"{arithmetic['conv_flops'] / 1e9:.0f}, ConvTranspose {arithmetic['conv_transpose_flops'] / 1e9:.0f}; "
             f"{sum(arithmetic['other_elements'].values()) / 1e6:.0f} M elements of other ops, memory-bound). "
             f"Dense FP32 rate (numpy float32 matmul, n = {rate['n']}): **{peak:.0f} GFLOP/s** median "
             f"(max {rate['gflops_max']:.0f}). Batch 1, {args.rounds} alternating rounds, medians (min-max).", "",
             "| engine | s per patch | GFLOP/s | share of the matmul rate | vs torch |",
             "|---|---|---|---|---|"]
    for engine, row in rows.items():
        vs = f"{torch_s / row['seconds_median']:.2f}x" if torch_s else "-"
        lines.append(f"| {engine} | {row['seconds_median']:.2f} ({row['seconds_min']:.2f}-{row['seconds_max']:.2f}) | "
                     f"{row['gflops']:.0f} | {row['share_of_matmul_rate']:.0%} | {vs} |")
    lines += ["", f"At the matmul rate one patch would take {at_peak:.2f} s"
              + (f": an FP32 engine could be at most **{result['ceiling_speedup_over_torch']:.2f}x** faster than "
                 "torch eager in the network on this machine, before nnU-Net's overheads outside it."
                 if torch_s else ".")]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
