"""Resampling written into the output in slabs (no float64 array of the output size), still bit-identical.

Oracle: nnU-Net 2.8.1's ``resample_data_or_seg_to_shape`` (scipy / scikit-image), as in test_resample.py, with
the chunk size forced down so every case runs through many slabs (and uneven last slabs). Memory: tracemalloc
peak of one resampling of a float16 2-channel volume (the logits going back to the input grid) stays below the
output plus five float64 slabs of ``_CHUNK_ELEMENTS`` (the slab and the tap temporaries: a fixed cost); the
whole-channel float64 result it used to hold (8 bytes per output voxel, 33 MB here) does not fit in that.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from segsentry.runtime import resample
from test_resample import CASES, identical_fraction, run_both

SLAB_CASES = [c for c in CASES if c.name in {
    "iso-up", "iso-down", "sepz-axis0", "sepz-axis1", "sepz-axis2", "sepz-inplane-only", "sepz-z-only",
    "order-z-1", "order-z-3", "logits-iso", "logits-sepz", "logits-sepz-axis0", "logits-up-by-2",
    "int16-order3", "signed-zeros-order1", "nearest-sepz", "zero-background-sepz"}]


@pytest.fixture(scope="module")
def nn():
    pytest.importorskip("nnunetv2")
    from nnunetv2.preprocessing.resampling import default_resampling

    return default_resampling


@pytest.mark.parametrize("case", SLAB_CASES, ids=[c.name for c in SLAB_CASES])
def test_slabs_bit_identical(nn, case, monkeypatch):
    monkeypatch.setattr(resample, "_CHUNK_ELEMENTS", 37)  # a few output rows per slab
    _, got, expected = run_both(nn, case)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert identical_fraction(got, expected) == 1.0, case.name


def test_resampling_back_holds_no_float64_volume():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 40, 48, 48)).astype(np.float16)
    target = (160, 160, 160)  # 4.1 M voxels per channel: a float64 channel would be 33 MB
    tracemalloc.start()
    try:
        out = resample.resample_to_shape(logits, target, (1.0, 1.0, 1.0), (0.4, 0.4, 0.4), order=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    float64_channel = 8 * int(np.prod(target))
    slabs = 5 * 8 * resample._CHUNK_ELEMENTS
    assert float64_channel > slabs, "the volume must be large enough to tell the two apart"
    assert out.dtype == np.float16
    assert peak < out.nbytes + slabs, (peak, out.nbytes, float64_channel)
