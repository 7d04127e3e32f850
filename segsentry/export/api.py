"""Public export entry points: an nnU-Net v2 model folder, or any 3D ``torch.nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from segsentry.export.nnunet import DEFAULT_LAYER, load_model_folder
from segsentry.export.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    Verification,
    save_bundle,
    tap_to_onnx,
    verify_against_torch,
)
from segsentry.export.wrapper import build_feature_tap
from segsentry.manifest import FeatureSpec, Manifest, Preprocessing, Tiling


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: Manifest
    verification: Verification | None


def export_module(
    network: nn.Module,
    output: str | Path,
    *,
    patch_size: Sequence[int],
    in_channels: int,
    labels: Mapping[str, int],
    preprocessing: Preprocessing,
    layer: str,
    channels: Mapping[str, str] | None = None,
    file_ending: str = ".nii.gz",
    source: Mapping[str, Any] | None = None,
    verify: bool = True,
    mirror_axes: Sequence[int] | None = None,
) -> ExportResult:
    """Export any 3D segmentation network to a two-output ONNX bundle (``logits``, ``features``).

    ``network`` maps ``(batch, in_channels, z, y, x)`` to logits ``(batch, classes, z, y, x)``; ``layer`` is the
    dotted module path whose output becomes the features; ``patch_size`` and ``preprocessing`` are in the
    network's axis order (nnU-Net's transposed order). ``mirror_axes`` (network axes) are the flips ``ood-run``
    averages the logits over (``None``: not recorded, no mirroring).
    """
    patch = [int(p) for p in patch_size]
    tap, layer_shape, kernels, dim = build_feature_tap(network, layer=layer, in_channels=in_channels, patch_size=patch)
    model = tap_to_onnx(tap, in_channels=in_channels, patch_size=patch)
    verification = verify_against_torch(model, tap, in_channels=in_channels, patch_size=patch) if verify else None
    manifest = Manifest(
        source=dict(source or {"kind": "torch", "class": type(network).__qualname__}),
        labels={str(k): int(v) for k, v in labels.items()},
        channels={str(k): str(v) for k, v in (channels or {str(i): f"channel{i}" for i in range(in_channels)}).items()},
        file_ending=file_ending,
        num_classes=len(labels),
        patch_size=patch,
        preprocessing=preprocessing,
        tiling=Tiling(mirror_axes=None if mirror_axes is None else [int(a) for a in mirror_axes]),
        features=FeatureSpec(layer=tap.layer, layer_shape=layer_shape, pooling=kernels, dim=dim),
        inputs={"image": INPUT_NAME},
        outputs=dict(zip(OUTPUT_NAMES, OUTPUT_NAMES)),
    )
    path = save_bundle(model, manifest, output)
    return ExportResult(path=path, manifest=manifest, verification=verification)


def export_nnunet(
    model_dir: str | Path,
    output: str | Path,
    *,
    fold: int | str = 0,
    checkpoint: str = "checkpoint_final.pth",
    configuration: str | None = None,
    layer: str = DEFAULT_LAYER,
    verify: bool = True,
) -> ExportResult:
    """Export one fold of an nnU-Net v2 model folder; the manifest takes preprocessing from the plans."""
    model = load_model_folder(model_dir, fold=fold, checkpoint=checkpoint, configuration=configuration)
    return export_module(
        model.network,
        output,
        patch_size=model.patch_size,
        in_channels=len(model.channels),
        labels=model.labels,
        preprocessing=model.preprocessing(),
        layer=layer,
        channels=model.channels,
        file_ending=str(model.dataset.get("file_ending", ".nii.gz")),
        source={
            "kind": "nnunetv2",
            "model_dir": str(Path(model_dir).resolve()),
            "fold": str(fold),
            "checkpoint": model.checkpoint_path.name,
            "configuration": model.configuration_name,
            "trainer": model.trainer_name,
            "plans": str(model.plans.get("plans_name", "")),
            "dataset": str(model.plans.get("dataset_name", "")),
        },
        verify=verify,
        mirror_axes=model.mirror_axes,
    )
