"""Wrap any 3D segmentation ``torch.nn.Module`` so one forward returns ``(logits, features)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segsentry.errors import ExportError
from segsentry.export.pooling import pooling_plan


def resolve_module(network: nn.Module, path: str) -> tuple[str, nn.Module]:
    """Find the submodule at a dotted ``path`` (``encoder.stages.-1`` allowed: negative list indices).

    Returns the canonical path (negative indices resolved) and the module.
    """
    module: nn.Module = network
    canonical: list[str] = []
    for part in path.split("."):
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and part.lstrip("-").isdigit():
            index = int(part)
            if not -len(module) <= index < len(module):
                raise ExportError(f"layer path '{path}': index {index} out of range for a list of {len(module)}")
            index %= len(module)
            module = module[index]
            canonical.append(str(index))
            continue
        child = getattr(module, part, None) if part else None
        if not isinstance(child, nn.Module):
            names = ", ".join(name for name, _ in module.named_children()) or "none"
            raise ExportError(f"layer path '{path}': '{part}' is not a submodule (children here: {names})")
        module = child
        canonical.append(part)
    return ".".join(canonical), module


class FeatureTap(nn.Module):
    """``forward(x) -> (logits, features)`` with features = pooled, flattened output of one layer.

    ``x`` is ``(batch, channels, z, y, x)``; ``features`` is ``(batch, dim)``. The layer output is captured
    with a forward hook; the pooling kernels are fixed at construction (static graph).
    """

    def __init__(self, network: nn.Module, *, layer: str, pooling: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.network = network
        self.layer, self._layer_module = resolve_module(network, layer)
        self.pooling = [tuple(int(k) for k in kernel) for kernel in pooling]
        self._captured: list[torch.Tensor] = []
        self._layer_module.register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, _inputs: object, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise ExportError(f"layer '{self.layer}' returns {type(output).__name__}, not a tensor")
        self._captured.append(output)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured.clear()
        logits = self.network(x)
        if isinstance(logits, (list, tuple)):  # deep supervision left on: the first output is full resolution
            logits = logits[0]
        if len(self._captured) != 1:
            raise ExportError(f"layer '{self.layer}' ran {len(self._captured)} times in one forward; expected once")
        features = self._captured.pop()
        for kernel in self.pooling:
            features = F.avg_pool3d(features, kernel_size=kernel, stride=kernel)
        return logits, features.flatten(1)


class EnsembleTap(nn.Module):
    """Several :class:`FeatureTap` (one per fold) behind one input: ``forward(x) -> (logits, features)`` with
    ``logits`` ``(batch, folds, classes, z, y, x)`` and ``features`` ``(batch, folds, D)``, folds in order."""

    def __init__(self, taps: Sequence[FeatureTap]) -> None:
        super().__init__()
        if len(taps) < 2:
            raise ExportError("an ensemble needs at least two networks; export one fold with a FeatureTap")
        self.taps = nn.ModuleList(taps)
        self.layer = taps[0].layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [tap(x) for tap in self.taps]
        return torch.stack([o[0] for o in outputs], 1), torch.stack([o[1] for o in outputs], 1)


def probe_layer_shape(network: nn.Module, *, layer: str, in_channels: int, patch_size: Sequence[int]) -> list[int]:
    """Run one zero patch and return the per-sample output shape ``(C, z, y, x)`` of ``layer``."""
    _, module = resolve_module(network, layer)
    shapes: list[list[int]] = []
    handle = module.register_forward_hook(lambda _m, _i, out: shapes.append(list(out.shape[1:])))
    try:
        with torch.no_grad():
            network(torch.zeros((1, in_channels, *patch_size)))
    finally:
        handle.remove()
    if len(shapes) != 1 or len(shapes[0]) != 4:
        raise ExportError(
            f"layer '{layer}' must run once per forward and output a 5D tensor (batch, C, z, y, x); "
            f"saw shapes {shapes}"
        )
    return shapes[0]


def build_feature_tap(
    network: nn.Module, *, layer: str, in_channels: int, patch_size: Sequence[int]
) -> tuple[FeatureTap, list[int], list[list[int]], int]:
    """Probe the layer, compute the pooling plan and wrap. Returns (tap, layer_shape, kernels, dim)."""
    network.eval()
    layer_shape = probe_layer_shape(network, layer=layer, in_channels=in_channels, patch_size=patch_size)
    kernels, dim = pooling_plan(layer_shape)
    tap = FeatureTap(network, layer=layer, pooling=kernels).eval()
    return tap, layer_shape, kernels, dim
