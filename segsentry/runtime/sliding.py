"""The one sliding-window core: tiling, batched inference, Gaussian-weighted accumulation.

Calibration, ``ood-run``, evaluation and benchmarks all drive :func:`iterate_patches` and the accumulators
below, so segmentation and OOD maps can never drift apart. Everything is numpy order in the network's
(transposed) axis order: volumes are ``(c, Z, Y, X)``, boxes are per-axis ``[start, stop)`` tuples.

Numerics follow nnU-Net v2.8.1 ``_internal_predict_sliding_window_return_logits``: the importance map is
float16, logits are accumulated in float16 (``prediction * gaussian`` in float32, added into a float16 sum)
and divided by the float16 sum of weights. The distance map is accumulated in float32: squared Mahalanobis
distances times a peak weight of 10 overflow float16.

Test-time mirroring follows ``_internal_maybe_mirror_and_predict``: per patch ``p = net(x)``, then for every
non-empty combination of the allowed axes (by size, then order) ``p += flip(net(flip(x, axes)), axes)``, and
``p /= n_combinations + 1``, all in float32. Each flip of a batch is its own engine call, as in nnU-Net: a call
holds ``batch_size`` patches whether or not the case is mirrored, so mirroring costs no engine memory (all eight
flips of a tile in one call took 813 instead of 319 MB peak on a mirrored 2-fold case,
``e2e_cpu_small_f2_tta_24x96x96.md``). Only the logits
are averaged; every other output (distance, features) is the un-mirrored pass's, because the Gaussian was fit on
un-mirrored patches. So the flips go through ``backend.run_network``: an engine that holds the fused head apart
(onnxruntime, OpenVINO) skips it there, the others run their whole graph.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from segsentry.contract import Aggregation
from segsentry.runtime.backends.base import Backend
from segsentry.runtime.importance import gaussian_importance_map

AGGREGATIONS = tuple(a.value for a in Aggregation)

Box = tuple[tuple[int, int], ...]


def compute_steps(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> list[list[int]]:
    """nnU-Net's tile starts per axis: ``ceil((size - patch) / (patch * step)) + 1`` evenly rounded starts."""
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    steps = []
    for size, patch in zip(image_size, patch_size):
        if size < patch:
            raise ValueError(f"image size {tuple(image_size)} smaller than patch {tuple(patch_size)}; pad first")
        n = int(np.ceil((size - patch) / (patch * step_size))) + 1
        actual = (size - patch) / (n - 1) if n > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


