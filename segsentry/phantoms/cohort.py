"""Write phantom cohorts as nnU-Net v2 raw datasets (``imagesTr``/``labelsTr``/``dataset.json``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry._atomic import atomic_path, write_text_atomic
from segsentry.phantoms.chest import COHORTS, DEFAULT_INPLANE, make_chest_ct

logger = logging.getLogger(__name__)

__all__ = ["FILE_ENDINGS", "case_seed", "write_cohort"]

FILE_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".mha")


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a cohort written with ``seed`` (the cohort itself is mixed in by
    :func:`~segsentry.phantoms.chest.make_chest_ct`)."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}.")
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), 0xC0407]).generate_state(1)[0])


def write_cohort(out_dir: str | Path, *, cohort: str, n: int, seed: int = 0, prefix: str = "PH",
                 file_ending: str = ".nii.gz", shape: Sequence[int] | None = None,
                 inplane: int = DEFAULT_INPLANE) -> list[str]:
    """Generate ``n`` phantoms of ``cohort`` and write them in nnU-Net's raw layout under ``out_dir``.

    Files: ``imagesTr/{prefix}_{i:03d}_0000{file_ending}``, ``labelsTr/{prefix}_{i:03d}{file_ending}``,
    ``dataset.json`` (``channel_names {"0": "CT"}``, ``labels {"background": 0, "lesion": 1}``,
    ``numTraining``, ``file_ending``) and ``phantoms.json`` (each case's seed and ``meta``). Every file is
    written to a temporary name in its folder and renamed into place. Case ``i`` depends only on
    ``(cohort, seed, i)`` (and ``shape``/``inplane``), so cohorts can be regenerated or extended.

    Args:
        out_dir: dataset folder (created if needed), e.g. ``nnUNet_raw/Dataset900_Phantom``.
        cohort: one of :data:`~segsentry.phantoms.chest.COHORTS`.
        n: number of cases (>= 1).
        seed: cohort seed.
        prefix: case identifier prefix.
        file_ending: ``.nii.gz`` (default), ``.nii``, ``.nrrd`` or ``.mha``.
        shape: optional ``(z, y, x)`` shape forwarded to :func:`make_chest_ct`.
        inplane: in-plane size forwarded to :func:`make_chest_ct` when ``shape`` is ``None``.

    Returns:
        The case identifiers ``["{prefix}_000", ...]``.

    Raises:
        ValueError: on an unknown cohort or file ending, ``n < 1`` or a prefix that is not a plain name.
    """
    if cohort not in COHORTS:
        raise ValueError(f"Unknown phantom cohort {cohort!r}; expected one of {', '.join(COHORTS)}.")
    if file_ending not in FILE_ENDINGS:
        raise ValueError(f"file_ending must be one of {', '.join(FILE_ENDINGS)}, got {file_ending!r}.")
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if not prefix or any(ch in prefix for ch in "/\\. ") or prefix.startswith("-"):
        raise ValueError(f"prefix must be a plain file-name stem without '/', '\\\\', '.' or spaces, got {prefix!r}.")
    out = Path(out_dir)
    images = out / "imagesTr"
    labels = out / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    cases: list[str] = []
    metas: dict[str, dict[str, object]] = {}
    t0 = time.perf_counter()
    for i in range(int(n)):
        case = f"{prefix}_{i:03d}"
        s = case_seed(seed, i)
        phantom = make_chest_ct(seed=s, cohort=cohort, shape=shape, inplane=inplane)
        image, label = phantom.to_sitk()
        with atomic_path(images / f"{case}_0000{file_ending}") as tmp:
            sitk.WriteImage(image, str(tmp))
        with atomic_path(labels / f"{case}{file_ending}") as tmp:
            sitk.WriteImage(label, str(tmp))
        cases.append(case)
        metas[case] = {"case_seed": s, **phantom.meta}
        logger.info("wrote phantom %s (%s, shape %s)", case, cohort, phantom.shape)
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": int(n),
        "file_ending": file_ending,
        "name": f"segsentry phantom cohort '{cohort}'",
        "description": f"Procedural chest-CT phantoms (segsentry.phantoms), cohort={cohort}, seed={seed}.",
    }
    write_text_atomic(out / "dataset.json", json.dumps(dataset, indent=2) + "\n")
    write_text_atomic(out / "phantoms.json",
                      json.dumps({"cohort": cohort, "seed": int(seed), "cases": metas}, indent=1) + "\n")
    logger.info("wrote %d %s phantoms to %s in %.1fs", n, cohort, out, time.perf_counter() - t0)
    return cases
