"""Gaussian fit of patch features and the squared Mahalanobis distance (Gonzalez et al., MedIA 2022).

Per sliding-window patch the segmentation network yields a feature vector ``z`` of ``D`` floats. On ``N``
training patches a Gaussian ``(mu, Sigma)`` is fitted; the OOD score of a patch is the *squared*
Mahalanobis distance ``(z - mu)^T Sigma^-1 (z - mu)`` (the form scikit-learn's ``mahalanobis()`` returns).

Everything here is plain numpy, computed in float64, and never holds more than one ``D x D`` (when
``N > D``) or one ``N x N`` (when ``N <= D``) matrix plus a few row blocks, so the features themselves can
live on disk in a :class:`FeatureStore`.

Estimators (all match scikit-learn, which is used only as a test oracle):

``empirical``
    Maximum-likelihood covariance (divided by ``N``) and its pseudo-inverse with the cutoff of
    ``scipy.linalg.pinvh`` -- the paper-faithful choice; for ``N <= D`` directions never seen in training
    are ignored.
``ledoit-wolf``
    ``(1 - a) S + a * trace(S) / D * I`` with scikit-learn's ``ledoit_wolf_shrinkage`` coefficient ``a``.
``oas``
    The same target with scikit-learn's current Oracle Approximating Shrinkage coefficient.

The fit is stored as whitening rows ``W`` (``components``) and, for shrinkage estimators with
``N <= D``, an orthonormal basis ``V`` of the training span plus a scalar for its orthogonal complement::

    d(z) = ||W (z - mu)||^2 + complement_scale * ||delta - V (V^T delta)||^2,   delta = z - mu
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np

from segsentry.contract import L2_EPS, FeatureNorm
from segsentry.contract import Estimator as EstimatorChoice
from segsentry.errors import CalibrationError

logger = logging.getLogger(__name__)

Estimator = Literal["empirical", "ledoit-wolf", "oas"]
ESTIMATORS: tuple[str, ...] = tuple(e.value for e in EstimatorChoice)

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "FeatureStore",
    "GaussianFit",
    "fit_gaussian",
    "normalise_features",
    "squared_mahalanobis",
]


# --------------------------------------------------------------------------------------------------------
# Feature store
# --------------------------------------------------------------------------------------------------------


class FeatureStore:
    """Append-only on-disk matrix of float32 patch features, shape ``(N, D)``, owned by a temporary file.

    Use it as a context manager; the file is deleted on :meth:`close` (or on leaving the ``with`` block)::

        with FeatureStore(directory=work_dir) as store:
            for batch in batches:          # each (n, D)
                store.append(batch)
            fit = fit_gaussian(store.array())

    Args:
        directory: folder for the temporary file; ``None`` uses :func:`tempfile.gettempdir`.
        n_features: ``D`` if known in advance; otherwise it is taken from the first appended batch.
    """

    def __init__(self, *, directory: str | os.PathLike[str] | None = None, n_features: int | None = None) -> None:
        if n_features is not None and int(n_features) < 1:
            raise CalibrationError(f"FeatureStore needs n_features >= 1, got {n_features}.")
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="segsentry-features-", suffix=".f32", dir=directory)
        self._file = os.fdopen(fd, "wb")
        self._path = Path(name)
        self._n_features: int | None = None if n_features is None else int(n_features)
        self._n_samples = 0
        self._closed = False

    # -- properties -------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """Path of the backing file (row-major float32, no header)."""
        return self._path

    @property
    def n_samples(self) -> int:
        """Number of rows ``N`` appended so far."""
        return self._n_samples

    @property
    def n_features(self) -> int | None:
        """Feature dimension ``D`` (``None`` until known)."""
        return self._n_features

    @property
    def closed(self) -> bool:
        return self._closed

    # -- writing ----------------------------------------------------------------------------------------
    def append(self, batch: np.ndarray) -> None:
        """Append rows of shape ``(n, D)`` (any real dtype; stored as float32). ``n = 0`` is a no-op."""
        self._check_open()
        arr = np.asarray(batch)
        if arr.ndim != 2:
            raise CalibrationError(
                f"FeatureStore.append expects a 2-D (n, D) array of features, got shape {arr.shape}."
            )
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise CalibrationError(f"FeatureStore.append expects real numbers, got dtype {arr.dtype}.")
        n, d = arr.shape
        if self._n_features is None:
            if d < 1:
                raise CalibrationError("FeatureStore.append got a batch with 0 features per row.")
            self._n_features = int(d)
        elif d != self._n_features:
            raise CalibrationError(
                f"FeatureStore holds D={self._n_features} features per patch but a batch has {d}; "
                "all patches must come from the same network output."
            )
        if n == 0:
            return
        self._file.write(np.ascontiguousarray(arr, dtype=np.float32).tobytes(order="C"))
        self._n_samples += int(n)

    # -- reading ----------------------------------------------------------------------------------------
    def array(self) -> np.memmap:
        """Read-only memory map of all rows so far, shape ``(N, D)`` float32."""
        self._check_open()
        if self._n_samples == 0 or self._n_features is None:
            raise CalibrationError("FeatureStore is empty: no patch features were appended.")
        self._file.flush()
        return np.memmap(self._path, dtype=np.float32, mode="r", shape=(self._n_samples, self._n_features))

    # -- lifetime ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close and delete the backing file (idempotent). Memory maps obtained before stay valid on POSIX."""
        if self._closed:
            return
        self._closed = True
        try:
            self._file.close()
        finally:
            try:
                self._path.unlink()
            except FileNotFoundError:
                pass

    def _check_open(self) -> None:
        if self._closed:
            raise CalibrationError("FeatureStore is closed.")

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - safety net only
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else str(self._path)
        return f"FeatureStore(N={self._n_samples}, D={self._n_features}, {state})"


