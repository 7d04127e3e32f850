"""Input-content guard: a volume unlike every training case in plain, model-free terms is flagged OOD.

The Mahalanobis score measures how far a case's *features* are from the training patches; a blank, constant or
tiny volume can still land near them (a near-constant 40 x 40 x 20 mm volume scored U 0.24 with the demo
bundle and passed). ``ood-calib`` therefore records two plain statistics of the training cases and the runtime
flags a case that falls far below both ranges:

* intensity spread: the standard deviation of each channel's voxel values, below
  ``STD_FRACTION`` x the smallest training case's (a blank or constant scan);
* physical extent: the volume's sides sorted by length (orientation-free), any side below
  ``EXTENT_FRACTION`` x the training cases' smallest (a scan of a small part of the field of view).

The factors are wide on purpose: the guard catches inputs no model should be trusted on, it is not a second
detector. Its reasons go into the report next to the distance verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from segsentry.manifest import InputRange

STD_FRACTION = 0.1
EXTENT_FRACTION = 0.5


@dataclass(frozen=True)
class ContentStats:
    """Per-channel intensity standard deviation and the physical extents in mm, sorted ascending."""

    intensity_std: list[float]
    extent_mm: list[float]


def content_stats(image: np.ndarray, spacing_zyx: Sequence[float]) -> ContentStats:
    """Statistics of a loaded ``(c, z, y, x)`` image (every other voxel per axis: the spread, not a census)."""
    sample = image[:, ::2, ::2, ::2]
    std = [float(np.std(sample[c], dtype=np.float64)) for c in range(image.shape[0])]
    extent = sorted(float(n * s) for n, s in zip(image.shape[1:], spacing_zyx))
    return ContentStats(intensity_std=std, extent_mm=extent)


def input_range(stats: Sequence[ContentStats]) -> InputRange:
    """The training cases' minima, recorded in the manifest by ``ood-calib``."""
    if not stats:
        raise ValueError("input_range needs at least one case")
    channels = len(stats[0].intensity_std)
    return InputRange(
        min_intensity_std=[min(s.intensity_std[c] for s in stats) for c in range(channels)],
        min_extent_mm=[min(s.extent_mm[i] for s in stats) for i in range(3)],
    )


def content_reasons(stats: ContentStats, allowed: InputRange | None) -> list[str]:
    """Why a case's content is outside the training range (empty: nothing to say)."""
    if allowed is None:
        return []
    reasons = []
    for c, (std, low) in enumerate(zip(stats.intensity_std, allowed.min_intensity_std)):
        if std < STD_FRACTION * low:
            reasons.append(f"channel {c} is nearly constant (intensity std {std:.3g}; every training case had "
                           f">= {low:.3g})")
    for side, low in zip(stats.extent_mm, allowed.min_extent_mm):
        if side < EXTENT_FRACTION * low:
            reasons.append(f"the volume is too small ({' x '.join(f'{e:.0f}' for e in stats.extent_mm)} mm; every "
                           f"training case spanned >= {' x '.join(f'{e:.0f}' for e in allowed.min_extent_mm)} mm)")
            break
    return reasons
