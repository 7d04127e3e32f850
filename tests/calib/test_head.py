"""fold_mahalanobis_head: the ONNX head run by onnxruntime against scikit-learn's mahalanobis()."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf

from segsentry.calib.gaussian import GaussianFit, fit_gaussian, squared_mahalanobis
from segsentry.calib.head import fold_mahalanobis_head, head_distance, head_initializer_bytes, head_initializers
from segsentry.contract import HEAD_SCOPE, HeadInitializer
from segsentry.errors import CalibrationError

SKLEARN = {"empirical": EmpiricalCovariance, "ledoit-wolf": LedoitWolf, "oas": OAS}
ESTIMATORS = tuple(SKLEARN)
# float32 head vs float64 sklearn: relative error of each distance
HEAD_RTOL = 1e-4


def make_data(n: int, d: int, *, seed: int = 0, n_test: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Correlated features with an offset mean, rounded to float32 (what a network emits), as float64."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d) + 0.5 * np.eye(d)
    offset = rng.normal(scale=3.0, size=d) + 2.0
    x = rng.normal(size=(n, d)) @ mixing + offset
    z = rng.normal(size=(n_test, d)) @ mixing * 1.5 + offset
    return x.astype(np.float32).astype(np.float64), z.astype(np.float32).astype(np.float64)


def tiny_model(d: int, *, opset: int = 18, features_dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x [batch, D] float32 -> logits = Relu(x), features = Identity(x) (or Cast(x) to float16)."""
    nodes = [helper.make_node("Relu", ["x"], ["logits"], name="relu")]
    if features_dtype == TensorProto.FLOAT:
        nodes.append(helper.make_node("Identity", ["x"], ["features"], name="feat"))
    else:
        nodes.append(helper.make_node("Cast", ["x"], ["features"], name="feat", to=features_dtype))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", d]),
            helper.make_tensor_value_info("features", features_dtype, ["batch", d]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    helper.set_model_props(model, {"segsentry.bundle": "test", "patch_size": "64,64,64"})
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"x": x.astype(np.float32)})))


def assert_distance_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=HEAD_RTOL, atol=0)


