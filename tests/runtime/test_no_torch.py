"""The runtime must import and run with only numpy, SimpleITK and onnxruntime (plus typer/rich for the CLI).

A child interpreter blocks torch, onnx, scipy, sklearn, skimage, nnunetv2 and friends at import time, as if
they were not installed, then runs ``ood-run``'s code path on a real bundle.
"""

from __future__ import annotations

import json

from factory import run_with_blocked_imports
from segsentry.runtime.backends import resolve_backend_name

BLOCKED = ["torch", "onnx", "onnxscript", "scipy", "sklearn", "skimage", "nnunetv2",
           "dynamic_network_architectures", "timm", "torchvision", "acvl_utils", "batchgenerators", "pydicom"]

CHILD = """
import segsentry.runtime
from segsentry.cli import app
from typer.testing import CliRunner
result = CliRunner().invoke(app, ["run", {bundle!r}, {image!r}, "-o", {out!r}, "--json"])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
from segsentry.runtime.backends import resolve_backend_name
print("AUTO", resolve_backend_name("auto"))
print("RESULT", result.exit_code, loaded)
"""


def test_runtime_runs_without_torch(ct_pipeline, test_cases, tmp_path):
    image = str(next(iter(test_cases["ct"].values()))[0])
    proc = run_with_blocked_imports(
        BLOCKED, CHILD.format(bundle=str(ct_pipeline.ood_onnx), image=image, out=str(tmp_path / "out")))
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert line.split(" ", 2)[1] in ("0", "3"), proc.stdout
    assert line.split(" ", 2)[2] == "[]"
    report = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    # ``auto`` as the child sees it (openvino when installed: it needs no torch; tensorrt needs onnx, blocked here)
    child_auto = next(line for line in proc.stdout.splitlines() if line.startswith("AUTO")).split()[1]
    assert report["backend"] == child_auto
    if child_auto in ("onnxruntime", "openvino"):
        assert resolve_backend_name("auto") in (child_auto, "tensorrt", "ort-gpu")


LAZY_CHILD = """
from segsentry.runtime.batch import run_batch
result = run_batch({bundle!r}, [{image!r}], {out!r}, backend="onnxruntime", qa=False)
print("BACKEND", result.backend, len(result.outcomes), len(result.failed))
print("LOADED", sorted(m for m in sys.modules if m.startswith("segsentry.")
                       and (m.split(".")[1] in ("export", "calib", "evaluation", "cli")
                            or m.startswith("segsentry.runtime.backends.")
                            and m.rsplit(".", 1)[1] not in ("base", "options", "onnxruntime", "ort_loader"))))
"""


def test_only_the_chosen_backend_is_imported(ct_pipeline, test_cases, tmp_path):
    """The runtime imports the one backend module it was asked for, and never the exporter, calib, evaluation
    or the CLI (nothing is blocked here: this is about what the runtime itself pulls in)."""
    image = str(next(iter(test_cases["ct"].values()))[0])
    proc = run_with_blocked_imports([], LAZY_CHILD.format(bundle=str(ct_pipeline.ood_onnx), image=image,
                                                         out=str(tmp_path / "out")))
    assert proc.returncode == 0, proc.stderr
    assert "BACKEND onnxruntime 1 0" in proc.stdout, proc.stdout
    assert "LOADED []" in proc.stdout, proc.stdout


TORCH_CHILD = """
from segsentry.errors import MissingDependencyError
from segsentry.runtime.backends import create_backend
from segsentry.runtime.bundle import load_bundle
bundle = load_bundle({bundle!r})
m = bundle.manifest
try:
    create_backend("torch", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size, manifest=m)
except MissingDependencyError as exc:
    print("MISSING", exc.package, exc.extra, str(exc))
print("EXPORT", "segsentry.export" in sys.modules)
"""


def test_torch_backend_without_torch_names_the_export_extra(ct_pipeline):
    """In a fresh process without torch, the torch backend's module (in the exporter's package, which needs
    torch at import) is reported as the torch backend needing the ``export`` extra."""
    proc = run_with_blocked_imports(["torch"], TORCH_CHILD.format(bundle=str(ct_pipeline.ood_onnx)))
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("MISSING"))
    assert line.startswith("MISSING torch export The torch backend needs the Python package 'torch'"), line
    assert "pip install 'segsentry[export]'" in line
    assert "EXPORT False" in proc.stdout
