"""segsentry.runtime.resample against nnU-Net v2.8.1's resampling (scipy/scikit-image are test oracles only).

The oracle comes from the ``nn`` fixture: without nnunetv2 only the comparisons skip; the argument checks, the
no-copy / no-mutation tests and the import-hygiene test still run.

Tolerances. The implementation redoes scipy's spline arithmetic operation by operation, so every output is
expected to be bit-identical, and ``test_bit_identical`` requires exactly that (float64 outputs included).
The acceptance criteria the runtime is held to are looser and checked separately in ``test_matches_nnunet``:
float32 outputs within ``1e-6 * max(1, |values|)`` of nnU-Net with at least 99.9% of voxels bit-identical,
float16 (and integer) outputs identical. If a future scipy changes its summation order, the strict test
fails while the acceptance test keeps holding.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from types import ModuleType

import numpy as np
import pytest

from segsentry.runtime.resample import compute_new_shape, determine_separate_z, resample_to_shape

FLOAT32_ATOL = 1e-6  # times max(1, max |value|)
FLOAT32_MIN_IDENTICAL = 0.999
UINT_VIEW = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]  # (c, a0, a1, a2)
    current_spacing: tuple[float, float, float]
    new_spacing: tuple[float, float, float]
    order: int
    dtype: type
    order_z: int = 0
    force_separate_z: bool | None = None
    new_shape: tuple[int, int, int] | None = None  # default: compute_new_shape
    data: str = "normal"  # normal | zero-background | integers | signed-zeros


CASES = [
    Case("iso-up", (1, 7, 13, 11), (1.0, 1.0, 1.0), (0.6, 0.7, 0.8), 3, np.float32),
    Case("iso-down", (1, 7, 13, 11), (1.0, 1.0, 1.0), (1.6, 1.5, 2.0), 3, np.float32),
    Case("mixed-2ch", (2, 7, 13, 11), (1.0, 1.0, 1.0), (1.5, 0.7, 1.2), 3, np.float32),
    Case("sepz-axis0", (1, 7, 13, 11), (5.0, 0.8, 0.8), (3.0, 1.0, 1.0), 3, np.float32),
    Case("sepz-axis0-2ch", (2, 6, 17, 15), (5.0, 0.8, 0.8), (2.0, 0.6, 0.9), 3, np.float32),
    Case("sepz-axis1", (1, 12, 5, 14), (0.7, 4.0, 0.7), (1.0, 1.0, 1.0), 3, np.float32),
    Case("sepz-axis2", (1, 12, 14, 5), (0.7, 0.7, 4.0), (1.0, 1.0, 1.5), 3, np.float32),
    Case("sepz-inplane-only", (1, 8, 12, 12), (5.0, 0.8, 0.8), (5.0, 1.0, 1.0), 3, np.float32),
    Case("sepz-z-only", (1, 8, 12, 12), (5.0, 1.0, 1.0), (2.0, 1.0, 1.0), 3, np.float32),
    Case("target-anisotropic", (1, 12, 9, 10), (1.0, 1.0, 1.0), (4.0, 1.0, 1.0), 3, np.float32),
    Case("two-lowres-axes", (1, 10, 10, 9), (3.5, 3.5, 0.5), (1.0, 1.0, 1.0), 3, np.float32),
    Case("forced-sepz", (1, 10, 16, 16), (2.0, 1.0, 1.0), (1.0, 2.0, 2.0), 3, np.float32, force_separate_z=True),
    Case("forced-no-sepz", (1, 7, 13, 11), (5.0, 0.8, 0.8), (3.0, 1.0, 1.0), 3, np.float32, force_separate_z=False),
    Case("order-z-1", (1, 10, 16, 16), (4.0, 1.0, 1.0), (1.0, 1.3, 0.9), 3, np.float32, order_z=1),
    Case("order-z-3", (1, 10, 16, 16), (4.0, 1.0, 1.0), (1.0, 1.3, 0.9), 3, np.float32, order_z=3),
    Case("single-slice", (1, 1, 13, 11), (1.0, 1.0, 1.0), (1.0, 0.5, 0.7), 3, np.float32),
    Case("zero-background", (1, 9, 14, 12), (1.0, 1.0, 1.0), (0.7, 0.8, 0.9), 3, np.float32, data="zero-background"),
    Case("zero-background-sepz", (1, 6, 16, 14), (4.0, 1.0, 1.0), (1.5, 0.8, 1.1), 3, np.float32,
         data="zero-background"),
    Case("ct-integers", (1, 9, 14, 12), (1.0, 1.0, 1.0), (0.7, 0.8, 0.9), 3, np.float32, data="integers"),
    Case("signed-zeros-order3", (1, 8, 9, 10), (1.0, 1.0, 1.0), (0.8, 1.2, 0.5), 3, np.float32, data="signed-zeros"),
    Case("float64-order3", (1, 7, 13, 11), (1.0, 1.0, 1.0), (0.6, 1.3, 0.8), 3, np.float64),
    Case("logits-iso", (2, 9, 20, 17), (0.8, 0.8, 2.0), (1.0, 1.0, 1.0), 1, np.float16),
    Case("logits-sepz", (2, 9, 20, 17), (0.8, 0.8, 5.0), (1.0, 1.0, 3.0), 1, np.float16),
    Case("logits-sepz-axis0", (3, 6, 21, 19), (1.0, 1.0, 1.0), (4.0, 0.8, 0.7), 1, np.float16),
    Case("logits-up-by-2", (2, 8, 10, 12), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), 1, np.float16),
    Case("logits-order-z-1", (2, 9, 20, 17), (0.8, 0.8, 5.0), (1.0, 1.0, 3.0), 1, np.float16, order_z=1),
    Case("probabilities-float32", (2, 9, 20, 17), (0.8, 0.8, 2.0), (1.0, 1.0, 1.0), 1, np.float32),
    Case("signed-zeros-order1", (1, 8, 9, 10), (1.0, 1.0, 1.0), (0.5, 1.0, 0.75), 1, np.float32, data="signed-zeros"),
    Case("nearest-down-by-2", (1, 16, 16, 16), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), 0, np.float32),
    Case("nearest-up", (1, 6, 7, 9), (1.0, 1.0, 1.0), (0.4, 0.5, 0.3), 0, np.float32),
    Case("nearest-sepz", (1, 10, 16, 16), (4.0, 1.0, 1.0), (1.0, 2.0, 0.5), 0, np.float32),
    Case("int16-order3", (1, 7, 13, 11), (1.0, 1.0, 1.0), (0.6, 0.7, 0.8), 3, np.int16, data="integers"),
    Case("explicit-shape", (1, 7, 13, 11), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 3, np.float32, new_shape=(7, 14, 11)),
]


def make_data(case: Case, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=case.shape) * 50.0 + 10.0
    if case.data == "zero-background":
        # nnU-Net's use_mask_for_norm leaves exact zeros outside the mask
        x[:, : case.shape[1] // 2] = 0.0
        x[:, :, : case.shape[2] // 3] = 0.0
    elif case.data == "integers":
        x = np.round(x * 20.0)
    elif case.data == "signed-zeros":
        x[rng.random(case.shape) < 0.5] = -0.0
        x[rng.random(case.shape) < 0.3] = 0.0
    return x.astype(case.dtype)


@pytest.fixture(scope="module")
def nn() -> ModuleType:
    """nnU-Net's resampling module (the oracle); only the tests that compare against it skip without nnunetv2."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.preprocessing.resampling import default_resampling

    return default_resampling


