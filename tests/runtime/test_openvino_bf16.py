"""OpenVINO's fused head compiled apart from the network, and the bf16 precision it makes possible.

The fp32 engine: ``run`` against OpenVINO compiling the whole bundle (``rtol = 1e-6``), ``run_network`` (the
mirrored flips) without the head. bf16: the network in bf16, the head in fp32.

Oracles and tolerances (the shipped 2-fold demo bundle, random patches):

* the head: the bf16 engine's ``distance`` equals onnxruntime's fp32 head run on the features of the bf16
  network, ``rtol = 1e-5`` (OpenVINO's fp32 head is 1.3e-6 from onnxruntime's; the same head compiled in bf16
  is 7e-5 off, so a head that slipped into bf16 fails this);
* what OpenVINO reports it runs (its runtime model): every convolution of the network in bf16, every node of
  the head in f32;
* against the fp32 engine: distances ``rtol = 1e-2``, logits ``max |Δ| <= 2e-2 * max |fp32|`` (bf16 keeps 8
  mantissa bits: 0.0068 of the logit scale measured).

The bf16 tests skip where OpenVINO is missing or the CPU has no native bf16 (AVX512_BF16 / AMX).
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from factory import skip_without_native_bf16
from segsentry.bench import head_only, network_only
from segsentry.demo import demo_bundle_path
from segsentry.errors import BackendError
from segsentry.runtime.backends import BackendOptions, create_backend
from segsentry.runtime.bundle import load_bundle


@pytest.fixture(scope="module")
def demo():
    return load_bundle(demo_bundle_path())


def _engine(bundle, precision: str | None, name: str = "openvino"):
    m = bundle.manifest
    return create_backend(name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size, manifest=m,
                          options=BackendOptions(precision=precision))


def _patches(bundle, n: int = 2) -> np.ndarray:
    m = bundle.manifest
    return np.random.default_rng(0).standard_normal((n, m.num_channels, *m.patch_size)).astype(np.float32)


def _runtime_precisions(compiled) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        counts[(info["layerType"].astype(str), info["runtimePrecision"].astype(str))] += 1
    return counts


def _whole_graph(bundle, x: np.ndarray) -> dict[str, np.ndarray]:
    """The bundle compiled whole by OpenVINO in f32 (the engine's one-patch shape), patch by patch."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(model=bundle.model_bytes)
    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape([1, *x.shape[1:]])})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    per_patch = []
    for i in range(len(x)):
        result = request.infer({0: x[i:i + 1]})
        per_patch.append({port.get_any_name(): np.array(result[port], copy=True) for port in compiled.outputs})
    return {name: np.concatenate([p[name] for p in per_patch]) for name in per_patch[0]}


def test_fp32_head_apart_equals_the_whole_graph(demo):
    """The fp32 engine holds the head apart so mirrored flips can skip it: ``run`` equals OpenVINO's whole-graph
    compile (bit for bit measured on the demo; ``rtol = 1e-6`` stated), ``run_network`` gives the same logits and
    the pooled features but no distance."""
    pytest.importorskip("openvino")
    x = _patches(demo)
    with _engine(demo, None) as engine:
        assert engine.head_apart and sorted(engine._boundary) == ["features", "tap1/features"]
        got = engine.run(x)
        network = engine.run_network(x)
    whole = _whole_graph(demo, x)
    assert sorted(got) == sorted(whole) == ["distance", "distance_tap1", "logits"]
    for name in whole:
        np.testing.assert_allclose(got[name], whole[name], rtol=1e-6, atol=0, err_msg=name)
    assert sorted(network) == ["features", "logits", "tap1/features"]
    np.testing.assert_array_equal(network["logits"], got["logits"])


def test_bf16_network_with_an_fp32_head(demo):
    skip_without_native_bf16()
    import onnxruntime as ort

    x = _patches(demo)
    with _engine(demo, "bf16") as engine:
        assert engine.precision == "bf16"
        got = engine.run(x)
        network_outputs = engine.run_network(x)
        network = _runtime_precisions(engine.compiled)
        head = _runtime_precisions(engine._head)
    assert sorted(got) == ["distance", "distance_tap1", "logits"]  # the shipped bundle fuses two taps
    assert network[("Convolution", "bf16")] > 0 and network[("Convolution", "f32")] == 0
    computing = {k: v for k, v in head.items() if k[0] not in ("Input", "Output", "Const")}
    assert computing and all(precision == "f32" for _, precision in computing), head

    np.testing.assert_array_equal(got["logits"], network_outputs["logits"])
    head_session = ort.InferenceSession(head_only(demo), providers=["CPUExecutionProvider"])
    feeds = {i.name: network_outputs[i.name] for i in head_session.get_inputs()}
    expected = head_session.run(["distance", "distance_tap1"], feeds)
    np.testing.assert_allclose(got["distance"], expected[0], rtol=1e-5)
    np.testing.assert_allclose(got["distance_tap1"], expected[1], rtol=1e-5)

    with _engine(demo, None) as fp32:
        assert fp32.precision == "fp32"
        reference = fp32.run(x)
    for name in ("distance", "distance_tap1"):
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-2, err_msg=name)
    scale = float(np.abs(reference["logits"]).max())
    assert float(np.abs(got["logits"] - reference["logits"]).max()) <= 2e-2 * scale


def test_split_head_leaves_a_model_without_head_whole(demo):
    ov = pytest.importorskip("openvino")
    from segsentry.runtime.backends.openvino import split_head

    model = ov.Core().read_model(model=network_only(demo))
    assert split_head(ov, model) == (model, None, [])
    with create_backend("openvino", network_only(demo), channels=demo.manifest.num_channels,
                        patch_size=demo.manifest.patch_size) as engine:
        assert not engine.head_apart and engine._head is None


def test_bf16_is_refused_where_the_cpu_has_no_native_bf16():
    from segsentry.runtime.backends.openvino import _require_native_bf16

    class NoBf16Core:
        def get_property(self, device, name):
            assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
            return ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]

    with pytest.raises(BackendError, match=r"needs a CPU with native bfloat16.*FP32, INT8.*precision 'fp32'"):
        _require_native_bf16(NoBf16Core())


@pytest.mark.parametrize("name", ["onnxruntime", "torch"])
def test_other_engines_refuse_bf16(demo, name):
    if name == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("dynamic_network_architectures")
    with pytest.raises(BackendError, match=rf"the {name} backend runs fp32.* not 'bf16'.*--backend openvino"):
        _engine(demo, "bf16", name=name)
