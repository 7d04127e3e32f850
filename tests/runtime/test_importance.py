"""segsentry.runtime.importance against nnU-Net v2.8.1's compute_gaussian (torch/scipy are oracles only)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2")
from nnunetv2.inference.sliding_window_prediction import compute_gaussian  # noqa: E402

from segsentry.runtime.importance import gaussian_importance_map  # noqa: E402

PATCH_SIZES = [(16, 32, 32), (20, 48, 40), (64, 128, 128), (7, 9, 11), (128, 128), (1, 5, 3), (2, 2, 2),
               (96, 160, 160)]


def reference(
    patch_size: tuple[int, ...], sigma_scale: float = 1.0 / 8, value_scaling_factor: float = 10
) -> np.ndarray:
    return compute_gaussian(tuple(patch_size), sigma_scale=sigma_scale, value_scaling_factor=value_scaling_factor,
                            dtype=torch.float16, device=torch.device("cpu")).numpy()


@pytest.mark.parametrize("patch_size", PATCH_SIZES, ids=["x".join(map(str, p)) for p in PATCH_SIZES])
def test_bit_identical_to_nnunet(patch_size: tuple[int, ...]) -> None:
    expected = reference(patch_size)
    got = gaussian_importance_map(patch_size)
    assert got.dtype == np.float16 and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize(("sigma_scale", "value_scaling_factor"), [(0.25, 1.0), (1.0 / 16, 10.0), (0.5, 100.0)])
def test_other_parameters_bit_identical(sigma_scale: float, value_scaling_factor: float) -> None:
    for patch_size in [(20, 48, 40), (7, 9, 11)]:
        expected = reference(patch_size, sigma_scale, value_scaling_factor)
        got = gaussian_importance_map(patch_size, sigma_scale=sigma_scale, value_scaling_factor=value_scaling_factor)
        np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


def test_zeros_are_replaced_by_smallest_value() -> None:
    got = gaussian_importance_map((64, 128, 128))
    assert got.min() > 0
    assert got.max() == np.float16(10.0)
    # the corners underflow float16 and take the smallest nonzero value, as in nnU-Net
    assert got[0, 0, 0] == got.min()


def test_list_patch_size_and_invalid_sizes() -> None:
    np.testing.assert_array_equal(gaussian_importance_map([16, 32, 32]), gaussian_importance_map((16, 32, 32)))
    with pytest.raises(ValueError):
        gaussian_importance_map((0, 4, 4))
    with pytest.raises(ValueError):
        gaussian_importance_map(())