# --------------------------------------------------------------------------------------------------------
# Fit
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianFit:
    """A fitted Gaussian, stored in whitened form.

    The squared Mahalanobis distance of ``z`` (shape ``(D,)``) is, with ``delta = z - mean``::

        ||components @ delta||^2 + complement_scale * ||delta - basis @ (basis.T @ delta)||^2

    Attributes:
        mean: ``(D,)`` float64 -- the sample mean ``mu``.
        components: ``(k, D)`` float64 -- whitening rows ``W`` (orthogonal rows, ``||w_i|| = e_i^-1/2`` for
            the covariance eigenvalues ``e_i`` they cover).
        basis: ``(D, r)`` float64 orthonormal basis ``V`` of the span covered by ``components`` when a
            complement term is needed (shrinkage estimator with ``N <= D``), else ``None``.
        complement_scale: inverse covariance eigenvalue on the orthogonal complement of ``basis``
            (``1 / (a * trace(S) / D)``); ``0.0`` when there is no complement term.
        estimator: ``'empirical'``, ``'ledoit-wolf'`` or ``'oas'``.
        shrinkage: the shrinkage coefficient ``a`` (``0.0`` for ``empirical``).
        n_samples: ``N``, number of training patches.
        n_features: ``D``.
        rank: rank of the empirical (maximum-likelihood) covariance as seen by the pinvh cutoff.
    """

    mean: np.ndarray
    components: np.ndarray
    basis: np.ndarray | None
    complement_scale: float
    estimator: str
    shrinkage: float
    n_samples: int
    n_features: int
    rank: int

    def __post_init__(self) -> None:
        d = self.n_features
        if self.mean.shape != (d,):
            raise ValueError(f"mean must have shape ({d},), got {self.mean.shape}")
        if self.components.ndim != 2 or self.components.shape[1] != d:
            raise ValueError(f"components must have shape (k, {d}), got {self.components.shape}")
        if self.basis is not None and (self.basis.ndim != 2 or self.basis.shape[0] != d):
            raise ValueError(f"basis must have shape ({d}, r), got {self.basis.shape}")
        if (self.basis is None) != (self.complement_scale == 0.0):
            raise ValueError("basis and a non-zero complement_scale go together")
        for arr in (self.mean, self.components, self.basis):
            if arr is not None:
                arr.setflags(write=False)

    @property
    def has_complement(self) -> bool:
        """Whether the distance has the complement term (``basis`` is set)."""
        return self.basis is not None

    def precision_matrix(self) -> np.ndarray:
        """Dense ``(D, D)`` precision (pseudo-inverse covariance). Diagnostics only: ``O(D^2)`` memory."""
        prec = self.components.T @ self.components
        if self.basis is not None:
            v = self.basis
            prec += self.complement_scale * (np.eye(self.n_features) - v @ v.T)
        return prec

    def covariance_matrix(self) -> np.ndarray:
        """Dense ``(D, D)`` covariance the fit represents (restricted to the kept eigen-directions for
        ``empirical`` fits). Diagnostics only: ``O(D^2)`` memory."""
        w = self.components
        # w_i = e_i^-1/2 v_i  =>  ||w_i||^2 = 1 / e_i  and  e_i v_i v_i^T = e_i^2 w_i w_i^T
        eig = 1.0 / np.einsum("ij,ij->i", w, w)
        cov = (w.T * eig**2) @ w
        if self.basis is not None:
            v = self.basis
            cov += (1.0 / self.complement_scale) * (np.eye(self.n_features) - v @ v.T)
        return cov


