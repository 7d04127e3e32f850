"""DICOM Segmentation (highdicom) of an ``ood-run`` mask, on the source series' grid.

One segment per foreground label of the bundle (numbered 1..n in label-value order, as DICOM wants them
contiguous), coded category and type from a small table of known label names (lesions, lungs), else a private
code ``99SEGSENTRY``. The SEG is a new
series in the source's study and frame of reference; it references every source SOP instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segsentry import __version__
from segsentry._atomic import atomic_path
from segsentry.dicom import require
from segsentry.dicom.uids import derived_uid
from segsentry.errors import InputError

PRIVATE_SCHEME = "99SEGSENTRY"
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902


@dataclass(frozen=True)
class Producer:
    """Who made a result: written as the SEG/SR equipment and the algorithm identification."""

    bundle_name: str
    bundle_sha256: str  # of the bundle file
    weights_sha256: str  # the manifest's graph hash
    version: str = __version__


def _segment_codes(name: str):
    """(category, type) codes for a label name."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    lowered = name.lower()
    if any(word in lowered for word in ("lesion", "tumor", "tumour", "ggo", "consolidation", "nodule", "opacity")):
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion
    if "lung" in lowered:
        return codes.SCT.AnatomicalStructure, codes.SCT.Lung
    return codes.SCT.AnatomicalStructure, Code(f"label-{name}"[:16], PRIVATE_SCHEME, name)


def segment_labels(labels: dict[str, int]) -> list[tuple[int, str]]:
    """The foreground labels ``(value, name)`` of a manifest's ``labels`` (name -> value), by value."""
    return sorted((int(v), k) for k, v in labels.items() if int(v) != 0)


def build_seg(mask_zyx: np.ndarray, datasets: Sequence, *, labels: dict[str, int], producer: Producer):
    """A highdicom ``Segmentation`` of ``mask_zyx`` (integer labels, slice ``k`` on ``datasets[k]``)."""
    hd = require("highdicom", "Writing DICOM SEG")
    from pydicom.sr.codedict import codes

    if mask_zyx.ndim != 3 or mask_zyx.shape[0] != len(datasets):
        raise InputError(f"the mask has shape {mask_zyx.shape} but the series has {len(datasets)} slices")
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    if mask_zyx.shape[1:] != (rows, cols):
        raise InputError(f"the mask's slices are {mask_zyx.shape[1:]} but the series' are {(rows, cols)}")
    foreground = segment_labels(labels)
    if not foreground:
        raise InputError("the bundle has no foreground label to write as a DICOM segment")
    present = {int(v) for v in np.unique(mask_zyx)} - {0}
    unknown = present - {v for v, _ in foreground}
    if unknown:
        raise InputError(f"the mask holds label values {sorted(unknown)} the bundle does not name")
    algorithm = hd.AlgorithmIdentificationSequence(name="segsentry", version=producer.version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    # segment numbers 1..n contiguous, as highdicom needs; a bundle that skips label values is renumbered
    numbers = {value: i + 1 for i, (value, _) in enumerate(foreground)}
    descriptions = []
    for value, name in foreground:
        category, kind = _segment_codes(name)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=numbers[value], segment_label=name[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    pixels = np.zeros(mask_zyx.shape, dtype=np.uint8 if len(numbers) < 256 else np.uint16)
    for value, number in numbers.items():
        pixels[mask_zyx == value] = number
    series = datasets[0].SeriesInstanceUID
    return hd.seg.Segmentation(
        source_images=list(datasets), pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=derived_uid(series, producer.weights_sha256, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=derived_uid(series, producer.weights_sha256, "seg"), instance_number=1,
        manufacturer="segsentry", manufacturer_model_name=producer.bundle_name[:64],
        software_versions=f"segsentry {producer.version}", device_serial_number=producer.weights_sha256[:16],
        series_description="segsentry segmentation", content_label="SEGSENTRY",
        content_description=f"segsentry {producer.bundle_name}"[:64],
        omit_empty_frames=False,  # every source slice has its frame: a reader rebuilds the grid without gaps
    )


def write_dataset(dataset, target: Path) -> Path:
    """Save a pydicom dataset (with file meta) atomically."""
    with atomic_path(target) as tmp:
        dataset.save_as(str(tmp), enforce_file_format=True)
    return target
