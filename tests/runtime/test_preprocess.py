"""to_input_geometry: the paste back into the input grid, with and without a crop.

Oracle: the definition (fill outside the bbox, crop inside, then ``transpose_backward``), written out with
numpy on a tiny array; for an uncropped volume also that no second volume is made (memory is shared).
"""

from __future__ import annotations

import numpy as np

from segsentry.manifest import Preprocessing
from segsentry.runtime.preprocess import Geometry, to_input_geometry


def _spec(backward):
    return Preprocessing(transpose_forward=list(np.argsort(backward)), transpose_backward=list(backward),
                         spacing=[1.0, 1.0, 1.0], normalization_schemes=["NoNormalization"],
                         use_mask_for_norm=[False], intensity_properties={})


def _geometry(before, bbox):
    return Geometry(shape_before_cropping=before, bbox=bbox, shape_after_cropping=tuple(b - a for a, b in bbox),
                    spacing_transposed=(1.0, 1.0, 1.0), target_spacing=(1.0, 1.0, 1.0), shape_preprocessed=before)


def test_cropped_volume_is_pasted_and_filled():
    crop = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    geometry = _geometry((4, 5, 3), ((1, 3), (2, 5), (0, 2)))
    got = to_input_geometry(crop, geometry, _spec([0, 2, 1]), fill=-1)
    expected = np.full((4, 5, 3), -1, np.float32)
    expected[1:3, 2:5, 0:2] = crop
    np.testing.assert_array_equal(got, expected.transpose(0, 2, 1))


def test_uncropped_volume_is_not_copied_twice():
    volume = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
    geometry = _geometry((4, 5, 3), ((0, 4), (0, 5), (0, 3)))
    same = to_input_geometry(volume, geometry, _spec([0, 1, 2]))
    assert np.shares_memory(same, volume) and np.array_equal(same, volume)
    turned = to_input_geometry(volume, geometry, _spec([2, 1, 0]))
    np.testing.assert_array_equal(turned, volume.transpose(2, 1, 0))
    assert turned.flags.c_contiguous
