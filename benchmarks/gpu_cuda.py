"""GPU benchmark, for any CUDA machine: segsentry's GPU backends vs ``nnUNetPredictor`` on CUDA.

    python benchmarks/gpu_cuda.py --preset small      # or fullres

Same random-weight nnU-Net checkpoint, same phantom volume, both on the first CUDA device: nnU-Net with
``perform_everything_on_device=True`` (its default GPU path, fp16 autocast, no mirroring) and segsentry's
preprocessing + sliding window driving the ``torch`` backend on ``cuda`` (fp16 autocast, float32 OOD head),
timed per call after a warm-up run, plus mask agreement. Where installed, the same volume also runs through
``predict_case`` with the ``ort-gpu`` backend (onnxruntime CUDA provider, float32) and the ``tensorrt`` backend
(FP16 network, FP32 OOD head, engine cached in the work folder; its build time is recorded separately); a
backend whose package is missing is recorded as "not installed", one that fails to start with its error.
Writes ``benchmarks/results/gpu_cuda_<preset>.json`` / ``.md`` with the card's name. Without CUDA it writes
nothing and exits 2: GPU numbers are measured, never estimated.
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
from segsentry.runtime.backends import GPU_BACKENDS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"ort-gpu": "ort-gpu backend (onnxruntime CUDA provider, fp32)",
          "tensorrt": "tensorrt backend (FP16 network, FP32 OOD head, CUDA graph)"}


def make_gpu_backend(name: str, bundle, *, cache_dir: Path, batch_size: int):
    """Both through ``create_backend`` with ``max_batch = batch_size``: tensorrt's engine profile, so every full
    batch replays the captured CUDA graph (ort-gpu ignores it). Raises MissingDependencyError / BackendError."""
    from segsentry.runtime.backends import BackendOptions, create_backend

    m = bundle.manifest
    return create_backend(name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                          options=BackendOptions(cache_dir=cache_dir, max_batch=batch_size))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1,
                        help="patches per call for segsentry's backends (and the TensorRT engine's max batch)")
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
    from segsentry.errors import BackendError, MissingDependencyError
    from segsentry.export import export_nnunet
    from segsentry.phantoms import make_chest_ct
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.backends import BackendOptions
    from segsentry.export.torch_backend import TorchBackend
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
                               options=BackendOptions(precision="fp16"), cuda=True)
        others, setup_seconds, not_measured = {}, {}, {}
        for name in GPU_BACKENDS:
            start = time.perf_counter()
            try:
                others[name] = make_gpu_backend(name, bundle, cache_dir=work, batch_size=args.batch_size)
                setup_seconds[name] = time.perf_counter() - start
            except MissingDependencyError as exc:
                not_measured[name] = f"not installed ({exc.package}: pip install 'segsentry[{exc.extra}]')"
            except BackendError as exc:
                not_measured[name] = f"failed to start: {exc}"

        def run_nnunet():
            out = predictor.predict_single_npy_array(image, props)
            torch.cuda.synchronize()
            return out

        def run_segsentry():
            out = predict_case(loaded, backend, m, batch_size=args.batch_size)
            torch.cuda.synchronize()
            return out

        def run_backend(engine):
            # outputs are copied to the host, so the call is synchronous
            return lambda: predict_case(loaded, engine, m, batch_size=args.batch_size)

        runners = {"nnunet": run_nnunet, "segsentry_torch_cuda": run_segsentry}
        runners.update({f"segsentry_{name}": run_backend(engine) for name, engine in others.items()})
        times = {name: [] for name in runners}
        warm = {name: fn() for name, fn in runners.items()}  # warm-up (cuDNN autotuning, allocator, CUDA graphs)
        ref, ours = warm["nnunet"], warm["segsentry_torch_cuda"]
        for _ in range(args.repeats):
            for name, fn in runners.items():
                torch.cuda.reset_peak_memory_stats(device)
                start = time.perf_counter()
                fn()
                times[name].append({"seconds": time.perf_counter() - start,
                                    # torch's allocator only: onnxruntime and TensorRT memory is not counted
                                    "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20})
        for engine in others.values():
            engine.close()
    med = {k: statistics.median(t["seconds"] for t in v) for k, v in times.items()}
    agreement = {name: float(np.mean(pred.mask == ref)) for name, pred in warm.items() if name != "nnunet"}
    result = {
        "benchmark": "gpu_cuda", "preset": args.preset, "card": card, "volume_shape_zyx": list(shape),
        "n_patches": ours.n_patches, "batch_size": args.batch_size, "runs": times, "median_seconds": med,
        "speedup_vs_nnunet": {k: med["nnunet"] / v for k, v in med.items() if k != "nnunet"},
        "mask_agreement": agreement["segsentry_torch_cuda"], "mask_agreement_vs_nnunet": agreement,
        "setup_seconds": setup_seconds, "not_measured": not_measured,
        "machine": machine_info(), "versions": _versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"gpu_cuda_{args.preset}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# GPU ({card}), preset `{args.preset}` ({result['date']})", "",
          (f"Volume {list(shape)}, {ours.n_patches} patches; predict-only times (model loaded), median of "
           f"{args.repeats}; segsentry batch size {args.batch_size}."), "", "| pipeline | median s |", "|---|---|",
          f"| nnUNetPredictor (CUDA, fp16 autocast, no mirroring) | {med['nnunet']:.3f} |",
          f"| segsentry torch backend (CUDA, fp16 autocast, fp32 OOD head) | {med['segsentry_torch_cuda']:.3f} |",
          *(f"| segsentry {LABELS[name]} | {med[f'segsentry_{name}']:.3f} |" for name in others),
          "", "Mask agreement with nnU-Net: " + ", ".join(f"{k} {v:.6f}" for k, v in agreement.items()) + ".",
          *(f"Setup (session / engine build) {name}: {sec:.1f} s." for name, sec in setup_seconds.items()),
          *(f"{name}: {why}." for name, why in not_measured.items()), ""]
    (RESULTS / f"gpu_cuda_{args.preset}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