def target_shape(nn: ModuleType, case: Case) -> tuple[int, int, int]:
    if case.new_shape is not None:
        return case.new_shape
    return tuple(int(s) for s in nn.compute_new_shape(case.shape[1:], case.current_spacing, case.new_spacing))


def run_both(nn: ModuleType, case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = make_data(case)
    new_shape = target_shape(nn, case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = nn.resample_data_or_seg_to_shape(
            data, new_shape, case.current_spacing, case.new_spacing, is_seg=False, order=case.order,
            order_z=case.order_z, force_separate_z=case.force_separate_z,
        )
    got = resample_to_shape(
        data, new_shape, case.current_spacing, case.new_spacing, order=case.order, order_z=case.order_z,
        force_separate_z=case.force_separate_z,
    )
    return data, got, expected


def identical_fraction(got: np.ndarray, expected: np.ndarray) -> float:
    view = UINT_VIEW[got.dtype.itemsize] if got.dtype.kind == "f" else None
    if view is None:
        return float(np.mean(got == expected))
    return float(np.mean(got.view(view) == expected.view(view)))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_nnunet(nn: ModuleType, case: Case) -> None:
    data, got, expected = run_both(nn, case)
    assert got.dtype == expected.dtype == data.dtype
    assert got.shape == expected.shape == (case.shape[0], *target_shape(nn, case))
    if got.dtype == np.float32:
        scale = max(1.0, float(np.max(np.abs(expected.astype(np.float64)))))
        assert np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))) <= FLOAT32_ATOL * scale
        assert identical_fraction(got, expected) >= FLOAT32_MIN_IDENTICAL
    elif got.dtype == np.float64:
        scale = max(1.0, float(np.max(np.abs(expected))))
        assert np.max(np.abs(got - expected)) <= 1e-12 * scale
    else:  # float16 and integer outputs must be identical
        assert identical_fraction(got, expected) == 1.0


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bit_identical(nn: ModuleType, case: Case) -> None:
    _, got, expected = run_both(nn, case)
    assert identical_fraction(got, expected) == 1.0