@pytest.mark.parametrize("n,d", [(200, 50), (40, 120), (300, 1000)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_head_matches_sklearn(n: int, d: int, estimator: str) -> None:
    x, z = make_data(n, d, seed=n + d)
    fit = fit_gaussian(x, estimator=estimator)
    ref = SKLEARN[estimator]().fit(x)
    folded = fold_mahalanobis_head(tiny_model(d), fit)
    out = run(folded, z)
    assert set(out) == {"logits", "distance"}
    assert_distance_close(out["distance"], ref.mahalanobis(z))
    np.testing.assert_allclose(out["distance"], squared_mahalanobis(fit, z), rtol=HEAD_RTOL)
    np.testing.assert_array_equal(out["logits"], np.maximum(z, 0).astype(np.float32))
    has_complement = n <= d and estimator != "empirical"
    assert any(node.name.startswith(HEAD_SCOPE + "complement") for node in folded.graph.node) == has_complement


@pytest.mark.parametrize("n,d", [(200, 50), (40, 120)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_head_large_distances(n: int, d: int, estimator: str) -> None:
    """Far-out patches (distances ~1e2..1e6) stay finite and accurate in the float32 head."""
    x, _ = make_data(n, d, seed=1)
    fit = fit_gaussian(x, estimator=estimator)
    ref = SKLEARN[estimator]().fit(x)
    rng = np.random.default_rng(2)
    mean = x.mean(axis=0)
    # mix of directions inside the training span and random ones, scaled to reach d ~ 1e6
    directions = np.concatenate([x[:8] - mean, rng.normal(size=(8, d))])
    base = ref.mahalanobis(mean + directions)
    scales = np.sqrt(np.geomspace(1e2, 1e6, len(directions)) / base)
    z = (mean + directions * scales[:, None]).astype(np.float32).astype(np.float64)
    expected = ref.mahalanobis(z)
    assert expected.max() > 5e5
    assert_distance_close(run(fold_mahalanobis_head(tiny_model(d), fit), z)["distance"], expected)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("estimator", ["empirical", "ledoit-wolf"])
def test_opset_variants(opset: int, estimator: str) -> None:
    x, z = make_data(40, 120, seed=4)
    fit = fit_gaussian(x, estimator=estimator)
    folded = fold_mahalanobis_head(tiny_model(120, opset=opset), fit)
    assert folded.opset_import[0].version == opset
    rss = [node for node in folded.graph.node if node.op_type == "ReduceSumSquare"]
    assert rss
    for node in rss:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if opset >= 18:
            assert "axes" not in attrs and len(node.input) == 2
        else:
            assert attrs["axes"] == [1] and len(node.input) == 1
        assert attrs["keepdims"] == 0
    ref = SKLEARN[estimator]().fit(x)
    assert_distance_close(run(folded, z)["distance"], ref.mahalanobis(z))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_float16_features(estimator: str) -> None:
    x, z = make_data(200, 50, seed=8)
    fit = fit_gaussian(x, estimator=estimator)
    folded = fold_mahalanobis_head(tiny_model(50, features_dtype=TensorProto.FLOAT16), fit, keep_features=True)
    casts = [node for node in folded.graph.node if node.op_type == "Cast" and node.name.startswith(HEAD_SCOPE)]
    assert len(casts) == 1 and casts[0].input[0] == "features"
    out = run(folded, z)
    assert out["features"].dtype == np.float16
    z16 = out["features"].astype(np.float64)  # the head sees the float16-rounded features
    ref = SKLEARN[estimator]().fit(x)
    assert_distance_close(out["distance"], ref.mahalanobis(z16))
    dist_vi = next(o for o in folded.graph.output if o.name == "distance")
    assert dist_vi.type.tensor_type.elem_type == TensorProto.FLOAT


def test_keep_features_and_input_untouched() -> None:
    x, z = make_data(200, 50, seed=3)
    fit = fit_gaussian(x, estimator="oas")
    model = tiny_model(50)
    before = model.SerializeToString()

    dropped = fold_mahalanobis_head(model, fit)
    assert [o.name for o in dropped.graph.output] == ["logits", "distance"]
    kept = fold_mahalanobis_head(model, fit, keep_features=True, distance_output="ood")
    assert [o.name for o in kept.graph.output] == ["logits", "features", "ood"]
    out = run(kept, z)
    np.testing.assert_array_equal(out["features"], z.astype(np.float32))
    np.testing.assert_allclose(out["ood"], run(dropped, z)["distance"], rtol=1e-6)

    assert model.SerializeToString() == before
    assert dropped is not model and kept is not model
    # the distance output keeps the symbolic batch dimension
    dim = dropped.graph.output[-1].type.tensor_type.shape.dim
    assert len(dim) == 1 and dim[0].dim_param == "batch"


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_initializers_metadata_and_names(estimator: str) -> None:
    x, _ = make_data(40, 120, seed=6)
    fit = fit_gaussian(x, estimator=estimator)
    model = tiny_model(120)
    folded = fold_mahalanobis_head(model, fit)
    props = {p.key: p.value for p in folded.metadata_props}
    assert props == {"segsentry.bundle": "test", "patch_size": "64,64,64"}
    assert folded.ir_version == model.ir_version
    head_nodes = folded.graph.node[len(model.graph.node) :]
    assert head_nodes and all(node.name.startswith(HEAD_SCOPE) for node in head_nodes)
    float_bytes = 0
    for init in folded.graph.initializer:
        assert init.name.startswith(HEAD_SCOPE)
        arr = numpy_helper.to_array(init)
        if init.name != HEAD_SCOPE + "axes":
            assert arr.dtype == np.float32
            float_bytes += arr.nbytes
    assert float_bytes == head_initializer_bytes(fit)
    onnx.checker.check_model(folded, full_check=True)


def test_errors() -> None:
    x, _ = make_data(100, 20, seed=0)
    fit = fit_gaussian(x)
    with pytest.raises(CalibrationError, match="no graph output named 'feat'"):
        fold_mahalanobis_head(tiny_model(20), fit, features_output="feat")
    with pytest.raises(CalibrationError, match="D=21"):
        fold_mahalanobis_head(tiny_model(21), fit)
    with pytest.raises(CalibrationError, match="logits"):
        fold_mahalanobis_head(tiny_model(20), fit, distance_output="logits")
    folded = fold_mahalanobis_head(tiny_model(20), fit, keep_features=True)
    with pytest.raises(CalibrationError, match="already contains an OOD head"):
        fold_mahalanobis_head(folded, fit, distance_output="distance2")
    with pytest.raises(CalibrationError, match="float32 or float16"):
        fold_mahalanobis_head(tiny_model(20, features_dtype=TensorProto.DOUBLE), fit)
    custom_only = tiny_model(20)
    custom_only.opset_import[0].domain = "com.example"
    with pytest.raises(CalibrationError, match="the OOD head needs the default ONNX domain"):
        fold_mahalanobis_head(custom_only, fit)


def test_fit_without_complement_has_no_basis_initializer() -> None:
    x, _ = make_data(200, 50, seed=0)
    fit = fit_gaussian(x, estimator="ledoit-wolf")
    assert isinstance(fit, GaussianFit) and fit.basis is None
    folded = fold_mahalanobis_head(tiny_model(50), fit)
    names = {init.name for init in folded.graph.initializer}
    assert names == {HeadInitializer.MEAN.tensor_name, HeadInitializer.COMPONENTS_T.tensor_name, HEAD_SCOPE + "axes"}


@pytest.mark.parametrize("n,d", [(200, 50), (40, 120)])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_head_initializers_are_the_graphs_and_give_its_distance(n: int, d: int, estimator: str) -> None:
    """What another implementation (the torch backend) reads by HeadInitializer name is the graph's head exactly,
    and the contract's formula on those arrays gives the ONNX distance."""
    x, z = make_data(n, d, seed=9)
    fit = fit_gaussian(x, estimator=estimator)
    folded = fold_mahalanobis_head(tiny_model(d), fit)
    stored = {init.name: numpy_helper.to_array(init) for init in folded.graph.initializer}
    arrays = head_initializers(fit)
    if n <= d and estimator != "empirical":
        expected_roles = [HeadInitializer.MEAN, HeadInitializer.BASIS, HeadInitializer.SPAN_SCALE,
                          HeadInitializer.COMPLEMENT_SCALE]
    else:
        expected_roles = [HeadInitializer.MEAN, HeadInitializer.COMPONENTS_T]
    assert list(arrays) == expected_roles
    assert [name for name in stored if name != HEAD_SCOPE + "axes"] == [r.tensor_name for r in expected_roles]
    for role, array in arrays.items():
        assert array.dtype == np.float32
        np.testing.assert_array_equal(stored[role.tensor_name], array)
    # the contract's formula, written out here on the stored arrays
    delta = z.astype(np.float32) - arrays[HeadInitializer.MEAN]
    if HeadInitializer.BASIS in arrays:
        coef = delta @ arrays[HeadInitializer.BASIS]
        y = coef * arrays[HeadInitializer.SPAN_SCALE]
        resid = delta - coef @ arrays[HeadInitializer.BASIS].T
        dist = np.sum(y * y, axis=1) + arrays[HeadInitializer.COMPLEMENT_SCALE] * np.sum(resid * resid, axis=1)
    else:
        y = delta @ arrays[HeadInitializer.COMPONENTS_T]
        dist = np.sum(y * y, axis=1)
    onnx_distance = run(folded, z)["distance"]
    np.testing.assert_allclose(onnx_distance, dist, rtol=1e-5)
    np.testing.assert_allclose(head_distance({r.value: a for r, a in arrays.items()}, z), dist, rtol=1e-5)
    assert_distance_close(onnx_distance, squared_mahalanobis(fit, z))


def test_complement_head_stores_the_basis_once_and_older_heads_still_read() -> None:
    """The compact head holds D x r + r floats for the span where older bundles held two D x r matrices
    (components_t = basis * span_scale); head_distance reads both forms to the same distance."""
    x, z = make_data(40, 120, seed=3)
    fit = fit_gaussian(x, estimator="ledoit-wolf")
    assert fit.has_complement
    arrays = {r.value: a for r, a in head_initializers(fit).items()}
    d, r = arrays["basis"].shape
    assert head_initializer_bytes(fit) == 4 * (d + d * r + r + 1)
    older = {k: v for k, v in arrays.items() if k != "span_scale"}
    older["components_t"] = fit.components.T.astype(np.float32)
    np.testing.assert_allclose(head_distance(older, z), head_distance(arrays, z), rtol=1e-5)
    assert_distance_close(head_distance(arrays, z), squared_mahalanobis(fit, z))


def test_a_whitening_outside_the_basis_is_refused() -> None:
    x, _ = make_data(40, 120, seed=3)
    fit = fit_gaussian(x, estimator="ledoit-wolf")
    mixed = fit.components.copy()
    mixed[0] += mixed[1]  # rows no longer orthogonal in the basis: not a diagonal whitening
    with pytest.raises(CalibrationError, match="not scaled columns of its basis"):
        head_initializers(dataclasses.replace(fit, components=mixed))


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("estimator", ["empirical", "ledoit-wolf"])
def test_l2_normalised_head_matches_sklearn_on_normalised_features(estimator: str, opset: int) -> None:
    """Mahalanobis++: the head divides each row by its L2 norm, then measures against the Gaussian fitted on the
    normalised training rows -- sklearn's fit and mahalanobis() on rows normalised with numpy are the oracle."""
    from segsentry.calib.gaussian import normalise_features

    x, z = make_data(200, 50, seed=4)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    np.testing.assert_allclose(normalise_features(x, "l2"), xn, rtol=1e-15)
    fit = fit_gaussian(normalise_features(x, "l2"), estimator=estimator)
    folded = fold_mahalanobis_head(tiny_model(50, opset=opset), fit, feature_norm="l2")
    out = run(folded, z)
    assert_distance_close(out["distance"], SKLEARN[estimator]().fit(xn).mahalanobis(zn))
    # scale invariance: a row times 7 is the same point on the sphere
    np.testing.assert_allclose(run(folded, 7 * z)["distance"], out["distance"], rtol=1e-5)
    assert any(node.op_type == "ReduceL2" and node.name.startswith(HEAD_SCOPE) for node in folded.graph.node)
    # an all-zero row does not divide by zero: it sits at the origin of the normalised space
    zero = run(folded, np.zeros((1, 50)))["distance"]
    assert np.isfinite(zero).all()
    np.testing.assert_allclose(zero, squared_mahalanobis(fit, np.zeros((1, 50))), rtol=HEAD_RTOL)
