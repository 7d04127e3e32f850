"""Resampling that reproduces nnU-Net v2.8.1 numerics with numpy only (no scipy, no scikit-image, no torch).

nnU-Net resamples images with ``skimage.transform.resize(..., mode='edge', anti_aliasing=False)``, which is
``scipy.ndimage.zoom(..., mode='nearest', grid_mode=True)`` followed by clipping to the input's value range,
and, for anisotropic images, resizes every 2D slice and then resamples along the low-resolution axis with
``scipy.ndimage.map_coordinates(..., order=order_z, mode='nearest')``.

This module redoes those computations operation by operation in vectorised numpy: the same edge
pre-padding by 12 samples, the same cubic B-spline prefilter recursion (scipy's 'reflect' initialisation for
mode 'nearest'), the same output coordinates ``((i + 0.5) * (n_in / n_out)) - 0.5``, the same spline weight
formulas, index clamping and rounding rule, and the same per-sample sum ``t = 0.0; t += ((v * w0) * w1) * w2``
over the neighbours in scipy's order. The float64 results are therefore bit-identical to scipy's (verified
against scipy 1.17 in tests/runtime), and so are the float32/float16 outputs, signed zeros and the tiny
round-off values that order 3 leaves in constant regions included. IEEE float64 arithmetic without fused
multiply-add is assumed on both sides, as on x86-64.

Arrays are in nnU-Net's (already transposed) numpy axis order; spacings are given in the same order.
Arrays are in nnU-Net's (already transposed) numpy axis order; spacings are given in the same order.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["compute_new_shape", "determine_separate_z", "resample_to_shape"]

SUPPORTED_ORDERS = (0, 1, 3)
# scipy.ndimage._interpolation._prepad_for_spline_filter: mode 'nearest' pre-pads by 12 edge samples
_NPAD = 12
# pole of the cubic B-spline prefilter, sqrt(3) - 2, as written in scipy's ni_splines.c
_CUBIC_POLE = -0.267949192431122706472553658494127633
# output samples computed per chunk (bounds the temporaries of the tap sums)
_CHUNK_ELEMENTS = 1 << 18
# float64 elements per block when prefiltering along an axis other than the first
_BLOCK_ELEMENTS = 1 << 21


def compute_new_shape(
    old_shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Shape after resampling from ``old_spacing`` to ``new_spacing``: ``int(round(old_sp / new_sp * n))``.

    Same expression (and therefore the same half-to-even rounding) as nnU-Net's ``compute_new_shape``.
    All three sequences have one entry per spatial axis, in the same axis order.
    """
    if not len(old_shape) == len(old_spacing) == len(new_spacing):
        raise ValueError(
            f"old_shape, old_spacing and new_spacing must have the same length, got "
            f"{len(old_shape)}, {len(old_spacing)} and {len(new_spacing)}"
        )
    return tuple(int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape))


def _is_anisotropic(spacing: Sequence[float], threshold: float) -> bool:
    return bool((np.max(spacing) / np.min(spacing)) > threshold)


def _lowres_axes(spacing: Sequence[float]) -> np.ndarray:
    return np.where(max(spacing) / np.array(spacing) == 1)[0]


def determine_separate_z(
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    force_separate_z: bool | None,
    anisotropy_threshold: float = 3.0,
) -> tuple[bool, int | None]:
    """Whether to resample the low-resolution axis separately, and which axis that is.

    Same decision as nnU-Net's ``determine_do_sep_z_and_axis``: forced on/off by ``force_separate_z``, else on
    when the current spacing, or failing that the new spacing, has max/min spacing above
    ``anisotropy_threshold``. The axis is the one with the largest spacing; when two or three axes share the
    largest spacing there is no single low-resolution axis and separate resampling is switched off.

    Returns ``(do_separate_z, axis)`` with ``axis`` an index into the spatial axes, or ``None``.
    """
    axes: np.ndarray | None
    if force_separate_z is not None:
        do_separate_z = bool(force_separate_z)
        axes = _lowres_axes(current_spacing) if force_separate_z else None
    elif _is_anisotropic(current_spacing, anisotropy_threshold):
        do_separate_z, axes = True, _lowres_axes(current_spacing)
    elif _is_anisotropic(new_spacing, anisotropy_threshold):
        do_separate_z, axes = True, _lowres_axes(new_spacing)
    else:
        do_separate_z, axes = False, None
    if axes is None:
        return do_separate_z, None
    if len(axes) != 1:
        return False, None
    return do_separate_z, int(axes[0])


