"""Tiling and padding against nnU-Net's own functions; the aggregation definitions on a toy example."""

from __future__ import annotations

import numpy as np
import pytest

from segsentry.runtime.sliding import DistanceAccumulator, compute_steps, pad_to_patch, tile_boxes


@pytest.mark.parametrize(("size", "patch"), [((110, 64, 200), (64, 64, 64)), ((16, 33, 97), (16, 32, 32)),
                                             ((300, 512, 512), (64, 128, 128)), ((17, 17, 17), (16, 16, 16))])
def test_steps_match_nnunet(size, patch):
    sw = pytest.importorskip("nnunetv2.inference.sliding_window_prediction")
    assert compute_steps(size, patch, 0.5) == sw.compute_steps_for_sliding_window(size, patch, 0.5)


def test_boxes_cover_volume_in_nnunet_order():
    boxes = tile_boxes((20, 40, 40), (16, 32, 32), 0.5)
    assert boxes[0] == ((0, 16), (0, 32), (0, 32))
    assert boxes[1] == ((0, 16), (0, 32), (8, 40))  # x varies fastest
    covered = np.zeros((20, 40, 40), bool)
    for box in boxes:
        covered[tuple(slice(a, b) for a, b in box)] = True
    assert covered.all()


@pytest.mark.parametrize("shape", [(1, 10, 40, 30), (2, 16, 32, 32), (1, 5, 7, 9)])
def test_padding_matches_acvl(shape):
    padding = pytest.importorskip("acvl_utils.cropping_and_padding.padding")
    torch = pytest.importorskip("torch")
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours, box = pad_to_patch(data, (16, 32, 32))
    # nnU-Net pads a torch tensor exactly like this in predict_sliding_window_return_logits
    theirs, slicer = padding.pad_nd_image(torch.from_numpy(data), (16, 32, 32), "constant", {"value": 0}, True, None)
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert tuple((s.start, s.stop) for s in slicer[1:]) == box


def test_distance_aggregations():
    gaussian = np.ones((2, 2, 2), np.float16) * 2
    norm = DistanceAccumulator((2, 2, 3), gaussian, aggregation="normalised")
    paper = DistanceAccumulator((2, 2, 3), gaussian, aggregation="paper")
    for acc in (norm, paper):
        acc.add(((0, 2), (0, 2), (0, 2)), 10.0)
        acc.add(((0, 2), (0, 2), (1, 3)), 20.0)
    np.testing.assert_allclose(norm.result()[0, 0], [10, 15, 20])  # weighted mean where patches overlap
    np.testing.assert_allclose(paper.result()[0, 0], [20, 60, 40])  # plain sum of d * G
    with pytest.raises(ValueError):
        DistanceAccumulator((2, 2, 2), gaussian, aggregation="mean")
