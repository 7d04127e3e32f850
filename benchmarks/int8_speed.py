"""INT8 speed on a full-size network: per-patch latency of the float32 and the INT8 graph, per CPU engine.

    python benchmarks/int8_speed.py                   # 3d_fullres-sized net (30.8 M, patch 64x128x128), ~5-10 min
    python benchmarks/int8_speed.py --preset small    # the 1.4 M-parameter benchmark net, ~1 min
    python benchmarks/int8_speed.py --engines onnxruntime openvino openvino:bf16   # with OpenVINO's bf16

A random-weight nnU-Net folder (``segsentry.devtools.nnunet_folder``) is exported (features bundle: no head, so
no calibration run is needed) and quantised with ``segsentry.calib.quantize.quantize_bundle`` from
``--max-patches`` patches of one phantom CT through the runtime's preprocessing and tiler. Latency: batch 1,
the engines alternating within every round, medians and min-max over ``--rounds``. Fidelity on the same patches
(random weights: masks mean nothing, so the per-patch argmax of the logits and the features are compared):
fraction of patch voxels whose argmax agrees with the float32 graph on the same engine, and the features'
relative error. CPU flags are recorded (INT8 kernels need VNNI to pay off). Results:
``benchmarks/results/int8_speed_<preset>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info, package_versions

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {"small": ("SMALL_SPEC", (60, 256, 256)), "fullres": ("FULLRES_SPEC", (100, 300, 300))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="fullres")
    parser.add_argument("--max-patches", type=int, default=8)
    parser.add_argument("--patches", type=int, default=2, help="patches per timing round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["onnxruntime", "openvino"],
                        help="NAME, or openvino:bf16 (OpenVINO's bf16 inference precision for both graphs; needs "
                             "AVX512_BF16 or AMX)")
    parser.add_argument("--contended", action="store_true", help="label the timings as measured on a busy machine")
    args = parser.parse_args(argv)

    import SimpleITK as sitk

    from segsentry.calib.quantize import calibration_patches, quantize_bundle
    from segsentry.devtools import nnunet_folder
    from segsentry.export import export_nnunet
    from segsentry.phantoms import make_chest_ct
    from segsentry.runtime import load_bundle
    from segsentry.runtime.backends import BackendOptions, create_backend

    spec_name, shape = PRESETS[args.preset]
    spec = getattr(nnunet_folder, spec_name)
    with tempfile.TemporaryDirectory(prefix="segsentry-int8speed-") as tmp:
        work = Path(tmp)
        images = work / "imagesTr"
        images.mkdir()
        image, _ = make_chest_ct(seed=11, cohort="id", shape=shape).to_sitk()
        sitk.WriteImage(image, str(images / "c_0000.nii.gz"))
        t0 = time.perf_counter()
        features = export_nnunet(nnunet_folder.make_model_folder(work / "results", spec), work / "m.features.onnx",
                                 verify=False).path
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = quantize_bundle(features, work / "m.int8.onnx", calibration_images=[images],
                                 max_patches=args.max_patches)
        quantize_s = time.perf_counter() - t0
        fp32, int8 = load_bundle(features), load_bundle(result.path)
        m = fp32.manifest
        patches = np.concatenate(list(calibration_patches(m, [images], max_patches=args.patches)))
        engines = {}
        for spec_name in args.engines:
            name, _, precision = spec_name.partition(":")
            for label, bundle in (("fp32", fp32), ("int8", int8)):
                engines[(spec_name, label)] = create_backend(
                    name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                    options=BackendOptions(precision=precision or None))
        outputs: dict = {}
        for key, engine in engines.items():  # warm-up, and the outputs compared below
            outputs[key] = [engine.run(p[None]) for p in patches]
        times: dict = {key: [] for key in engines}
        for _ in range(args.rounds):
            for key, engine in engines.items():
                start = time.perf_counter()
                for p in patches:
                    engine.run(p[None])
                times[key].append((time.perf_counter() - start) / len(patches))
        for engine in engines.values():
            engine.close()

    def agreement(ref: list, q: list) -> tuple[float, float]:
        agree = float(np.mean([np.mean(a["logits"].argmax(1) == b["logits"].argmax(1)) for a, b in zip(ref, q)]))
        feat = float(max(np.linalg.norm(b["features"] - a["features"]) / np.linalg.norm(a["features"])
                         for a, b in zip(ref, q)))
        return agree, feat

    rows = {}
    for name in args.engines:
        # the reference: this engine's plain fp32 run of the float graph (openvino:bf16 -> openvino, if measured)
        base = name.partition(":")[0] if (name.partition(":")[0], "fp32") in outputs else name
        ref = outputs[(base, "fp32")]
        med = {label: statistics.median(times[(name, label)]) for label in ("fp32", "int8")}
        base_s = statistics.median(times[(base, "fp32")])
        float_agree, float_feat = agreement(ref, outputs[(name, "fp32")])
        agree, feat = agreement(ref, outputs[(name, "int8")])
        rows[name] = {"fp32_s": med["fp32"], "int8_s": med["int8"], "speedup": med["fp32"] / med["int8"],
                      "fp32_range_s": [min(times[(name, "fp32")]), max(times[(name, "fp32")])],
                      "int8_range_s": [min(times[(name, "int8")]), max(times[(name, "int8")])],
                      "reference": f"{base} fp32", "float_speedup_vs_reference": base_s / med["fp32"],
                      "int8_speedup_vs_reference": base_s / med["int8"],
                      "float_argmax_agreement": float_agree, "float_features_rel_error_max": float_feat,
                      "argmax_agreement": agree, "features_rel_error_max": feat}
    out = {"benchmark": "int8_speed", "preset": args.preset, "contended": args.contended,
           "model": {"spec": spec.name, "patch_size": list(spec.patch_size), "features": list(spec.features)},
           "calibration_patches": result.quantization.n_calibration_patches, "export_seconds": export_s,
           "quantize_seconds": quantize_s, "rounds": args.rounds, "patches_per_round": len(patches),
           "engines": rows, "machine": machine_info(),
           "versions": package_versions(["onnxruntime", "openvino", "onnx", "torch"]),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"int8_speed_{args.preset}.json").write_text(json.dumps(out, indent=2) + "\n")
    flags = ", ".join(k for k, v in out["machine"]["cpu_flags"].items() if v) or "unknown"
    md = [f"# INT8 speed, preset `{args.preset}` ({out['date']})", "",
          f"{out['machine']['cpu']}, {out['machine']['cores']} cores, flags: {flags}."
          + (" **Contended** (other jobs shared the cores)." if args.contended else ""),
          f"{spec.name}, patch {list(spec.patch_size)}, random weights; quantised from "
          f"{out['calibration_patches']} patches in {quantize_s:.0f} s; batch 1, {args.rounds} alternating rounds of "
          f"{len(patches)} patches, medians.", "",
          "Agreement and speed-ups against each engine's plain fp32 run of the float graph (`openvino:bf16`: "
          "OpenVINO's fp32 run). `openvino:bf16` runs both graphs with OpenVINO's bf16 inference precision "
          "(the int8 graph's convolutions stay int8).", "",
          "| engine | float graph s/patch (min-max) | int8 graph s/patch (min-max) | float vs fp32 | int8 vs fp32 | "
          "argmax agreement float / int8 | features rel. error float / int8 |",
          "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['fp32_s']:.2f} ({r['fp32_range_s'][0]:.2f}-{r['fp32_range_s'][1]:.2f}) | "
                  f"{r['int8_s']:.2f} ({r['int8_range_s'][0]:.2f}-{r['int8_range_s'][1]:.2f}) | "
                  f"{r['float_speedup_vs_reference']:.2f}x | {r['int8_speedup_vs_reference']:.2f}x | "
                  f"{r['float_argmax_agreement']:.5f} / {r['argmax_agreement']:.5f} | "
                  f"{r['float_features_rel_error_max']:.3g} / {r['features_rel_error_max']:.3g} |")
    (RESULTS / f"int8_speed_{args.preset}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