@pytest.mark.parametrize("seed", range(40))
def test_random_configurations_bit_identical(nn: ModuleType, seed: int) -> None:
    """Random shapes (including length-1 axes), spacings, orders, dtypes and separate-z settings."""
    rng = np.random.default_rng(1000 + seed)
    shape = (int(rng.integers(1, 3)), *(int(v) for v in rng.integers(1, 15, 3)))
    spacings = [0.5, 0.8, 1.0, 1.5, 3.0, 5.0]
    current = tuple(float(v) for v in rng.choice(spacings, 3))
    new = tuple(float(v) for v in rng.choice(spacings, 3))
    new_shape = tuple(int(s) for s in nn.compute_new_shape(shape[1:], current, new))
    if 0 in new_shape:
        new_shape = tuple(max(1, s) for s in new_shape)
    case = Case(
        f"random-{seed}", shape, current, new, order=int(rng.choice([0, 1, 3])),
        dtype=[np.float32, np.float16, np.float64][int(rng.integers(3))], order_z=int(rng.choice([0, 0, 1, 3])),
        force_separate_z=[None, None, True, False][int(rng.integers(4))], new_shape=new_shape,
        data=["normal", "zero-background", "integers"][int(rng.integers(3))],
    )
    _, got, expected = run_both(nn, case)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert identical_fraction(got, expected) == 1.0


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_nan_and_inf_propagate_like_scipy(nn: ModuleType) -> None:
    rng = np.random.default_rng(3)
    for order, order_z, spacing in [(3, 0, (1.0, 1.0, 1.0)), (1, 1, (4.0, 1.0, 1.0)), (3, 3, (4.0, 1.0, 1.0)),
                                    (1, 0, (1.0, 1.0, 4.0)), (0, 0, (4.0, 1.0, 1.0))]:
        data = rng.normal(size=(1, 6, 9, 8)).astype(np.float32)
        data[0, 2, 3, 4] = np.nan
        data[0, 4] = np.nan
        data[0, 1, 1, 1] = np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = nn.resample_data_or_seg_to_shape(data, (10, 7, 12), spacing, (1.0, 1.0, 1.0), False, order,
                                                        order_z, None)
        got = resample_to_shape(data, (10, 7, 12), spacing, (1.0, 1.0, 1.0), order=order, order_z=order_z)
        assert identical_fraction(got, expected) == 1.0


