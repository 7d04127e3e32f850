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


class _TorchNet:
    """A backend over a small random torch conv net: ``logits``, and as ``distance`` the patch's first voxel
    (which every flip moves)."""

    name = "torch-test"

    def __init__(self, torch, channels: int, classes: int):
        torch.manual_seed(0)
        self.torch = torch
        self.net = torch.nn.Sequential(torch.nn.Conv3d(channels, 4, 3, padding=1), torch.nn.LeakyReLU(),
                                       torch.nn.Conv3d(4, classes, 3, padding=1)).eval()
        self.calls: list[int] = []

    def run(self, batch):
        self.calls.append(("run", batch.shape[0]))
        return {"logits": self._logits(batch), "distance": batch[:, 0, 0, 0, 0].copy()}

    def run_network(self, batch):  # a flip: the logits alone, as an engine that holds its head apart returns
        self.calls.append(("run_network", batch.shape[0]))
        return {"logits": self._logits(batch)}

    def _logits(self, batch):
        with self.torch.no_grad():
            return self.net(self.torch.from_numpy(np.ascontiguousarray(batch))).numpy()


@pytest.mark.parametrize("axes", [(0, 1, 2), (1, 2)])
def test_mirroring_matches_nnunet(axes):
    """The mirror average equals nnU-Net 2.8.1's ``_internal_maybe_mirror_and_predict`` on the same network
    (float32, flips in its order); the batch and each of its flips are one engine call of the batch's size, so
    mirroring never enlarges a call, the flips through ``run_network``; other outputs are the un-mirrored pass's."""
    torch = pytest.importorskip("torch")
    predictor = pytest.importorskip("nnunetv2.inference.predict_from_raw_data").nnUNetPredictor
    from types import SimpleNamespace

    from segsentry.runtime.sliding import iterate_patches, mirror_combinations

    assert mirror_combinations((0, 1, 2)) == [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    data = np.random.default_rng(3).standard_normal((2, 10, 12, 14)).astype(np.float32)
    boxes = tile_boxes(data.shape[1:], (6, 8, 8), 0.5)
    backend = _TorchNet(torch, channels=2, classes=3)
    batches = list(iterate_patches(data, backend, boxes, batch_size=4, mirror_axes=axes, mirrored=["logits"]))
    n_terms = len(mirror_combinations(axes)) + 1
    # the batch through run, then each flip through run_network (no distance is read from a flip)
    assert backend.calls == [(method, len(b.boxes)) for b in batches
                             for method in ["run"] + ["run_network"] * (n_terms - 1)]
    assert len(boxes) % 4 and len(batches[-1].boxes) == len(boxes) % 4  # a short last batch too
    reference = SimpleNamespace(network=backend.net, allowed_mirroring_axes=axes, use_mirroring=True)
    for batch in batches:
        for box, logits, distance in zip(batch.boxes, batch.outputs["logits"], batch.outputs["distance"]):
            patch = torch.from_numpy(np.ascontiguousarray(data[(slice(None), *(slice(a, b) for a, b in box))]))
            with torch.no_grad():
                expected = predictor._internal_maybe_mirror_and_predict(reference, patch[None])[0].numpy()
            assert logits.dtype == np.float32
            np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-6)
            assert distance == patch[0, 0, 0, 0].item()  # the un-mirrored pass's
    unmirrored = next(iterate_patches(data, backend, boxes, batch_size=4)).outputs["logits"]
    assert not np.allclose(unmirrored, batches[0].outputs["logits"], atol=1e-3)  # the flips did change the logits
