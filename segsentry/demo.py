"""``ood-run --demo``: phantom chest CTs through the embedded, nnU-Net-trained demo bundle.

The demo model (``segsentry/models/demo_lung.ood.onnx``) was trained by nnU-Net 2.8.1 on in-distribution
phantom chest CTs and calibrated with ``ood-calib`` (recipe: ``scripts/train_demo_model.py``). The demo
writes three fresh phantoms — in distribution, dataset shift (thick slices, other kernel and noise) and
far-OOD (an abdomen) — and runs them like any ``ood-run`` batch.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import SimpleITK as sitk

from segsentry.errors import BundleError
from segsentry.runtime.batch import BatchResult, CaseOutcome, run_batch

DEMO_CASES = (("demo_id", "id", 9001), ("demo_dataset_shift", "dataset-shift", 9002), ("demo_far_ood", "far-ood", 9003))


def demo_bundle_path() -> Path:
    path = Path(str(resources.files("segsentry") / "models" / "demo_lung.ood.onnx"))
    if not path.is_file():
        raise BundleError(f"the demo model is not installed at {path}; build it with scripts/train_demo_model.py")
    return path


def run_demo(
    output_dir: str | Path, *, backend: str = "auto", threads: int | None = None,
    on_case: Callable[[CaseOutcome], None] | None = None,
) -> BatchResult:
    """Write the demo phantoms to ``output_dir/inputs`` and run the embedded bundle into ``output_dir``."""
    from segsentry.phantoms import make_chest_ct

    output_dir = Path(output_dir)
    bundle = demo_bundle_path()
    inputs = output_dir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    files = []
    for case_id, cohort, seed in DEMO_CASES:
        image, _ = make_chest_ct(seed=seed, cohort=cohort).to_sitk()
        target = inputs / f"{case_id}_0000.nii.gz"
        sitk.WriteImage(image, str(target), True)
        files.append(target)
    return run_batch(bundle, files, output_dir, backend=backend, threads=threads, on_case=on_case)