def pad_to_patch(data: np.ndarray, patch_size: Sequence[int]) -> tuple[np.ndarray, Box]:
    """Zero-pad ``(c, Z, Y, X)`` to at least the patch size, centred like acvl_utils ``pad_nd_image``.

    Returns the padded array and the box of the original volume inside it.
    """
    shape = data.shape[1:]
    new = [max(p, s) for p, s in zip(patch_size, shape)]
    below = [(n - s) // 2 for n, s in zip(new, shape)]
    above = [(n - s) // 2 + (n - s) % 2 for n, s in zip(new, shape)]
    box = tuple((b, b + s) for b, s in zip(below, shape))
    if not any(below) and not any(above):
        return data, box
    return np.pad(data, [(0, 0), *zip(below, above)], mode="constant", constant_values=0), box


def tile_boxes(image_size: Sequence[int], patch_size: Sequence[int], step_size: float) -> list[Box]:
    """All patch boxes over an image of ``image_size`` (>= patch), in nnU-Net's order (z, then y, then x)."""
    steps = compute_steps(image_size, patch_size, step_size)
    return [
        ((sz, sz + patch_size[0]), (sy, sy + patch_size[1]), (sx, sx + patch_size[2]))
        for sz in steps[0] for sy in steps[1] for sx in steps[2]
    ]


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


@dataclass
class PatchBatch:
    boxes: list[Box]
    outputs: dict[str, np.ndarray]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """nnU-Net's flips for the allowed spatial ``axes`` (0 = z of the network order): every non-empty combination,
    smallest first, in ``itertools.combinations`` order -- 7 for ``(0, 1, 2)``."""
    axes = [int(a) for a in axes]
    if any(not 0 <= a < 3 for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"mirror axes must be distinct spatial axes in 0..2, got {axes}")
    return [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]


def _spatial(axes: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial axes counted from the end, so they fit ``(n, c, z, y, x)`` and ``(n, folds, c, z, y, x)`` alike."""
    return tuple(a - 3 for a in axes)


def iterate_patches(
    data: np.ndarray, backend: Backend, boxes: Sequence[Box], *, batch_size: int = 1,
    mirror_axes: Sequence[int] | None = None, mirrored: Sequence[str] = (),
) -> Iterator[PatchBatch]:
    """Run the backend over ``boxes`` of ``data`` (``(c, Z, Y, X)``, already padded), ``batch_size`` at a time.

    With ``mirror_axes``, the batch and each of its flips (see the module docstring) go to the engine one after
    another, ``batch_size`` patches per call; the outputs named in ``mirrored`` (the logits) are the float32
    mirror average, every other output is the un-mirrored pass's.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    combos = mirror_combinations(mirror_axes) if mirror_axes else []
    for start in range(0, len(boxes), batch_size):
        chunk = list(boxes[start:start + batch_size])
        batch = np.stack([data[(slice(None), *_slices(b))] for b in chunk])
        outputs = backend.run(batch)
        if combos:
            sums = {name: np.array(outputs[name], dtype=np.float32) for name in mirrored}
            for axes in combos:
                flipped = backend.run_network(np.ascontiguousarray(np.flip(batch, _spatial(axes))))
                for name in mirrored:
                    sums[name] += np.flip(flipped[name], _spatial(axes))
            for name in mirrored:
                sums[name] /= np.float32(len(combos) + 1)
            outputs = {**outputs, **sums}
        yield PatchBatch(boxes=chunk, outputs=outputs)


class LogitAccumulator:
    """nnU-Net's float16 Gaussian-weighted logit accumulation over a padded volume ``(k, Z, Y, X)``."""

    def __init__(self, num_classes: int, shape: Sequence[int], gaussian: np.ndarray) -> None:
        self.gaussian = gaussian  # float16 (pz, py, px)
        self._gaussian32 = gaussian.astype(np.float32)
        self.logits = np.zeros((num_classes, *shape), dtype=np.float16)
        self.weights = np.zeros(tuple(shape), dtype=np.float16)

    def add(self, box: Box, logits: np.ndarray) -> None:
        sl = _slices(box)
        weighted = logits.astype(np.float32, copy=False) * self._gaussian32
        self.logits[(slice(None), *sl)] += weighted
        self.weights[sl] += self.gaussian

    def result(self) -> np.ndarray:
        """Weighted mean logits, float16, like nnU-Net (raises if it overflowed to inf)."""
        out = np.divide(self.logits, self.weights, out=self.logits)
        if np.isinf(out).any():
            raise FloatingPointError("logit accumulation overflowed float16; logits are implausibly large")
        return out


def average_folds(fold_logits: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's logits as ``predict_logits_from_preprocessed_data``: each fold's float16 sliding-window
    logits summed in fold order into the first, divided by the number of folds, in float16 throughout.
    Overwrites and returns the first array."""
    prediction = fold_logits[0]
    for other in fold_logits[1:]:
        prediction += other
    if len(fold_logits) > 1:
        prediction /= np.float16(len(fold_logits))
    return prediction


class DistanceAccumulator:
    """Spread each patch's distance over its patch with the Gaussian weights (float32).

    ``aggregation='normalised'`` divides by the summed weights (as the logits are); ``'paper'`` keeps the
    plain sum of ``d * G`` as the authors' code does.
    """

    def __init__(self, shape: Sequence[int], gaussian: np.ndarray, *, aggregation: str) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        self.aggregation = aggregation
        self._gaussian32 = gaussian.astype(np.float32)
        self.total = np.zeros(tuple(shape), dtype=np.float32)
        self.weights = np.zeros(tuple(shape), dtype=np.float32) if aggregation == Aggregation.NORMALISED else None

    def add(self, box: Box, distance: float) -> None:
        sl = _slices(box)
        self.total[sl] += np.float32(distance) * self._gaussian32
        if self.weights is not None:
            self.weights[sl] += self._gaussian32

    def result(self) -> np.ndarray:
        if self.weights is None:
            return self.total
        return np.divide(self.total, self.weights, out=self.total)


def distance_map(
    shape: Sequence[int], boxes: Sequence[Box], distances: Sequence[float], gaussian: np.ndarray, *, aggregation: str
) -> np.ndarray:
    """Voxel map from per-patch distances (used by calibration, which has distances but no network run)."""
    acc = DistanceAccumulator(shape, gaussian, aggregation=aggregation)
    for box, d in zip(boxes, distances):
        acc.add(box, float(d))
    return acc.result()


def crop_box(array: np.ndarray, box: Box) -> np.ndarray:
    """Cut the unpadded volume back out of a padded ``(..., Z, Y, X)`` array."""
    lead = (slice(None),) * (array.ndim - len(box))
    return array[(*lead, *_slices(box))]


def importance_for(patch_size: Sequence[int], *, sigma_scale: float, value_scaling_factor: float) -> np.ndarray:
    return gaussian_importance_map(tuple(int(p) for p in patch_size), sigma_scale=sigma_scale,
                                   value_scaling_factor=value_scaling_factor)