def _iter_blocks(features: np.ndarray, block_rows: int) -> list[tuple[int, int]]:
    n = features.shape[0]
    return [(start, min(start + block_rows, n)) for start in range(0, n, block_rows)]


def _load(features: np.ndarray, start: int, stop: int, mean: np.ndarray | None = None) -> np.ndarray:
    """Rows ``start:stop`` as a fresh float64 array, optionally centred."""
    block = np.array(features[start:stop], dtype=np.float64, copy=True)
    if mean is not None:
        block -= mean
    return block


def _pinvh_cutoff(eigvals: np.ndarray, n_features: int) -> float:
    """The cutoff ``scipy.linalg.pinvh`` applies to the eigenvalues of a ``D x D`` float64 matrix."""
    max_abs = float(np.max(np.abs(eigvals), initial=0.0))
    return max_abs * n_features * float(np.finfo(np.float64).eps)


def _ledoit_wolf_shrinkage(*, n: int, p: int, trace_s: float, frob2_s: float, sum_row_norm4: float) -> float:
    """scikit-learn's ``ledoit_wolf_shrinkage`` from summary statistics of the centred data ``Xc``.

    ``trace_s = trace(S)``, ``frob2_s = ||S||_F^2 = ||Xc^T Xc||_F^2 / n^2``,
    ``sum_row_norm4 = sum_i ||xc_i||^4 = sum(<Xc^2.T, Xc^2>)``.
    """
    if p == 1:
        return 0.0
    mu = trace_s / p
    beta_ = sum_row_norm4
    delta_ = frob2_s
    beta = 1.0 / (p * n) * (beta_ / n - delta_)
    delta = delta_ - 2.0 * mu * trace_s + p * mu**2
    delta /= p
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def _oas_shrinkage(*, n: int, p: int, trace_s: float, frob2_s: float) -> float:
    """scikit-learn's (>= 1.3) OAS shrinkage coefficient from ``trace(S)`` and ``||S||_F^2``."""
    if p == 1:
        return 0.0
    alpha = frob2_s / (p * p)  # np.mean(emp_cov ** 2)
    mu = trace_s / p
    mu_squared = mu**2
    num = alpha + mu_squared
    den = (n + 1) * (alpha - mu_squared / p)
    return 1.0 if den == 0 else float(min(num / den, 1.0))