def test_same_shape_returns_input_object() -> None:
    data = np.ones((2, 4, 5, 6), dtype=np.float16)
    assert resample_to_shape(data, (4, 5, 6), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), order=3) is data


def test_input_is_not_modified() -> None:
    for dtype in (np.float32, np.float64):
        data = np.random.default_rng(0).normal(size=(2, 5, 6, 7)).astype(dtype)
        before = data.copy()
        resample_to_shape(data, (9, 3, 7), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), order=3)
        resample_to_shape(data, (9, 3, 7), (4.0, 1.0, 1.0), (1.0, 1.0, 1.0), order=1, order_z=1)
        np.testing.assert_array_equal(data, before)


@pytest.mark.parametrize(
    ("old_shape", "old_spacing", "new_spacing"),
    [
        ((7, 13, 11), (5.0, 0.8, 0.8), (3.0, 1.0, 1.0)),
        ((5, 5, 5), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)),  # 2.5: half to even
        ((7, 9, 11), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0)),  # 3.5, 4.5, 5.5
        ((120, 256, 256), (1.0, 0.7, 0.7), (1.25, 0.55, 0.55)),
        ((3, 512, 512), (np.float64(2.5), 0.4883, 0.4883), (np.float64(1.0), 0.8, 0.8)),
    ],
)
def test_compute_new_shape_matches_nnunet(nn, old_shape, old_spacing, new_spacing) -> None:
    expected = tuple(int(v) for v in nn.compute_new_shape(old_shape, old_spacing, new_spacing))
    got = compute_new_shape(old_shape, old_spacing, new_spacing)
    assert got == expected
    assert all(type(v) is int for v in got)


def test_determine_separate_z_matches_nnunet(nn: ModuleType) -> None:
    spacings = [(1.0, 1.0, 1.0), (5.0, 0.8, 0.8), (0.8, 5.0, 0.8), (0.8, 0.8, 5.0), (3.0, 1.0, 1.0),
                (3.1, 1.0, 1.0), (0.24, 1.25, 1.25), (2.0, 2.0, 0.5), (4.0, 4.0, 4.0), (1.0, 3.0, 2.0)]
    for current in spacings:
        for new in spacings:
            for force in (None, True, False):
                for threshold in (3.0, 2.0):
                    expected = nn.determine_do_sep_z_and_axis(force, current, new, threshold)
                    got = determine_separate_z(current, new, force_separate_z=force, anisotropy_threshold=threshold)
                    assert got == (bool(expected[0]), None if expected[1] is None else int(expected[1]))


def test_invalid_arguments_raise() -> None:
    data = np.zeros((1, 4, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError):
        resample_to_shape(data[0], (5, 5, 5), (1.0,) * 3, (1.0,) * 3, order=3)
    with pytest.raises(ValueError):
        resample_to_shape(data, (5, 5), (1.0,) * 3, (1.0,) * 3, order=3)
    with pytest.raises(ValueError):
        resample_to_shape(data, (5, 5, 5), (1.0,) * 3, (1.0,) * 3, order=2)
    with pytest.raises(ValueError):
        resample_to_shape(data, (5, 5, 5), (4.0, 1.0, 1.0), (1.0,) * 3, order=3, order_z=5)
    with pytest.raises(ValueError):
        compute_new_shape((4, 4), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))


def test_runtime_modules_import_without_scipy_skimage_torch() -> None:
    """The three runtime modules, loaded on their own and through the package, pull in no oracle library."""
    root = Path(__file__).resolve().parents[2]
    code = (
        "import importlib.util, sys\n"
        f"root = {str(root)!r}\n"
        "for name in ('resample', 'crop', 'importance'):\n"
        "    path = f'{root}/segsentry/runtime/{name}.py'\n"
        "    spec = importlib.util.spec_from_file_location('standalone_' + name, path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "import segsentry.runtime.resample, segsentry.runtime.crop, segsentry.runtime.importance\n"
        "bad = [m for m in ('scipy', 'skimage', 'torch', 'nnunetv2', 'acvl_utils') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
