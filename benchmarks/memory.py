"""Runtime peak memory on a clinically sized CT (default 300 x 512 x 512), in bytes per input voxel.

    python benchmarks/memory.py                      # ~3-5 min on 2 cores
    python benchmarks/memory.py --shape 120 512 512  # quicker

A life-size phantom chest CT is written to disk, then ``ood-run`` (``run_batch``, onnxruntime) processes it in
a fresh child process with the small benchmark network (1.4 M parameters: the network's own memory is small,
so the peak is dominated by the volume buffers this measures). Peak RSS (``ru_maxrss``) minus the RSS after
imports and bundle loading gives the volume-dependent part. Results: ``benchmarks/results/memory.json/.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from segsentry.bench import peak_rss_mb  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"



def _child(bundle: str, image: str, out: str) -> None:
    from segsentry.runtime import load_bundle, run_batch

    load_bundle(bundle)
    import onnxruntime  # noqa: F401  (imports counted in the baseline)

    baseline = peak_rss_mb()
    start = time.perf_counter()
    result = run_batch(bundle, [Path(image)], Path(out), backend="onnxruntime", qa=False)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    report = result.outcomes[0].report
    print("RESULT " + json.dumps({"baseline_mb": baseline, "peak_mb": peak, "seconds": seconds,
                                  "n_patches": report.n_patches if report else None,
                                  "timings": report.timings_s if report else None,
                                  "status": result.outcomes[0].status, "error": result.outcomes[0].error}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="z y x")
    parser.add_argument("child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return 0

    import SimpleITK as sitk

    from segsentry.calib import calibrate
    from segsentry.devtools.nnunet_folder import SMALL_SPEC, make_model_folder
    from segsentry.export import export_nnunet
    from segsentry.phantoms import make_chest_ct

    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory(prefix="segsentry-mem-") as tmp:
        work = Path(tmp)
        model_dir = make_model_folder(work / "results", SMALL_SPEC)
        train = work / "train"
        train.mkdir()
        sitk.WriteImage(make_chest_ct(seed=1).to_sitk()[0], str(train / "t1_0000.nii.gz"))
        sitk.WriteImage(make_chest_ct(seed=2).to_sitk()[0], str(train / "t2_0000.nii.gz"))
        bundle = calibrate(export_nnunet(model_dir, work / "m.features.onnx").path, [train], work / "m.ood.onnx").path
        phantom = make_chest_ct(seed=3, shape=shape, spacing_xyz=(0.7, 0.7, 1.0))
        image = work / "ct_0000.nii.gz"
        sitk.WriteImage(phantom.to_sitk()[0], str(image))
        proc = subprocess.run([sys.executable, __file__, str(bundle), str(image), str(work / "out")],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        child = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    voxels = shape[0] * shape[1] * shape[2]
    volume_mb = child["peak_mb"] - child["baseline_mb"]
    result = {
        "benchmark": "memory", "shape_zyx": list(shape), "spacing_xyz_mm": [0.7, 0.7, 1.0], "voxels": voxels,
        "network": SMALL_SPEC.name, "patch_size": list(SMALL_SPEC.patch_size),
        "target_spacing_zyx_mm": list(SMALL_SPEC.spacing), **child,
        "volume_dependent_mb": volume_mb,
        "bytes_per_input_voxel": volume_mb * 2**20 / voxels,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Runtime memory on a {shape[0]} x {shape[1]} x {shape[2]} CT ({result['date']})", "",
          f"Peak RSS {child['peak_mb']:.0f} MB, of which {volume_mb:.0f} MB depend on the volume "
          f"({result['bytes_per_input_voxel']:.1f} bytes per input voxel); baseline after imports and bundle "
          f"load {child['baseline_mb']:.0f} MB. {child['n_patches']} patches, {child['seconds']:.1f} s end to end "
          f"(onnxruntime, {SMALL_SPEC.name}, target spacing {list(SMALL_SPEC.spacing)} mm).", ""]
    (RESULTS / "memory.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