def fit_gaussian(
    features: np.ndarray,
    *,
    estimator: Estimator = "ledoit-wolf",
    block_rows: int = 2048,
) -> GaussianFit:
    """Fit a Gaussian to training patch features, streaming over row blocks.

    Args:
        features: ``(N, D)`` array or ``np.memmap`` (e.g. :meth:`FeatureStore.array`), any real dtype;
            all arithmetic is float64.
        estimator: ``'empirical'`` (ML covariance + pinvh pseudo-inverse, as in the paper),
            ``'ledoit-wolf'`` or ``'oas'`` (scikit-learn's shrinkage towards ``trace(S)/D * I``).
        block_rows: rows read at a time. Peak memory is about ``block_rows * D`` float64 plus either one
            ``D x D`` (``N > D``) or one ``N x N`` plus ``D x N`` (``N <= D``) float64 matrix.

    Returns:
        A :class:`GaussianFit`.

    Raises:
        CalibrationError: ``N < 2``, a non-finite value, all features constant, or a bad argument.
    """
    if estimator not in ESTIMATORS:
        raise CalibrationError(f"Unknown covariance estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}.")
    if int(block_rows) < 1:
        raise CalibrationError(f"block_rows must be >= 1, got {block_rows}.")
    block_rows = int(block_rows)
    if not hasattr(features, "shape") or not hasattr(features, "dtype"):
        features = np.asarray(features)
    if features.ndim != 2:
        raise CalibrationError(f"Calibration features must be a 2-D (N, D) array, got shape {features.shape}.")
    if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
        raise CalibrationError(f"Calibration features must be real numbers, got dtype {features.dtype}.")
    n, d = (int(s) for s in features.shape)
    if d < 1:
        raise CalibrationError("Calibration features have D=0 entries per patch.")
    if n < 2:
        raise CalibrationError(
            f"Calibration needs at least 2 training patches to estimate a covariance, got N={n}. "
            "Add training cases or use a smaller patch step."
        )
    blocks = _iter_blocks(features, block_rows)

    # ---- pass 1: mean, finiteness, constant features -------------------------------------------------
    total = np.zeros(d, dtype=np.float64)
    col_min = np.full(d, np.inf)
    col_max = np.full(d, -np.inf)
    for start, stop in blocks:
        block = _load(features, start, stop)
        finite = np.isfinite(block)
        if not finite.all():
            bad = start + int(np.argmin(finite.all(axis=1)))
            raise CalibrationError(
                f"Calibration features contain NaN or infinite values (first at patch {bad}); "
                "check the network input normalisation and the exported feature output."
            )
        total += block.sum(axis=0)
        np.minimum(col_min, block.min(axis=0), out=col_min)
        np.maximum(col_max, block.max(axis=0), out=col_max)
    mean = total / n
    constant = col_min == col_max
    n_constant = int(constant.sum())
    if n_constant == d:
        raise CalibrationError(
            f"All D={d} features are constant over the N={n} training patches; the covariance is zero. "
            "The feature layer is probably dead (check the exported feature output)."
        )
    if n_constant:
        logger.warning(
            "%d of D=%d features are constant over the N=%d training patches (zero variance).", n_constant, d, n
        )
    if n <= d:
        logger.warning(
            "N=%d patches %s D=%d features: the covariance is singular (rank <= N-1)%s",
            n,
            "<" if n < d else "=",
            d,
            "; the empirical estimator uses its pseudo-inverse, so directions unseen in training add no "
            "distance -- consider estimator='ledoit-wolf' or more training patches."
            if estimator == "empirical"
            else f"; relying on {estimator} shrinkage.",
        )

    if n > d:
        fit = _fit_primal(features, blocks, mean, n=n, d=d, estimator=estimator)
    else:
        fit = _fit_dual(features, blocks, mean, n=n, d=d, estimator=estimator)
    logger.info(
        "Fitted %s Gaussian: N=%d, D=%d, rank=%d, shrinkage=%.6g, %d whitening rows%s.",
        fit.estimator,
        n,
        d,
        fit.rank,
        fit.shrinkage,
        fit.components.shape[0],
        "" if fit.basis is None else f" + complement (scale {fit.complement_scale:.6g})",
    )
    return fit


