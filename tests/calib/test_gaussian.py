"""fit_gaussian / squared_mahalanobis / FeatureStore against scikit-learn and scipy (test oracles only)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg
from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf

from segsentry.calib.gaussian import FeatureStore, GaussianFit, fit_gaussian, squared_mahalanobis
from segsentry.errors import CalibrationError

SKLEARN = {"empirical": EmpiricalCovariance, "ledoit-wolf": LedoitWolf, "oas": OAS}
ESTIMATORS = tuple(SKLEARN)
# (N, D): N > D uses the D x D covariance, N <= D the N x N dual Gram
SHAPES = [(200, 50), (40, 120), (60, 60)]


def make_data(n: int, d: int, *, seed: int = 0, n_test: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Correlated Gaussian features with an offset mean: training (n, d) and test (n_test, d) float64."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d) + 0.5 * np.eye(d)
    offset = rng.normal(scale=3.0, size=d) + 2.0
    x = rng.normal(size=(n, d)) @ mixing + offset
    z = rng.normal(size=(n_test, d)) @ mixing * 1.5 + offset
    return x, z


def sklearn_fit(x: np.ndarray, estimator: str) -> EmpiricalCovariance:
    return SKLEARN[estimator]().fit(x)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_distances_match_sklearn(n: int, d: int, estimator: str) -> None:
    x, z = make_data(n, d, seed=n + d)
    fit = fit_gaussian(x, estimator=estimator)
    ref = sklearn_fit(x, estimator)
    assert isinstance(fit, GaussianFit)
    assert fit.estimator == estimator
    assert (fit.n_samples, fit.n_features) == (n, d)
    assert fit.shrinkage == pytest.approx(getattr(ref, "shrinkage_", 0.0), abs=1e-10)
    np.testing.assert_allclose(fit.mean, x.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(squared_mahalanobis(fit, z), ref.mahalanobis(z), rtol=1e-6)
    np.testing.assert_allclose(squared_mahalanobis(fit, x[:10]), ref.mahalanobis(x[:10]), rtol=1e-6)
    # whitening rows and the complement basis follow the documented shapes
    assert fit.components.dtype == np.float64 and fit.components.shape[1] == d
    if n > d or estimator == "empirical":
        assert fit.basis is None and fit.complement_scale == 0.0
    else:
        assert fit.basis is not None and fit.basis.shape == (d, fit.rank)
        assert fit.complement_scale == pytest.approx(1.0 / (fit.shrinkage * np.trace(ref.covariance_) / d))
    assert fit.rank == min(n - 1, d)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_size_check_d1000_dual(estimator: str) -> None:
    x, z = make_data(300, 1000, seed=7, n_test=20)
    fit = fit_gaussian(x, estimator=estimator, block_rows=128)
    ref = sklearn_fit(x, estimator)
    assert fit.components.shape == (299, 1000)
    assert fit.shrinkage == pytest.approx(getattr(ref, "shrinkage_", 0.0), abs=1e-10)
    np.testing.assert_allclose(squared_mahalanobis(fit, z), ref.mahalanobis(z), rtol=1e-6)


def test_empirical_is_pinvh_pseudo_inverse() -> None:
    x, z = make_data(40, 120, seed=3)
    fit = fit_gaussian(x, estimator="empirical")
    prec = linalg.pinvh(np.cov(x.T, bias=True))
    np.testing.assert_allclose(fit.precision_matrix(), prec, rtol=1e-6, atol=1e-8 * np.abs(prec).max())
    delta = z - x.mean(axis=0)
    np.testing.assert_allclose(
        squared_mahalanobis(fit, z), np.einsum("ij,jk,ik->i", delta, prec, delta), rtol=1e-6
    )


def test_ml_covariance_reconstructed() -> None:
    x, _ = make_data(200, 50, seed=11)
    fit = fit_gaussian(x, estimator="empirical", block_rows=64)
    cov = np.cov(x.T, bias=True)
    np.testing.assert_allclose(fit.covariance_matrix(), cov, rtol=1e-8, atol=1e-10 * np.abs(cov).max())


@pytest.mark.parametrize("n,d", [(200, 50), (40, 120)])
@pytest.mark.parametrize("estimator", ["ledoit-wolf", "oas"])
def test_shrunk_covariance_matches_sklearn(n: int, d: int, estimator: str) -> None:
    x, _ = make_data(n, d, seed=5)
    fit = fit_gaussian(x, estimator=estimator)
    ref = sklearn_fit(x, estimator)
    scale = np.abs(ref.covariance_).max()
    np.testing.assert_allclose(fit.covariance_matrix(), ref.covariance_, rtol=1e-8, atol=1e-10 * scale)
    np.testing.assert_allclose(
        fit.precision_matrix(), ref.precision_, rtol=1e-6, atol=1e-9 * np.abs(ref.precision_).max()
    )


@pytest.mark.parametrize("n,d", [(200, 50), (40, 120)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_block_rows_do_not_change_the_fit(n: int, d: int, estimator: str) -> None:
    x, z = make_data(n, d, seed=2)
    whole = squared_mahalanobis(fit_gaussian(x, estimator=estimator, block_rows=10_000), z)
    for block_rows in (1, 7, n - 1):
        fit = fit_gaussian(x, estimator=estimator, block_rows=block_rows)
        np.testing.assert_allclose(squared_mahalanobis(fit, z), whole, rtol=1e-10)


def test_feature_store_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(k, 16)) for k in (5, 0, 17, 1)]
    with FeatureStore(directory=tmp_path) as store:
        path = store.path
        assert path.parent == tmp_path and path.exists()
        assert store.n_samples == 0 and store.n_features is None
        for batch in batches:
            store.append(batch)
        assert (store.n_samples, store.n_features) == (23, 16)
        arr = store.array()
        assert isinstance(arr, np.memmap)
        assert arr.shape == (23, 16) and arr.dtype == np.float32
        np.testing.assert_array_equal(arr, np.concatenate(batches).astype(np.float32))
        with pytest.raises(ValueError):
            arr[0, 0] = 1.0  # read-only
        # appending after array() is visible in a fresh map
        store.append(np.ones((2, 16), dtype=np.float32))
        assert store.array().shape == (25, 16)
        with pytest.raises(CalibrationError, match="D=16"):
            store.append(np.ones((2, 15)))
        with pytest.raises(CalibrationError):
            store.append(np.ones(16))
    assert store.closed
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CalibrationError, match="closed"):
        store.append(np.ones((1, 16)))
    store.close()  # idempotent


def test_feature_store_default_dir_and_empty() -> None:
    store = FeatureStore(n_features=8)
    try:
        assert store.path.exists() and store.n_features == 8
        with pytest.raises(CalibrationError, match="empty"):
            store.array()
    finally:
        store.close()
    assert not store.path.exists()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fit_from_feature_store(tmp_path: Path, estimator: str) -> None:
    x, z = make_data(120, 40, seed=9)
    with FeatureStore(directory=tmp_path) as store:
        for part in np.array_split(x, 7):
            store.append(part)
        fit = fit_gaussian(store.array(), estimator=estimator, block_rows=32)
    x32 = x.astype(np.float32).astype(np.float64)  # what the store holds
    ref = sklearn_fit(x32, estimator)
    np.testing.assert_allclose(squared_mahalanobis(fit, z), ref.mahalanobis(z), rtol=1e-6)


def test_constant_feature_and_single_feature() -> None:
    x, z = make_data(100, 20, seed=4)
    x[:, 3] = 1.5
    for estimator in ESTIMATORS:
        ref = sklearn_fit(x, estimator)
        fit = fit_gaussian(x, estimator=estimator)
        np.testing.assert_allclose(squared_mahalanobis(fit, z), ref.mahalanobis(z), rtol=1e-6)
    x1 = x[:, :1] + np.arange(100)[:, None] * 0.01
    for estimator in ESTIMATORS:
        ref = sklearn_fit(x1, estimator)
        fit = fit_gaussian(x1, estimator=estimator)
        np.testing.assert_allclose(squared_mahalanobis(fit, z[:, :1]), ref.mahalanobis(z[:, :1]), rtol=1e-9)


def test_single_vector_distance() -> None:
    x, z = make_data(80, 10, seed=1)
    fit = fit_gaussian(x, estimator="oas")
    assert squared_mahalanobis(fit, z[0]).shape == (1,)
    np.testing.assert_allclose(squared_mahalanobis(fit, z[0]), squared_mahalanobis(fit, z[:1]))
    with pytest.raises(CalibrationError, match="D=10"):
        squared_mahalanobis(fit, z[:, :9])


def test_warns_when_n_below_d(caplog: pytest.LogCaptureFixture) -> None:
    x, _ = make_data(30, 60, seed=0)
    with caplog.at_level(logging.WARNING, logger="segsentry.calib.gaussian"):
        fit_gaussian(x, estimator="ledoit-wolf")
    assert "N=30 patches < D=60 features: the covariance is singular" in caplog.text
    caplog.clear()
    x, _ = make_data(100, 10, seed=0)
    with caplog.at_level(logging.WARNING, logger="segsentry.calib.gaussian"):
        fit_gaussian(x, estimator="ledoit-wolf")
    assert "singular" not in caplog.text


def test_errors() -> None:
    x, _ = make_data(50, 8, seed=0)
    with pytest.raises(CalibrationError, match="at least 2"):
        fit_gaussian(x[:1])
    with pytest.raises(CalibrationError, match="at least 2"):
        fit_gaussian(np.zeros((0, 8)))
    bad = x.copy()
    bad[17, 2] = np.nan
    with pytest.raises(CalibrationError, match="patch 17"):
        fit_gaussian(bad, block_rows=5)
    bad[17, 2] = np.inf
    with pytest.raises(CalibrationError, match="infinite"):
        fit_gaussian(bad)
    with pytest.raises(CalibrationError, match="constant"):
        fit_gaussian(np.full((20, 8), 3.25))
    with pytest.raises(CalibrationError, match="estimator"):
        fit_gaussian(x, estimator="ridge")  # type: ignore[arg-type]
    with pytest.raises(CalibrationError, match="2-D"):
        fit_gaussian(x[0])
    with pytest.raises(CalibrationError, match="block_rows"):
        fit_gaussian(x, block_rows=0)


def test_fit_is_immutable() -> None:
    x, _ = make_data(50, 8, seed=0)
    fit = fit_gaussian(x)
    with pytest.raises(ValueError):
        fit.mean[0] = 0.0
    with pytest.raises(AttributeError):
        fit.shrinkage = 0.5  # type: ignore[misc]
