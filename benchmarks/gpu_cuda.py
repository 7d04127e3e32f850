"""GPU benchmark, for any CUDA machine: segsentry's torch backend on CUDA vs ``nnUNetPredictor`` on CUDA.

    python benchmarks/gpu_cuda.py --preset small      # or fullres

Same random-weight nnU-Net checkpoint, same phantom volume, both on the first CUDA device: nnU-Net with
``perform_everything_on_device=True`` (its default GPU path, fp16 autocast, no mirroring) and segsentry's
preprocessing + sliding window driving the ``torch`` backend on ``cuda`` (fp16 autocast, float32 OOD head),
timed per call after a warm-up run, plus mask agreement. onnxruntime-GPU and TensorRT backends are not
implemented yet: the results say so. Writes ``benchmarks/results/gpu_cuda_<preset>.json`` / ``.md`` with
the card's name. Without CUDA it writes nothing and exits 2: GPU numbers are measured, never estimated.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_cpu import PRESETS, _versions  # noqa: E402

from segsentry.bench import machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (GPU numbers are never estimated)", file=sys.stderr)
        return 2
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from segsentry.calib import calibrate
    from segsentry.devtools import nnunet_folder
    from segsentry.devtools.nnunet_reference import make_predictor
    from segsentry.export import export_nnunet
    from segsentry.phantoms import make_chest_ct
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.backends.torch import TorchBackend
    from segsentry.runtime.io import CaseInput
    from segsentry.runtime.pipeline import predict_case

    spec_name, shape = PRESETS[args.preset]
    spec = getattr(nnunet_folder, spec_name)
    device = torch.device("cuda", 0)
    card = torch.cuda.get_device_name(device)
    with tempfile.TemporaryDirectory(prefix="segsentry-gpu-") as tmp:
        work = Path(tmp)
        model_dir = nnunet_folder.make_model_folder(work / "results", spec)
        train = work / "imagesTr"
        train.mkdir()
        for seed in (101, 102):
            sitk.WriteImage(make_chest_ct(seed=seed, shape=shape).to_sitk()[0], str(train / f"t{seed}_0000.nii.gz"))
        case = work / "case_0000.nii.gz"
        sitk.WriteImage(make_chest_ct(seed=7, shape=shape).to_sitk()[0], str(case))
        features = export_nnunet(model_dir, work / "m.features.onnx").path
        bundle = load_bundle(calibrate(features, [train], work / "m.ood.onnx", backend="onnxruntime").path)
        m = bundle.manifest

        predictor = make_predictor(model_dir)
        predictor.device = device
        predictor.perform_everything_on_device = True
        image, props = SimpleITKIO().read_images([str(case)])
        loaded = read_case(CaseInput("case", (case,)), num_channels=m.num_channels)
        backend = TorchBackend(bundle.model_bytes, manifest=m, channels=m.num_channels, patch_size=m.patch_size,
                               device="cuda", fp16=True)

        def run_nnunet():
            out = predictor.predict_single_npy_array(image, props)
            torch.cuda.synchronize()
            return out

        def run_segsentry():
            out = predict_case(loaded, backend, m)
            torch.cuda.synchronize()
            return out

        times = {"nnunet": [], "segsentry_torch_cuda": []}
        ref, ours = run_nnunet(), run_segsentry()  # warm-up (cuDNN autotuning, allocator)
        for _ in range(args.repeats):
            for name, fn in (("nnunet", run_nnunet), ("segsentry_torch_cuda", run_segsentry)):
                torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                fn()
                times[name].append({"seconds": time.perf_counter() - start,
                                    "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20})
    med = {k: statistics.median(t["seconds"] for t in v) for k, v in times.items()}
    result = {
        "benchmark": "gpu_cuda", "preset": args.preset, "card": card, "volume_shape_zyx": list(shape),
        "n_patches": ours.n_patches, "runs": times, "median_seconds": med,
        "speedup_vs_nnunet": med["nnunet"] / med["segsentry_torch_cuda"],
        "mask_agreement": float(np.mean(ours.mask == ref)),
        "not_measured": {"tensorrt": "backend not implemented yet", "ort-gpu": "backend not implemented yet"},
        "machine": machine_info(), "versions": _versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gpu_cuda_{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# GPU ({card}), preset `{args.preset}` ({result['date']})", "",
          f"Volume {list(shape)}, {ours.n_patches} patches; predict-only times (model loaded), median of "
          f"{args.repeats}.", "", "| pipeline | median s |", "|---|---|",
          f"| nnUNetPredictor (CUDA, fp16 autocast, no mirroring) | {med['nnunet']:.3f} |",
          f"| segsentry torch backend (CUDA, fp16 autocast, fp32 OOD head) | {med['segsentry_torch_cuda']:.3f} |",
          "", f"Mask agreement {result['mask_agreement']:.6f}. TensorRT and onnxruntime-GPU: not implemented yet.", ""]
    (RESULTS / f"gpu_cuda_{args.preset}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