def _shrinkage(estimator: str, *, n: int, d: int, trace_s: float, frob2_s: float, sum_row_norm4: float) -> float:
    if estimator == "empirical":
        return 0.0
    if estimator == "ledoit-wolf":
        return _ledoit_wolf_shrinkage(n=n, p=d, trace_s=trace_s, frob2_s=frob2_s, sum_row_norm4=sum_row_norm4)
    return _oas_shrinkage(n=n, p=d, trace_s=trace_s, frob2_s=frob2_s)


def _fit_primal(
    features: np.ndarray, blocks: list[tuple[int, int]], mean: np.ndarray, *, n: int, d: int, estimator: str
) -> GaussianFit:
    """``N > D``: accumulate the ``D x D`` centred scatter, then eigh."""
    scatter = np.zeros((d, d), dtype=np.float64)
    sum_row_norm4 = 0.0
    for start, stop in blocks:
        xc = _load(features, start, stop, mean)
        scatter += xc.T @ xc
        sum_row_norm4 += float(np.sum(np.einsum("ij,ij->i", xc, xc) ** 2))
    cov = scatter
    cov /= n
    cov = (cov + cov.T) * 0.5  # exact symmetry for eigh; (xc.T @ xc) already is up to rounding
    trace_s = float(np.trace(cov))
    frob2_s = float(np.sum(cov * cov))
    evals, evecs = np.linalg.eigh(cov)
    del cov, scatter
    rank = int(np.sum(np.abs(evals) > _pinvh_cutoff(evals, d)))
    a = _shrinkage(estimator, n=n, d=d, trace_s=trace_s, frob2_s=frob2_s, sum_row_norm4=sum_row_norm4)
    m = trace_s / d
    shrunk = (1.0 - a) * evals + a * m if estimator != "empirical" else evals
    keep = np.abs(shrunk) > _pinvh_cutoff(shrunk, d)
    keep &= shrunk > 0  # negative eigenvalues above the cutoff cannot occur for a PSD scatter
    components = (evecs[:, keep] / np.sqrt(shrunk[keep])).T.copy()
    return GaussianFit(
        mean=mean,
        components=components,
        basis=None,
        complement_scale=0.0,
        estimator=estimator,
        shrinkage=float(a),
        n_samples=n,
        n_features=d,
        rank=rank,
    )


