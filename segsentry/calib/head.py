"""Fold a fitted Gaussian into an ONNX graph as a Mahalanobis-distance head.

The graph output ``features`` (shape ``[batch, D]``, float32 or float16) is fed to::

    features -> [Cast float32] -> Sub(mu) -> MatMul(W^T) -> ReduceSumSquare(axis 1) --------------+-> distance
                                      \\-> MatMul(V) -> MatMul(V^T) -> Sub -> ReduceSumSquare -> Mul(c) -/ (Add)

giving the output ``distance`` (shape ``[batch]``, float32), the squared Mahalanobis distance of
:func:`segsentry.calib.gaussian.squared_mahalanobis`. The complement branch exists only for shrinkage fits
with ``N <= D``. All initializers are float32 and, like the nodes, are named ``ood_head/...``.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from segsentry.calib.gaussian import GaussianFit
from segsentry.errors import CalibrationError

logger = logging.getLogger(__name__)

PREFIX = "ood_head/"

__all__ = ["PREFIX", "fold_mahalanobis_head", "head_initializer_bytes"]

_FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}


def head_initializer_bytes(fit: GaussianFit) -> int:
    """Bytes the head's float32 initializers add to the model: ``4 * (D + k*D [+ D*r + 1])`` (+ tiny extras)."""
    d = fit.n_features
    n = d + fit.components.shape[0] * d
    if fit.basis is not None:
        n += d * fit.basis.shape[1] + 1
    return 4 * n


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise CalibrationError("The ONNX model imports no default-domain ('ai.onnx') opset; cannot add the OOD head.")


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    names.update(i.name for i in graph.input)
    names.update(o.name for o in graph.output)
    names.update(i.name for i in graph.initializer)
    names.update(i.name for i in graph.sparse_initializer if i.values.name)
    names.update(v.name for v in graph.value_info)
    for node in graph.node:
        names.update(node.output)
        if node.name:
            names.add(node.name)
    return names


def fold_mahalanobis_head(
    model: onnx.ModelProto,
    fit: GaussianFit,
    *,
    features_output: str = "features",
    distance_output: str = "distance",
    keep_features: bool = False,
) -> onnx.ModelProto:
    """Return a copy of ``model`` whose ``features`` output feeds a squared-Mahalanobis head.

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
            taken, or the model already contains an ``ood_head/`` head.
    """
    out_model = copy.deepcopy(model)
    graph = out_model.graph
    opset = _default_opset(out_model)

    outputs = {o.name: o for o in graph.output}
    if features_output not in outputs:
        raise CalibrationError(
            f"The ONNX model has no graph output named {features_output!r} (outputs: {sorted(outputs)}); "
            "export the network with its feature output to attach the OOD head."
        )
    feat_vi = outputs[features_output]
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

    existing = _all_names(graph)
    if distance_output in existing:
        raise CalibrationError(f"The ONNX model already has a value named {distance_output!r}.")
    if any(name.startswith(PREFIX) for name in existing):
        raise CalibrationError(f"The ONNX model already contains an OOD head (names starting with {PREFIX!r}).")

    def n(name: str) -> str:
        return PREFIX + name

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name=n(name)))
        return n(name)

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=n(output.removeprefix(PREFIX) + "_" + op), **attrs))
        return output

    def reduce_sum_square(x: str, out: str) -> str:
        if opset >= 18:
            return node("ReduceSumSquare", [x, axes_name], out, keepdims=0)
        return node("ReduceSumSquare", [x], out, axes=[1], keepdims=0)

    axes_name = const("axes", np.array([1], dtype=np.int64)) if opset >= 18 else ""

    z = features_output
    if elem != TensorProto.FLOAT:
        z = node("Cast", [z], n("features_f32"), to=TensorProto.FLOAT)
    mu = const("mean", fit.mean.astype(np.float32))
    w_t = const("components_t", fit.components.T.astype(np.float32))  # (D, k)
    delta = node("Sub", [z, mu], n("delta"))
    y = node("MatMul", [delta, w_t], n("whitened"))
    has_complement = fit.basis is not None and fit.complement_scale != 0.0
    main = reduce_sum_square(y, distance_output if not has_complement else n("dist_span"))
    if has_complement:
        assert fit.basis is not None
        v = const("basis", fit.basis.astype(np.float32))  # (D, r)
        v_t = node("Transpose", [v], n("basis_t"), perm=[1, 0])  # constant-folded by runtimes
        coef = node("MatMul", [delta, v], n("basis_coef"))
        proj = node("MatMul", [coef, v_t], n("basis_proj"))
        resid = node("Sub", [delta, proj], n("complement"))
        rss = reduce_sum_square(resid, n("complement_sq"))
        scale = const("complement_scale", np.array(fit.complement_scale, dtype=np.float32))
        comp = node("Mul", [rss, scale], n("dist_complement"))
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

    try:
        onnx.checker.check_model(out_model)
    except onnx.checker.ValidationError as exc:  # pragma: no cover - would be a bug in this module
        raise CalibrationError(f"The ONNX model with the OOD head does not validate: {exc}") from exc
    logger.info(
        "Folded %s Mahalanobis head (D=%d, %d whitening rows%s, opset %d) onto output %r -> %r.",
        fit.estimator,
        fit.n_features,
        fit.components.shape[0],
        "" if not has_complement else f", complement basis of {fit.basis.shape[1]}",  # type: ignore[union-attr]
        opset,
        features_output,
        distance_output,
    )
    return out_model
