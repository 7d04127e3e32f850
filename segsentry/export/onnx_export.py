"""torch -> ONNX for a :class:`FeatureTap`, with a dynamic batch axis, verified against torch."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from segsentry._atomic import write_bytes_atomic
from segsentry.errors import ExportError
from segsentry.export.wrapper import FeatureTap
from segsentry.manifest import Manifest, write_manifest

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "features")


@dataclass(frozen=True)
class Verification:
    """Largest ONNX-vs-torch differences over the random verification patches."""

    logits_max_abs: float
    features_max_abs: float
    logits_scale: float
    features_scale: float
    n_patches: int


def tap_to_onnx(tap: FeatureTap, *, in_channels: int, patch_size: Sequence[int]) -> onnx.ModelProto:
    """Export with torch's dynamo exporter (needs onnxscript); input ``image`` (batch, C, z, y, x)."""
    example = torch.zeros((2, in_channels, *patch_size))
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                tap,
                (example,),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"x": {0: batch}},
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnxscript ({exc}); pip install 'segsentry[export]'") from exc
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    model = program.model_proto
    onnx.checker.check_model(model)
    return model


def verify_against_torch(
    model: onnx.ModelProto,
    tap: FeatureTap,
    *,
    in_channels: int,
    patch_size: Sequence[int],
    n_patches: int = 2,
    seed: int = 0,
    rtol: float = 1e-4,
) -> Verification:
    """Run random patches through torch and onnxruntime; raise :class:`ExportError` beyond tolerance.

    Tolerance: max |onnx - torch| <= rtol * max(1, max |torch|) for logits and for features.
    """
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    batch = rng.standard_normal((n_patches, in_channels, *patch_size)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_logits, onnx_features = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
    with torch.no_grad():
        torch_logits, torch_features = (t.numpy() for t in tap(torch.from_numpy(batch)))
    result = Verification(
        logits_max_abs=float(np.abs(onnx_logits - torch_logits).max()),
        features_max_abs=float(np.abs(onnx_features - torch_features).max()),
        logits_scale=float(np.abs(torch_logits).max()),
        features_scale=float(np.abs(torch_features).max()),
        n_patches=n_patches,
    )
    for name, err, scale in (
        ("logits", result.logits_max_abs, result.logits_scale),
        ("features", result.features_max_abs, result.features_scale),
    ):
        if not err <= rtol * max(1.0, scale):
            raise ExportError(f"ONNX {name} differ from torch by {err:.3g} (scale {scale:.3g}, tolerance rtol={rtol})")
    log.info("ONNX vs torch: logits max |diff| %.3g, features max |diff| %.3g", result.logits_max_abs,
             result.features_max_abs)
    return result


def save_bundle(model: onnx.ModelProto, manifest: Manifest, output: str | Path) -> Path:
    """Stamp the manifest (with the weight hash) into ``model`` and write one self-contained .onnx atomically."""
    output = Path(output)
    write_bytes_atomic(output, write_manifest(model, manifest))
    return output