# ----------------------------------------------------------------------------------------------------------
# scipy.ndimage spline interpolation on a regular grid, reproduced operation by operation
# ----------------------------------------------------------------------------------------------------------


def _source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    """Input coordinate of every output sample, (n_out,) float64, computed with scipy's float operations.

    ``zoom(grid_mode=True)`` evaluates ``((k + 0.5) * zoom) - 0.5`` with ``zoom = n_in / n_out``; nnU-Net's
    map_coordinates grid is ``scale * (k + 0.5) - 0.5`` with the same scale, which is the same product.
    """
    zoom = n_in / n_out if n_out else 1.0
    return (np.arange(n_out, dtype=np.float64) + 0.5) * zoom - 0.5


@functools.lru_cache(maxsize=256)
def _taps(n_in: int, n_out: int, order: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Input indices and spline weights of one axis, cached per ``(n_in, n_out, order)`` (read-only arrays).

    Returns ``idx`` (order + 1, n_out) and ``w`` (order + 1, n_out) float64, or ``None`` for order 0. For
    order 3 the indices address the line pre-padded by 12 edge samples on each side (length n_in + 24).
    Start index, weights and the clamping of indices outside the line follow scipy's ``NI_ZoomShift`` and
    ``get_spline_interpolation_weights`` for mode 'nearest' (the coordinate itself is not clamped).
    """
    cc = _source_coordinates(n_in, n_out)
    w: np.ndarray | None
    if order == 0:
        length = n_in
        start = np.floor(cc + 0.5).astype(np.intp)
        w = None
    elif order == 1:
        length = n_in
        floor = np.floor(cc)
        start = floor.astype(np.intp)
        w0 = 1.0 - (cc - floor)
        w = np.stack([w0, 1.0 - w0], axis=1)
    elif order == 3:
        length = n_in + 2 * _NPAD
        cc = cc + float(_NPAD)
        floor = np.floor(cc)
        start = floor.astype(np.intp) - 1
        y = cc - floor
        z = 1.0 - y
        w1 = (y * y * (y - 2.0) * 3.0 + 4.0) / 6.0
        w2 = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0
        w0 = z * z * z / 6.0
        w = np.stack([w0, w1, w2, 1.0 - w0 - w1 - w2], axis=1)
    else:
        raise ValueError(f"spline order must be one of {SUPPORTED_ORDERS}, got {order}")
    idx = np.ascontiguousarray(np.clip(start[None, :] + np.arange(order + 1)[:, None], 0, length - 1))
    idx.flags.writeable = False
    if w is not None:
        w = np.ascontiguousarray(w.T)
        w.flags.writeable = False
    return idx, w


def _prefilter_lines(c: np.ndarray) -> None:
    """scipy's cubic B-spline prefilter along axis 0 of float64 ``c`` (L, ...), in place.

    Every column is an independent line, filtered with the float operations of ``apply_filter`` in scipy's
    ni_splines.c for mode 'nearest' (gain, ``_init_causal_reflect``, causal pass, ``_init_anticausal_reflect``,
    anticausal pass).
    """
    z = _CUBIC_POLE
    n = c.shape[0]
    c *= (1.0 - z) * (1.0 - 1.0 / z)
    if n < 2:
        return
    tmp = np.empty_like(c[0])
    z_i = z
    z_n = z**n
    c0 = c[0].copy()
    acc = c[0] + z_n * c[n - 1]
    for i in range(1, n):
        np.multiply(c[n - 1 - i], z_n, out=tmp)
        tmp += c[i]
        tmp *= z_i
        acc += tmp
        z_i *= z
    acc *= z / (1 - z_n * z_n)
    acc += c0
    c[0] = acc
    for i in range(1, n):
        np.multiply(c[i - 1], z, out=tmp)
        c[i] += tmp
    c[n - 1] *= z / (z - 1)
    for i in range(n - 2, -1, -1):
        np.subtract(c[i + 1], c[i], out=tmp)
        np.multiply(tmp, z, out=c[i])


def _prefilter_axis(c: np.ndarray, axis: int) -> None:
    """Cubic prefilter of float64 ``c`` along ``axis``, in place; other axes are worked through in blocks."""
    if axis == 0:
        _prefilter_lines(c)
        return
    per_index = math.prod(c.shape[1:])
    step = max(1, _BLOCK_ELEMENTS // max(per_index, 1))
    for begin in range(0, c.shape[0], step):
        block = c[begin : begin + step]
        lines = np.ascontiguousarray(np.moveaxis(block, axis, 0))
        _prefilter_lines(lines)
        np.moveaxis(block, axis, 0)[...] = lines


def _spline_coefficients(x: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """``spline_filter(np.pad(x, 12, mode='edge'), 3, mode='nearest')`` restricted to ``axes``, as float64.

    Pads by 12 edge samples along each axis in ``axes`` and prefilters along them in increasing axis order.
    """
    padded_shape = [s + 2 * _NPAD if a in axes else s for a, s in enumerate(x.shape)]
    c = np.empty(padded_shape, dtype=np.float64)
    c[tuple(slice(_NPAD, _NPAD + s) if a in axes else slice(None) for a, s in enumerate(x.shape))] = x
    for a in axes:  # edge padding one axis after the other, as np.pad does
        n = x.shape[a]
        c[_index(c.ndim, a, slice(0, _NPAD))] = c[_index(c.ndim, a, slice(_NPAD, _NPAD + 1))]
        c[_index(c.ndim, a, slice(_NPAD + n, None))] = c[_index(c.ndim, a, slice(_NPAD + n - 1, _NPAD + n))]
    for a in sorted(axes):
        _prefilter_axis(c, a)
    return c


def _index(ndim: int, axis: int, item: slice) -> tuple[slice, ...]:
    return (slice(None),) * axis + (item,) + (slice(None),) * (ndim - axis - 1)


def _weights_shape(ndim: int, axis: int, n: int) -> tuple[int, ...]:
    return (1,) * axis + (n,) + (1,) * (ndim - axis - 1)


def _accumulate_terms(
    src: np.ndarray,
    dest: np.ndarray,
    axes: Sequence[int],
    taps: Sequence[tuple[np.ndarray, np.ndarray | None]],
    chunk: slice,
) -> None:
    """Write into float64 ``dest`` the spline sum over the taps of ``src``, in scipy's order of operations.

    scipy evaluates every output sample as ``t = 0.0; t += ((v * w_a) * w_b) * ...`` over the neighbours in
    lexicographic order (last axis fastest); order 0 adds the neighbour itself. The same products and
    additions are done here, vectorised over all output samples, depth first over the taps. ``chunk``
    selects the output samples of the first axis that ``dest`` holds.
    """
    leaf = np.empty(dest.shape, dtype=np.float64)  # reused buffer for the last-level terms
    _descend(0, src, dest, leaf, axes, taps, chunk, [False])


def _descend(level: int, arr: np.ndarray, dest: np.ndarray, leaf: np.ndarray, axes: Sequence[int],
             taps: Sequence[tuple[np.ndarray, np.ndarray | None]], chunk: slice, started: list[bool]) -> None:
    """One level of :func:`_accumulate_terms`: depth first, taps in order, so only one term per level is alive
    at a time (a module-level function: a recursive closure would keep the buffers alive in a reference cycle)."""
    axis = axes[level]
    idx, w = taps[level]
    if level == 0:
        idx = idx[:, chunk]
        w = None if w is None else w[:, chunk]
    shape = _weights_shape(arr.ndim, axis, idx.shape[1])
    last = level == len(axes) - 1
    for tap in range(idx.shape[0]):
        # indices are already clamped; mode="clip" spares numpy's bounds-checking copy
        if last and arr.dtype == np.float64:
            term = np.take(arr, idx[tap], axis=axis, out=leaf, mode="clip")
        else:
            term = np.take(arr, idx[tap], axis=axis, mode="clip")
        if w is not None:
            weight = w[tap].reshape(shape)
            if term.dtype == np.float64:
                term *= weight
            else:
                term = np.multiply(term, weight, dtype=np.float64)
        if not last:
            _descend(level + 1, term, dest, leaf, axes, taps, chunk, started)
        elif started[0]:
            dest += term
        else:
            dest[...] = term
            dest += 0.0  # t = 0.0 + first term (turns -0.0 into +0.0, like scipy)
            started[0] = True
        del term


def _spline_zoom(x: np.ndarray, target: Sequence[int], axes: tuple[int, ...], order: int, *,
                 out: np.ndarray | None = None, clip: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``scipy.ndimage.zoom(mode='nearest', grid_mode=True)`` of ``x`` over ``axes`` (increasing) to ``target``.

    ``x`` has any real dtype (read as float64, like nnU-Net's ``astype(float)``); ``target`` gives the output
    length of every axis (entries of axes not in ``axes`` must equal ``x.shape``). Returns a new float64
    array, bit-identical to scipy's.

    With ``out`` (the output shape, any dtype) the float64 samples are computed chunk by chunk along
    ``axes[0]``, clipped to ``clip = (lo, hi)`` if given (arrays of size 1 along every axis in ``axes``) and
    cast into ``out``, which is returned: the same values as clipping and casting the whole float64 result,
    without holding it (the resampling back of a full-size volume in slabs).
    """
    src = _spline_coefficients(x, axes) if order == 3 else x
    taps = [_taps(x.shape[a], target[a], order) for a in axes]
    out_shape = tuple(target[a] if a in axes else s for a, s in enumerate(x.shape))
    if out is not None and tuple(out.shape) != out_shape:
        raise ValueError(f"out has shape {out.shape}, expected {out_shape}")
    y = np.empty(out_shape, dtype=np.float64) if out is None else out
    if y.size == 0:
        return y
    first = axes[0]
    per_index = y.size // out_shape[first]
    step = max(1, _CHUNK_ELEMENTS // max(per_index, 1))
    for begin in range(0, out_shape[first], step):
        chunk = slice(begin, begin + step)
        if out is None:
            _accumulate_terms(src, y[_index(y.ndim, first, chunk)], axes, taps, chunk)
            continue
        where = _index(y.ndim, first, chunk)
        part = np.empty(y[where].shape, dtype=np.float64)
        _accumulate_terms(src, part, axes, taps, chunk)
        if clip is not None:
            np.clip(part, clip[0].astype(np.float64), clip[1].astype(np.float64), out=part)
        y[where] = part
    return y


def _clip_bounds(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """skimage ``_clip_warp_output`` bounds: min/max of the input, NaN-aware when the input holds NaN.

    Reduced over ``axes`` (keepdims), i.e. one range per resized image (volume or 2D slice).
    """
    lo = np.min(x, axis=axes, keepdims=True)
    hi = np.max(x, axis=axes, keepdims=True)
    nan = np.isnan(lo)
    if np.any(nan):
        # only the images that hold NaN use nanmin/nanmax (skimage decides per resized image)
        nan_lo = np.nanmin(x, axis=axes, keepdims=True)
        nan_hi = np.nanmax(x, axis=axes, keepdims=True)
        lo = np.where(nan, nan_lo, lo)
        hi = np.where(nan, nan_hi, hi)
    return lo, hi


def _check_order(name: str, order: int) -> int:
    order = operator.index(order)
    if order not in SUPPORTED_ORDERS:
        raise ValueError(f"{name} must be one of {SUPPORTED_ORDERS}, got {order}")
    return order


def resample_to_shape(
    data: npt.ArrayLike,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    order: int,
    order_z: int = 0,
    force_separate_z: bool | None = None,
    anisotropy_threshold: float = 3.0,
) -> np.ndarray:
    """Resample a (c, a0, a1, a2) image to (c, *new_shape) like nnU-Net's ``resample_data_or_seg_to_shape``.

    Reproduces ``resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg=False,
    order=order, order_z=order_z, force_separate_z=force_separate_z,
    separate_z_anisotropy_threshold=anisotropy_threshold)`` of nnU-Net v2.8.1:

    * if ``data.shape[1:] == new_shape`` the input is returned unchanged (same object);
    * otherwise every channel is converted to float64 and resampled, and the result has ``data.dtype``;
    * without separate z: one ``order`` spline zoom of the whole channel volume, clipped to the channel's
      input range (skimage ``resize(mode='edge', anti_aliasing=False)``);
    * with separate z (see :func:`determine_separate_z`): each 2D slice across the low-resolution axis is
      zoomed with ``order`` and clipped to that slice's range, then the low-resolution axis is resampled
      with ``order_z`` (``map_coordinates(mode='nearest')``, no clipping) if its length changes.

    ``current_spacing``/``new_spacing`` only drive the separate-z decision; spacings and shapes are in the
    array's axis order. ``order`` and ``order_z`` are spline orders 0, 1 or 3 (nnU-Net uses 3 for images, 1
    for probabilities/logits and 0 along z).

    The result is bit-identical to nnU-Net's (NaN/inf propagation and signed zeros included). Channels are
    processed one at a time; besides the output, one channel needs a float64 copy of its input (edge-padded
    by 12 samples per resampled axis for order 3) and a float64 result of the output size.
    """
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must have shape (c, a0, a1, a2), got shape {data.shape}")
    target = tuple(operator.index(s) for s in new_shape)
    if len(target) != 3:
        raise ValueError(f"new_shape must have 3 entries, got {tuple(new_shape)}")
    if any(s < 0 for s in target):
        raise ValueError(f"new_shape must be non-negative, got {target}")
    order = _check_order("order", order)
    order_z = _check_order("order_z", order_z)
    do_separate_z, axis = determine_separate_z(
        current_spacing, new_spacing, force_separate_z=force_separate_z, anisotropy_threshold=anisotropy_threshold
    )
    shape = tuple(int(s) for s in data.shape[1:])
    if shape == target:
        return data
    if 0 in shape:
        raise ValueError(f"cannot resample an image with an empty axis, shape {data.shape}")

    out = np.zeros((data.shape[0], *target), dtype=data.dtype)
    with np.errstate(invalid="ignore", over="ignore"):  # scipy's C code propagates NaN/inf silently
        for c in range(data.shape[0]):
            view = out[c]
            result = _resample_channel(
                data[c], target, do_separate_z=do_separate_z, axis=axis, order=order, order_z=order_z, out=view
            )
            if result is not view:  # the input itself (nothing to resample along the remaining axes)
                view[...] = result
    return out


def _resample_channel(
    channel: np.ndarray, target: tuple[int, ...], *, do_separate_z: bool, axis: int | None, order: int, order_z: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """One channel (a0, a1, a2) of :func:`resample_to_shape`, as float64 (or the input itself, unchanged).

    With ``out`` (the channel's output view) the last zoom writes into it in slabs and ``out`` is returned
    (no float64 array of the output size); intermediate steps of the separate-z path stay float64, as in
    nnU-Net.
    """
    shape = channel.shape
    if not do_separate_z or axis is None:
        return _resize(channel, target, (0, 1, 2), order, out=out)
    in_plane = tuple(a for a in range(3) if a != axis)
    last_step_is_inplane = shape[axis] == target[axis]
    if any(shape[a] != target[a] for a in in_plane):
        resized = _resize(channel, (*target[:axis], shape[axis], *target[axis + 1 :]), in_plane, order,
                          out=out if last_step_is_inplane else None)
    else:
        resized = channel  # zoom factors of 1: skimage/scipy return every slice unchanged
    if last_step_is_inplane:
        return resized
    if order_z == 0:
        # order 0 takes the in-plane sample itself: only the z taps matter
        return _spline_zoom(resized, target, (axis,), 0, out=out)
    # map_coordinates on the full grid: the in-plane axes are sampled at integer positions (weights 1 and 0
    # for order 1, which still propagate NaN/inf; prefiltered for order 3)
    return _spline_zoom(resized, target, (0, 1, 2), order_z, out=out)


def _resize(image: np.ndarray, target: Sequence[int], axes: tuple[int, ...], order: int, *,
            out: np.ndarray | None = None) -> np.ndarray:
    """skimage ``resize(mode='edge', anti_aliasing=False)`` of every image spanned by ``axes``, float64 (or
    clipped and cast into ``out`` slab by slab, see :func:`_spline_zoom`).

    The spline zoom over ``axes`` is clipped to the value range of each input image (the whole volume, or
    each 2D slice when ``axes`` leaves one axis out).
    """
    lo, hi = _clip_bounds(image, axes)
    if out is not None:
        return _spline_zoom(image, target, axes, order, out=out, clip=(lo, hi))
    resized = _spline_zoom(image, target, axes, order)
    np.clip(resized, lo.astype(np.float64), hi.astype(np.float64), out=resized)
    return resized