def _fit_dual(
    features: np.ndarray, blocks: list[tuple[int, int]], mean: np.ndarray, *, n: int, d: int, estimator: str
) -> GaussianFit:
    """``N <= D``: eigh of the ``N x N`` Gram ``G = Xc Xc^T``; ``V = Xc^T U / sqrt(N * lambda)``."""
    gram = np.zeros((n, n), dtype=np.float64)
    for i, (s0, s1) in enumerate(blocks):
        xi = _load(features, s0, s1, mean)
        gram[s0:s1, s0:s1] = xi @ xi.T
        for t0, t1 in blocks[i + 1 :]:
            xj = _load(features, t0, t1, mean)
            g = xi @ xj.T
            gram[s0:s1, t0:t1] = g
            gram[t0:t1, s0:s1] = g.T
    gram = (gram + gram.T) * 0.5
    row_sq = np.diagonal(gram).copy()  # ||xc_i||^2
    trace_s = float(row_sq.sum()) / n
    frob2_s = float(np.sum(gram * gram)) / (n * n)  # ||Xc^T Xc||_F^2 = ||Xc Xc^T||_F^2
    sum_row_norm4 = float(np.sum(row_sq**2))
    g_evals, g_evecs = np.linalg.eigh(gram)
    del gram
    evals = g_evals / n  # non-zero eigenvalues of S; the other D - N are zero
    keep = (np.abs(evals) > _pinvh_cutoff(evals, d)) & (evals > 0)
    rank = int(keep.sum())
    evals = evals[keep]
    u = g_evecs[:, keep]
    # V = Xc^T U / sqrt(N * lambda), accumulated over row blocks: (D, rank)
    basis = np.zeros((d, rank), dtype=np.float64)
    for s0, s1 in blocks:
        xc = _load(features, s0, s1, mean)
        basis += xc.T @ u[s0:s1]
    basis /= np.sqrt(n * evals)

    a = _shrinkage(estimator, n=n, d=d, trace_s=trace_s, frob2_s=frob2_s, sum_row_norm4=sum_row_norm4)
    m = trace_s / d
    if estimator == "empirical":
        components = (basis / np.sqrt(evals)).T.copy()
        return GaussianFit(
            mean=mean,
            components=components,
            basis=None,
            complement_scale=0.0,
            estimator=estimator,
            shrinkage=0.0,
            n_samples=n,
            n_features=d,
            rank=rank,
        )

    shrunk = (1.0 - a) * evals + a * m
    floor = a * m  # eigenvalue on the orthogonal complement of V (dimension D - rank)
    all_eigs = np.concatenate([shrunk, [floor]]) if rank < d else shrunk
    cutoff = _pinvh_cutoff(all_eigs, d)
    keep_s = shrunk > cutoff
    components = (basis[:, keep_s] / np.sqrt(shrunk[keep_s])).T.copy()
    if rank < d and floor > cutoff:
        return GaussianFit(
            mean=mean,
            components=components,
            basis=basis,
            complement_scale=float(1.0 / floor),
            estimator=estimator,
            shrinkage=float(a),
            n_samples=n,
            n_features=d,
            rank=rank,
        )
    return GaussianFit(
        mean=mean,
        components=components,
        basis=None,
        complement_scale=0.0,
        estimator=estimator,
        shrinkage=float(a),
        n_samples=n,
        n_features=d,
        rank=rank,
    )


# --------------------------------------------------------------------------------------------------------
# Distance
# --------------------------------------------------------------------------------------------------------


def normalise_features(z: np.ndarray, norm: FeatureNorm | str) -> np.ndarray:
    """``z`` ``(N, D)`` as the Gaussian sees it: unchanged (``none``) or each row divided by
    ``max(||row||_2, L2_EPS)`` (``l2``, Mahalanobis++), in float64 -- the head's ``ReduceL2``/``Max``/``Div``."""
    z = np.asarray(z, dtype=np.float64)
    if FeatureNorm(norm) is FeatureNorm.NONE:
        return z
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), L2_EPS)


def squared_mahalanobis(fit: GaussianFit, z: np.ndarray, *, block_rows: int = 4096) -> np.ndarray:
    """Reference squared Mahalanobis distance in float64.

    The formula of :class:`segsentry.contract.HeadInitializer`, on the fit's float64 arrays (the ONNX head,
    :func:`segsentry.calib.head.fold_mahalanobis_head`, computes it in float32 on the same terms).

    Args:
        fit: a :class:`GaussianFit`.
        z: ``(n, D)`` features (or a single ``(D,)`` vector).
        block_rows: rows processed at a time.

    Returns:
        ``(n,)`` float64 distances (``(1,)`` for a single vector).
    """
    arr = np.asarray(z)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != fit.n_features:
        raise CalibrationError(
            f"Features of shape {np.asarray(z).shape} do not match the fit's D={fit.n_features} features."
        )
    out = np.empty(arr.shape[0], dtype=np.float64)
    w_t = fit.components.T
    for start in range(0, arr.shape[0], max(int(block_rows), 1)):
        stop = min(start + max(int(block_rows), 1), arr.shape[0])
        delta = arr[start:stop].astype(np.float64) - fit.mean
        y = delta @ w_t
        dist = np.einsum("ij,ij->i", y, y)
        if fit.has_complement:
            assert fit.basis is not None  # has_complement says so
            resid = delta - (delta @ fit.basis) @ fit.basis.T
            dist += fit.complement_scale * np.einsum("ij,ij->i", resid, resid)
        out[start:stop] = dist
    return out
