"""The static projection of a feature map to a vector (design.md, method step 2).

``avg_pool3d(kernel=2, stride=2)`` is applied repeatedly while the per-sample element count is at least
``max_elements`` (1e4, counted with batch 1 as the authors do); an axis of size 1 gets kernel 1. The plan
only depends on the layer's output shape, which is fixed for a fixed patch size, so it lives in the graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_ELEMENTS = 10_000


def pooling_plan(layer_shape: Sequence[int], *, max_elements: int = MAX_ELEMENTS) -> tuple[list[list[int]], int]:
    """Return (kernels, dim) for a per-sample feature shape ``(C, z, y, x)``.

    ``kernels`` is one ``[kz, ky, kx]`` per pooling step (stride = kernel); ``dim`` is the flattened size.
    Pooling stops early when every spatial axis has size 1 (nothing left to pool).
    """
    if len(layer_shape) != 4:
        raise ValueError(f"expected a per-sample 3D feature shape (C, z, y, x), got {tuple(layer_shape)}")
    channels, *spatial = (int(s) for s in layer_shape)
    kernels: list[list[int]] = []
    while channels * math.prod(spatial) >= max_elements:
        kernel = [2 if size > 1 else 1 for size in spatial]
        if all(k == 1 for k in kernel):
            break
        kernels.append(kernel)
        spatial = [size // k for size, k in zip(spatial, kernel)]
    return kernels, channels * math.prod(spatial)
