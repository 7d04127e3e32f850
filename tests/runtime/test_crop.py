"""segsentry.runtime.crop against nnU-Net v2.8.1 / acvl_utils / scipy (test oracles only); all exact.

The nnU-Net and acvl_utils oracles come from fixtures (``nn_cropping``, ``acvl_bbox``): without them only the
comparisons against them skip; the scipy hole-filling oracle and the oracle-free tests still run.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from scipy.ndimage import binary_fill_holes

from segsentry.runtime.crop import bbox_from_mask, crop_to_nonzero, fill_holes, insert_crop, nonzero_mask


@pytest.fixture(scope="module")
def nn_cropping() -> ModuleType:
    """nnU-Net's cropping module (``create_nonzero_mask``, ``crop_to_nonzero``); skips without nnunetv2."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.preprocessing.cropping import cropping

    return cropping


@pytest.fixture(scope="module")
def acvl_bbox() -> ModuleType:
    """acvl_utils' bounding-box module (``get_bbox_from_mask``, ``insert_crop_into_image``); skips without it."""
    pytest.importorskip("acvl_utils")
    from acvl_utils.cropping_and_padding import bounding_boxes

    return bounding_boxes


def ball(shape: tuple[int, ...], center: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    return sum((g - c) ** 2 for g, c in zip(grid, center)) <= radius**2


def image_with_structures(seed: int = 0) -> np.ndarray:
    """(2, 20, 24, 22) float32: a hollow shell (3D cavity), a cavity open to the border, 2D-only holes."""
    rng = np.random.default_rng(seed)
    shape = (20, 24, 22)
    ch0 = np.zeros(shape, dtype=np.float32)
    shell = ball(shape, (9.0, 10.0, 10.0), 7.0) & ~ball(shape, (9.0, 10.0, 10.0), 4.0)
    ch0[shell] = rng.uniform(1.0, 2.0, size=int(shell.sum()))
    # a cavity that touches the border: a slab with a tunnel open at the last face of axis 2
    slab = np.zeros(shape, dtype=bool)
    slab[14:19, 2:8, 12:] = True
    slab[16, 4:6, 15:] = False
    ch0[slab] = -3.0
    ch1 = np.zeros(shape, dtype=np.float32)
    # a ring in one slice: a hole in 2D, but not enclosed in 3D (open above and below)
    ring = np.zeros(shape, dtype=bool)
    ring[3, 15:22, 14:21] = True
    ring[3, 17:20, 16:19] = False
    ch1[ring] = 5.0
    ch1[1, 1, 1] = 1e-30  # tiny but nonzero
    return np.stack([ch0, ch1])


def random_masks(seed: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        ndim = int(rng.integers(1, 4))
        shape = tuple(int(v) for v in rng.integers(1, 13, ndim))
        masks.append(rng.random(shape) < rng.uniform(0.1, 0.9))
    return masks


def test_fill_holes_matches_scipy_on_structures() -> None:
    data = image_with_structures()
    mask = (data != 0).any(axis=0)
    filled = fill_holes(mask)
    np.testing.assert_array_equal(filled, binary_fill_holes(mask))
    assert filled[9, 10, 10]  # the 3D cavity is filled
    assert not filled[16, 4, 20]  # the tunnel open to the border is not
    assert not filled[3, 18, 17]  # a 2D-only hole is not a 3D hole


@pytest.mark.parametrize("seed", range(5))
def test_fill_holes_matches_scipy_random(seed: int) -> None:
    for mask in random_masks(seed, 200):
        np.testing.assert_array_equal(fill_holes(mask), binary_fill_holes(mask), err_msg=str(mask.shape))


def test_fill_holes_edge_cases() -> None:
    for mask in (np.zeros((4, 5, 6), bool), np.ones((4, 5, 6), bool), np.ones((1, 5, 6), bool),
                 np.zeros((1, 1, 1), bool), np.ones((1, 1, 1), bool), np.zeros((0, 3, 3), bool)):
        np.testing.assert_array_equal(fill_holes(mask), binary_fill_holes(mask))
    with pytest.raises(ValueError):
        fill_holes(np.zeros((2, 2, 2, 2), bool))


@pytest.mark.parametrize("seed", range(4))
def test_nonzero_mask_matches_nnunet(nn_cropping: ModuleType, seed: int) -> None:
    data = image_with_structures(seed)
    np.testing.assert_array_equal(nonzero_mask(data), nn_cropping.create_nonzero_mask(data))
    data2d = data[:, 9]  # (c, x, y)
    np.testing.assert_array_equal(nonzero_mask(data2d), nn_cropping.create_nonzero_mask(data2d))


def check_crop_matches_nnunet(nn_cropping: ModuleType, data: np.ndarray) -> None:
    expected_data, expected_seg, expected_bbox = nn_cropping.crop_to_nonzero(data.copy())
    cropped, mask, bbox = crop_to_nonzero(data)
    assert bbox == [[int(a), int(b)] for a, b in expected_bbox]
    assert all(type(v) is int for pair in bbox for v in pair)
    np.testing.assert_array_equal(cropped, expected_data)
    assert cropped.dtype == data.dtype
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected_seg[0] == 0)


def test_crop_matches_nnunet_on_structures(nn_cropping: ModuleType) -> None:
    check_crop_matches_nnunet(nn_cropping, image_with_structures())


@pytest.mark.parametrize("seed", range(20))
def test_crop_matches_nnunet_random(nn_cropping: ModuleType, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    shape = (int(rng.integers(1, 3)), *(int(v) for v in rng.integers(1, 16, 3)))
    data = np.zeros(shape, dtype=np.float32)
    # a few random blobs with random holes, anywhere (also touching the border)
    for _ in range(int(rng.integers(1, 4))):
        lo = [int(rng.integers(0, s)) for s in shape[1:]]
        hi = [int(rng.integers(a + 1, s + 1)) for a, s in zip(lo, shape[1:])]
        c = int(rng.integers(0, shape[0]))
        box = (c, *(slice(a, b) for a, b in zip(lo, hi)))
        data[box] = rng.normal(size=data[box].shape)
        data[box][rng.random(data[box].shape) < 0.3] = 0.0
    check_crop_matches_nnunet(nn_cropping, data)


def test_crop_all_zero_image_matches_nnunet(nn_cropping: ModuleType) -> None:
    check_crop_matches_nnunet(nn_cropping, np.zeros((2, 5, 6, 7), dtype=np.float32))


def test_crop_all_zero_image_gives_full_box() -> None:
    data = np.zeros((2, 5, 6, 7), dtype=np.float32)
    cropped, mask, bbox = crop_to_nonzero(data)
    assert bbox == [[0, 5], [0, 6], [0, 7]]
    assert cropped.shape == data.shape and not mask.any()


def test_crop_returns_a_view_like_nnunet() -> None:
    data = image_with_structures()
    cropped, _, _ = crop_to_nonzero(data)
    assert np.shares_memory(cropped, data)


@pytest.mark.parametrize("seed", range(3))
def test_bbox_from_mask_matches_acvl(acvl_bbox: ModuleType, seed: int) -> None:
    for mask in random_masks(seed, 60):
        if mask.ndim != 3:
            continue
        sparse = mask & (np.random.default_rng(seed).random(mask.shape) < 0.05)
        for m in (mask, sparse, np.zeros_like(mask)):
            assert bbox_from_mask(m) == [[int(a), int(b)] for a, b in acvl_bbox.get_bbox_from_mask(m)]


def test_bbox_from_mask_any_dimension() -> None:
    mask = np.zeros((6, 7), bool)
    mask[2:4, 5] = True
    assert bbox_from_mask(mask) == [[2, 4], [5, 6]]
    assert bbox_from_mask(np.zeros((3, 4), bool)) == [[0, 3], [0, 4]]


@pytest.mark.parametrize(
    "bbox",
    [
        [[2, 6], [1, 4], [0, 5]],
        [[-2, 3], [4, 9], [1, 3]],  # partly outside
        [[7, 11], [0, 3], [0, 3]],  # completely outside: unchanged
        [[0, 8], [0, 7], [0, 6]],
    ],
)
def test_insert_crop_matches_acvl(acvl_bbox: ModuleType, bbox: list[list[int]]) -> None:
    rng = np.random.default_rng(0)
    crop = rng.normal(size=(2, *(b - a for a, b in bbox))).astype(np.float32)
    target = np.zeros((2, 8, 7, 6), dtype=np.float32)
    expected = acvl_bbox.insert_crop_into_image(target.copy(), crop, bbox)
    got = insert_crop(target, crop, bbox)
    assert got is target
    np.testing.assert_array_equal(got, expected)
    # bbox over all axes of a spatial-only target
    target3 = np.full((8, 7, 6), -1.0, dtype=np.float32)
    expected3 = acvl_bbox.insert_crop_into_image(target3.copy(), crop[0], bbox)
    np.testing.assert_array_equal(insert_crop(target3, crop[0], bbox), expected3)


def test_insert_crop_rejects_mismatched_leading_axes() -> None:
    with pytest.raises(ValueError):
        insert_crop(np.zeros((2, 4, 4)), np.zeros((3, 2, 2)), [[0, 2], [0, 2]])


def test_round_trip_crop_and_insert() -> None:
    data = image_with_structures()
    cropped, _, bbox = crop_to_nonzero(data)
    restored = insert_crop(np.zeros_like(data), cropped, bbox)
    np.testing.assert_array_equal(restored, data)
