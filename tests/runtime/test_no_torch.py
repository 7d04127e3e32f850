"""The runtime must import and run with only numpy, SimpleITK and onnxruntime (plus typer/rich for the CLI).

A child interpreter blocks torch, onnx, scipy, sklearn, skimage, nnunetv2 and friends at import time, as if
they were not installed, then runs ``ood-run``'s code path on a real bundle.
"""

from __future__ import annotations

import json

from factory import run_with_blocked_imports
from segsentry.runtime.backends import resolve_backend_name

BLOCKED = ["torch", "onnx", "onnxscript", "scipy", "sklearn", "skimage", "nnunetv2",
           "dynamic_network_architectures", "timm", "torchvision", "acvl_utils", "batchgenerators"]

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
