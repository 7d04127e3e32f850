"""Fold a fitted Gaussian into an ONNX graph as a Mahalanobis-distance head.

The graph output ``features`` (shape ``[batch, D]``, float32 or float16) is fed to::

    features -> [Cast float32] -> Sub(mu) -> MatMul(W^T) -> ReduceSumSquare(axis 1) -> distance

or, for shrinkage fits with ``N <= D`` (the training span's basis ``V`` stored once, its whitening one scale per
column)::

    features -> [Cast float32] -> Sub(mu) -> MatMul(V) -> Mul(span_scale) -> ReduceSumSquare ------------+-> distance
                                      \\                \\-> MatMul(V^T) -> Sub -> ReduceSumSquare -> Mul(c) -/ (Add)

giving the output ``distance`` (shape ``[batch]``, float32), the squared Mahalanobis distance of
:func:`segsentry.calib.gaussian.squared_mahalanobis`. The initializers are :func:`head_initializers` (float32,
named :class:`segsentry.contract.HeadInitializer` ``.tensor_name``, e.g. ``ood_head/mean``) plus, from opset
18, the int64 ``ood_head/axes``; like the nodes, everything is named under :data:`segsentry.contract.HEAD_SCOPE`.
:func:`head_distance` is the same formula in numpy on those arrays, for other readers of a bundle.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from segsentry.calib.gaussian import GaussianFit
from segsentry.contract import HEAD_SCOPE, L2_EPS, FeatureNorm, HeadInitializer, Output
from segsentry.errors import CalibrationError
from segsentry.graph import GraphIndex, check_model, has_head, require_opset

logger = logging.getLogger(__name__)

__all__ = ["fold_ensemble_head", "fold_mahalanobis_head", "head_distance", "head_initializer_bytes",
           "head_initializers"]

_FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}


def head_initializers(fit: GaussianFit) -> dict[HeadInitializer, np.ndarray]:
    """The head's float32 initializers, in the order the graph stores them.

    ``MEAN`` ``(D,)`` and ``COMPONENTS_T`` ``(D, k)``; or, when ``fit.has_complement``, ``MEAN``, ``BASIS``
    ``(D, r)``, ``SPAN_SCALE`` ``(r,)`` and ``COMPLEMENT_SCALE`` ``()`` -- the terms of the formula in
    :class:`segsentry.contract.HeadInitializer`.

    Raises:
        CalibrationError: a complement fit whose whitening rows are not scaled columns of its basis (every fit
            of :mod:`segsentry.calib.gaussian` is).
    """
    mean = fit.mean.astype(np.float32)
    if not fit.has_complement:
        return {HeadInitializer.MEAN: mean, HeadInitializer.COMPONENTS_T: fit.components.T.astype(np.float32)}
    assert fit.basis is not None  # has_complement says so
    return {
        HeadInitializer.MEAN: mean,
        HeadInitializer.BASIS: fit.basis.astype(np.float32),
        HeadInitializer.SPAN_SCALE: _span_scale(fit).astype(np.float32),
        HeadInitializer.COMPLEMENT_SCALE: np.array(fit.complement_scale, dtype=np.float32),
    }


def _span_scale(fit: GaussianFit) -> np.ndarray:
    """``s`` with ``W^T W = V diag(s^2) V^T`` on the span (float64), checked: the whitening rows ``W`` lie in the
    span of ``V`` and are diagonal in it, so that ``||W delta||^2 = ||(V^T delta) * s||^2`` exactly."""
    assert fit.basis is not None
    coef = fit.components @ fit.basis  # (k, r): W in the basis
    gram = coef.T @ coef  # (r, r): the precision on the span, in the basis
    s2 = np.clip(np.diagonal(gram), 0.0, None)
    top = float(s2.max(initial=0.0))
    off = gram - np.diag(np.diagonal(gram))
    outside = fit.components - coef @ fit.basis.T
    if np.abs(off).max(initial=0.0) > 1e-6 * top or \
            np.linalg.norm(outside) > 1e-6 * max(float(np.linalg.norm(fit.components)), 1e-300):
        raise CalibrationError("the fit's whitening rows are not scaled columns of its basis; the compact head "
                               "needs a fit from segsentry.calib.gaussian")
    return np.sqrt(s2)


def head_initializer_bytes(fit: GaussianFit) -> int:
    """Bytes the head's float32 initializers add to the model: ``4 * (D + k*D)``, or ``4 * (D + D*r + r + 1)``
    with a complement term (+ tiny extras)."""
    d = fit.n_features
    if fit.basis is None:
        return 4 * (d + fit.components.shape[0] * d)
    r = fit.basis.shape[1]
    return 4 * (d + d * r + r + 1)


def head_distance(arrays: Mapping[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    """The contract's formula (:class:`segsentry.contract.HeadInitializer`) in float32 numpy on a head's
    initializers keyed by role (``"mean"``, ...; a bundle's own or :func:`head_initializers`'), including the
    older form with ``components_t`` beside ``basis``. ``z``: ``(n, D)`` features, already ℓ2-normalised for a
    Mahalanobis++ head. Returns ``(n,)`` float32."""
    a = {str(k): np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    delta = np.asarray(z, dtype=np.float32) - a[HeadInitializer.MEAN.value]
    basis = a.get(HeadInitializer.BASIS.value)
    if HeadInitializer.COMPONENTS_T.value in a:
        y = delta @ a[HeadInitializer.COMPONENTS_T.value]
        coef = None if basis is None else delta @ basis
    else:
        if basis is None or HeadInitializer.SPAN_SCALE.value not in a:
            raise CalibrationError(f"a head needs {HeadInitializer.COMPONENTS_T.value!r} or "
                                   f"{HeadInitializer.BASIS.value!r} with {HeadInitializer.SPAN_SCALE.value!r}")
        coef = delta @ basis
        y = coef * a[HeadInitializer.SPAN_SCALE.value]
    dist = np.sum(y * y, axis=1)
    if coef is not None and HeadInitializer.COMPLEMENT_SCALE.value in a:
        resid = delta - coef @ basis.T  # type: ignore[union-attr]  # coef is set only with a basis
        dist = dist + a[HeadInitializer.COMPLEMENT_SCALE.value].reshape(()) * np.sum(resid * resid, axis=1)
    return dist.astype(np.float32)


def fold_mahalanobis_head(
    model: onnx.ModelProto,
    fit: GaussianFit,
    *,
    features_output: str = Output.FEATURES.value,
    distance_output: str = Output.DISTANCE.value,
    keep_features: bool = False,
    feature_norm: FeatureNorm | str = FeatureNorm.NONE,
    scope: str = HEAD_SCOPE,
) -> onnx.ModelProto:
    """Return a copy of ``model`` whose ``features`` output feeds a squared-Mahalanobis head.

    ``scope`` (default ``ood_head/``; ``ood_head/f<i>/`` for a fold ensemble's heads, see
    :func:`fold_ensemble_head`) prefixes every node and initializer name of the head.

    With ``feature_norm="l2"`` (Mahalanobis++) the head first divides each feature row by
    ``max(ReduceL2(row), L2_EPS)``, as :func:`segsentry.calib.gaussian.normalise_features` does before the fit.

    Args:
        model: ONNX model with a graph output ``features_output`` of shape ``[batch, D]`` (float32/float16).
            It is not modified.
        fit: the Gaussian fitted on training features of the same output (``fit.n_features == D``).
        features_output: name of the feature graph output.
        distance_output: name of the new graph output, shape ``[batch]`` float32.
        keep_features: keep ``features_output`` as a graph output too (default: drop it).

    Returns:
        A new, checked :class:`onnx.ModelProto` (same opset, IR version and ``metadata_props``).

    Raises:
        CalibrationError: the output is missing or has the wrong rank/dimension/type, the distance name is
            taken, the model imports no default-domain opset, or it already contains an ``ood_head/`` head.
    """
    out_model = copy.deepcopy(model)
    graph = out_model.graph
    opset = require_opset(out_model, purpose="the OOD head", error=CalibrationError)
    index = GraphIndex(graph)

    if features_output not in index.outputs:
        raise CalibrationError(
            f"The ONNX model has no graph output named {features_output!r} (outputs: {sorted(index.outputs)}); "
            "export the network with its feature output to attach the OOD head."
        )
    feat_vi = index.value_info(features_output)
    assert feat_vi is not None  # a graph output is declared
    ttype = feat_vi.type.tensor_type
    elem = ttype.elem_type
    if elem not in _FLOAT_TYPES:
        raise CalibrationError(
            f"Graph output {features_output!r} has element type "
            f"{TensorProto.DataType.Name(elem) if elem else 'unknown'}; expected float32 or float16."
        )
    batch_dim: onnx.TensorShapeProto.Dimension | None = None
    if ttype.HasField("shape"):
        dims = ttype.shape.dim
        if len(dims) != 2:
            raise CalibrationError(
                f"Graph output {features_output!r} has rank {len(dims)}; the OOD head expects [batch, D]."
            )
        if dims[1].HasField("dim_value") and dims[1].dim_value != fit.n_features:
            raise CalibrationError(
                f"Graph output {features_output!r} has D={dims[1].dim_value} features but the Gaussian was "
                f"fitted on D={fit.n_features}; calibrate with features from this model."
            )
        batch_dim = dims[0]

    if distance_output in index.names():
        raise CalibrationError(f"The ONNX model already has a value named {distance_output!r}.")
    if not scope.startswith(HEAD_SCOPE):
        raise CalibrationError(f"head scope {scope!r} must lie inside {HEAD_SCOPE!r}")
    if has_head(graph) if scope == HEAD_SCOPE else any(name.startswith(scope) for name in index.names()):
        raise CalibrationError(f"The ONNX model already contains an OOD head (names starting with {scope!r}).")

    def n(name: str) -> str:
        return scope + name

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name=name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=n(output.removeprefix(HEAD_SCOPE) + "_" + op),
                                      **attrs))
        return output

    def reduce_sum_square(x: str, out: str) -> str:
        if opset >= 18:
            return node("ReduceSumSquare", [x, axes_name], out, keepdims=0)
        return node("ReduceSumSquare", [x], out, axes=[1], keepdims=0)

    axes_name = const(n("axes"), np.array([1], dtype=np.int64)) if opset >= 18 else ""
    values = {role: const(scope + role.value, array) for role, array in head_initializers(fit).items()}

    z = features_output
    if elem != TensorProto.FLOAT:
        z = node("Cast", [z], n("features_f32"), to=TensorProto.FLOAT)
    if FeatureNorm(feature_norm) is FeatureNorm.L2:
        if opset >= 18:
            norm = node("ReduceL2", [z, axes_name], n("feature_norm"), keepdims=1)
        else:
            norm = node("ReduceL2", [z], n("feature_norm"), axes=[1], keepdims=1)
        floor = const(n("norm_floor"), np.array(L2_EPS, dtype=np.float32))
        norm = node("Max", [norm, floor], n("feature_norm_floored"))
        z = node("Div", [z, norm], n("features_l2"))
    delta = node("Sub", [z, values[HeadInitializer.MEAN]], n("delta"))
    if not fit.has_complement:
        y = node("MatMul", [delta, values[HeadInitializer.COMPONENTS_T]], n("whitened"))
        reduce_sum_square(y, distance_output)
    else:
        v = values[HeadInitializer.BASIS]  # (D, r)
        coef = node("MatMul", [delta, v], n("basis_coef"))
        y = node("Mul", [coef, values[HeadInitializer.SPAN_SCALE]], n("whitened"))
        main = reduce_sum_square(y, n("dist_span"))
        v_t = node("Transpose", [v], n("basis_t"), perm=[1, 0])  # constant-folded by runtimes
        proj = node("MatMul", [coef, v_t], n("basis_proj"))
        resid = node("Sub", [delta, proj], n("complement"))
        rss = reduce_sum_square(resid, n("complement_sq"))
        comp = node("Mul", [rss, values[HeadInitializer.COMPLEMENT_SCALE]], n("dist_complement"))
        node("Add", [main, comp], distance_output)

    graph.initializer.extend(inits)
    graph.node.extend(nodes)

    if batch_dim is None:
        dist_vi = helper.make_tensor_value_info(distance_output, TensorProto.FLOAT, None)
    else:
        dist_vi = helper.make_tensor_value_info(distance_output, TensorProto.FLOAT, [None])
        dist_vi.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
    if keep_features:
        graph.output.append(dist_vi)
    else:
        kept = [o for o in graph.output if o.name != features_output]
        # the feature tensor is still an intermediate value: keep its type for readers of the graph
        graph_inputs = {i.name for i in graph.input}
        if features_output not in graph_inputs and all(v.name != features_output for v in graph.value_info):
            graph.value_info.append(copy.deepcopy(feat_vi))
        del graph.output[:]
        graph.output.extend(kept)
        graph.output.append(dist_vi)

    check_model(out_model, message="The ONNX model with the OOD head does not validate", error=CalibrationError)
    logger.info(
        "Folded %s Mahalanobis head (D=%d, %d whitening rows%s, opset %d) onto output %r -> %r.",
        fit.estimator,
        fit.n_features,
        fit.components.shape[0],
        "" if not fit.has_complement else f", complement basis of {fit.basis.shape[1]}",  # type: ignore[union-attr]
        opset,
        features_output,
        distance_output,
    )
    return out_model


def fold_ensemble_head(
    model: onnx.ModelProto,
    fits: list[GaussianFit],
    *,
    features_output: str = Output.FEATURES.value,
    distance_output: str = Output.DISTANCE.value,
    keep_features: bool = False,
    feature_norm: FeatureNorm | str = FeatureNorm.NONE,
) -> onnx.ModelProto:
    """One Mahalanobis head per fold of an ensemble bundle, and their mean as ``distance``.

    ``features_output`` is ``[batch, folds, D]``; fold ``i``'s features (``Gather`` on axis 1) feed the head of
    :func:`fold_mahalanobis_head` fitted on them (``fits[i]``, scope ``ood_head/f<i>/``), and ``distance``
    ``[batch]`` float32 is ``Mean`` of the folds' squared distances. Each fold's head holds only its own
    Gaussian, so the head constants grow with the folds and are never duplicated.
    """
    out_model = copy.deepcopy(model)
    graph = out_model.graph
    index = GraphIndex(graph)
    if features_output not in index.outputs:
        raise CalibrationError(f"The ONNX model has no graph output named {features_output!r} "
                               f"(outputs: {sorted(index.outputs)}).")
    if has_head(graph):
        raise CalibrationError(f"The ONNX model already contains an OOD head (names starting with {HEAD_SCOPE!r}).")
    feat_vi = index.value_info(features_output)
    assert feat_vi is not None  # a graph output is declared
    ttype = feat_vi.type.tensor_type
    dims = ttype.shape.dim if ttype.HasField("shape") else []
    if len(dims) != 3 or not dims[1].HasField("dim_value") or dims[1].dim_value != len(fits):
        raise CalibrationError(f"Graph output {features_output!r} must be [batch, {len(fits)} folds, D] for "
                               f"{len(fits)} fitted Gaussians; it is {[d.dim_value or d.dim_param for d in dims]}.")
    ensemble = HEAD_SCOPE + "ensemble/"
    distances: list[str] = []
    for i, fit in enumerate(fits):
        index_name = f"{ensemble}fold{i}_index"
        graph.initializer.append(numpy_helper.from_array(np.array(i, dtype=np.int64), name=index_name))
        member = f"{ensemble}features_f{i}"
        graph.node.append(helper.make_node("Gather", [features_output, index_name], [member], axis=1,
                                           name=f"{ensemble}select_f{i}"))
        member_vi = helper.make_tensor_value_info(member, ttype.elem_type, [None, None])
        member_vi.type.tensor_type.shape.dim[0].CopyFrom(dims[0])
        member_vi.type.tensor_type.shape.dim[1].CopyFrom(dims[2])
        graph.output.append(member_vi)
        distances.append(f"{HEAD_SCOPE}f{i}/distance")
        out_model = fold_mahalanobis_head(out_model, fit, features_output=member, distance_output=distances[-1],
                                          keep_features=False, feature_norm=feature_norm, scope=f"{HEAD_SCOPE}f{i}/")
        graph = out_model.graph
    graph.node.append(helper.make_node("Mean", distances, [distance_output], name=f"{ensemble}mean_distance"))
    kept = [o for o in graph.output if o.name not in distances and (keep_features or o.name != features_output)]
    dist_vi = copy.deepcopy(next(o for o in graph.output if o.name == distances[0]))
    dist_vi.name = distance_output
    graph_inputs = {i.name for i in graph.input}
    if not keep_features and features_output not in graph_inputs \
            and all(v.name != features_output for v in graph.value_info):
        graph.value_info.append(copy.deepcopy(feat_vi))
    del graph.output[:]
    graph.output.extend([*kept, dist_vi])
    check_model(out_model, message="The ONNX model with the ensemble's OOD heads does not validate",
                error=CalibrationError)
    logger.info("Folded %d Mahalanobis heads (one per fold) onto %r -> Mean -> %r.", len(fits), features_output,
                distance_output)
    return out_model
