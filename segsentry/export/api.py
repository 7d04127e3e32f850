"""Public export entry points: an nnU-Net v2 model folder, or any 3D ``torch.nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from segsentry.errors import ExportError

from segsentry.export.nnunet import DEFAULT_LAYER, load_folds
from segsentry.export.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    Verification,
    save_bundle,
    tap_to_onnx,
    verify_against_torch,
)
from segsentry.export.wrapper import EnsembleTap, FeatureTap, build_feature_tap
from segsentry.manifest import FeatureSpec, FoldSource, Manifest, Preprocessing, Tiling
from segsentry.runtime.io import sha256_file


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: Manifest
    verification: Verification | None


def export_module(
    network: nn.Module | Sequence[nn.Module],
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
    folds: Sequence[FoldSource] = (),
    regions: Sequence[Sequence[int]] | None = None,
    regions_class_order: Sequence[int] | None = None,
) -> ExportResult:
    """Export any 3D segmentation network to a two-output ONNX bundle (``logits``, ``features``).

    ``network`` maps ``(batch, in_channels, z, y, x)`` to logits ``(batch, classes, z, y, x)``; ``layer`` is the
    dotted module path whose output becomes the features; ``patch_size`` and ``preprocessing`` are in the
    network's axis order (nnU-Net's transposed order). ``mirror_axes`` (network axes) are the flips ``ood-run``
    averages the logits over (``None``: not recorded, no mirroring).

    Several networks of one architecture (``folds`` names them) make one ensemble bundle: each network's graph
    behind the one input, outputs with a fold axis (see :class:`segsentry.manifest.Manifest`).
    """
    patch = [int(p) for p in patch_size]
    networks = [network] if isinstance(network, nn.Module) else list(network)
    if folds and len(folds) != len(networks):
        raise ValueError(f"{len(folds)} fold sources for {len(networks)} networks")
    taps: list[FeatureTap] = []
    for net in networks:
        tap, shape, kernels, dim = build_feature_tap(net, layer=layer, in_channels=in_channels, patch_size=patch)
        if taps and shape != layer_shape:
            raise ExportError(f"the ensemble's networks differ at layer '{layer}' ({layer_shape} vs {shape}); "
                              "every fold must have the same architecture")
        taps.append(tap)
        layer_shape = shape
    tap = taps[0] if len(taps) == 1 else EnsembleTap(taps).eval()
    model = tap_to_onnx(tap, in_channels=in_channels, patch_size=patch)
    verification = verify_against_torch(model, tap, in_channels=in_channels, patch_size=patch) if verify else None
    manifest = Manifest(
        source=dict(source or {"kind": "torch", "class": type(networks[0]).__qualname__}),
        labels={str(k): int(v) for k, v in labels.items()},
        channels={str(k): str(v) for k, v in (channels or {str(i): f"channel{i}" for i in range(in_channels)}).items()},
        file_ending=file_ending,
        num_classes=len(labels) if regions is None else len(regions),
        patch_size=patch,
        preprocessing=preprocessing,
        tiling=Tiling(mirror_axes=None if mirror_axes is None else [int(a) for a in mirror_axes]),
        features=FeatureSpec(layer=tap.layer, layer_shape=layer_shape, pooling=kernels, dim=dim),
        inputs={"image": INPUT_NAME},
        outputs=dict(zip(OUTPUT_NAMES, OUTPUT_NAMES)),
        folds=list(folds),
        regions=None if regions is None else [[int(v) for v in r] for r in regions],
        regions_class_order=None if regions_class_order is None else [int(c) for c in regions_class_order],
    )
    path = save_bundle(model, manifest, output)
    return ExportResult(path=path, manifest=manifest, verification=verification)


def export_nnunet(
    model_dir: str | Path,
    output: str | Path,
    *,
    folds: Sequence[int | str] | None = None,
    fold: int | str | None = None,
    checkpoint: str = "checkpoint_final.pth",
    configuration: str | None = None,
    layer: str = DEFAULT_LAYER,
    verify: bool = True,
) -> ExportResult:
    """Export an nnU-Net v2 model folder; the manifest takes preprocessing from the plans.

    ``folds`` (default: every ``fold_N`` holding ``checkpoint``, as ``nnUNetv2_predict``) become one bundle: a
    single fold exports as one network, several as one ensemble bundle. ``fold`` exports that fold alone.
    """
    if fold is not None and folds is not None:
        raise ValueError("give fold or folds, not both")
    models = load_folds(model_dir, [fold] if fold is not None else folds, checkpoint=checkpoint,
                        configuration=configuration)
    model = models[0]
    fold_sources = [FoldSource(fold=m.fold, checkpoint=m.checkpoint_path.name, sha256=sha256_file(m.checkpoint_path))
                    for m in models]
    return export_module(
        [m.network for m in models],
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
            "fold": model.fold if len(models) == 1 else ",".join(m.fold for m in models),
            "checkpoint": model.checkpoint_path.name,
            "configuration": model.configuration_name,
            "trainer": model.trainer_name,
            "plans": str(model.plans.get("plans_name", "")),
            "dataset": str(model.plans.get("dataset_name", "")),
        },
        verify=verify,
        mirror_axes=model.mirror_axes,
        folds=fold_sources,
        regions=model.regions,
        regions_class_order=model.regions_class_order,
    )
