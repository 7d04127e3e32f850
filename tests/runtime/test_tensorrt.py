"""The tensorrt backend: engine cache key, clear errors without TensorRT / cuda-python / a GPU, and GPU parity.

Run everywhere: :func:`engine_cache_path` (a pure function), the errors for a missing ``tensorrt`` or
``cuda-python`` and for a machine without a CUDA GPU (a stand-in ``cudart`` module, and cuda-python's own when
it is installed). The ``trt`` tests need TensorRT, cuda-python and a CUDA GPU and skip with the reason
otherwise; they have not run yet (no GPU on the development machine).

GPU tolerances (tensorrt vs onnxruntime CPU, same inputs): ``fp32`` (TF32 off) logits and features
``1e-3 * max(1, scale)``, distances ``rtol 1e-3``; ``fp16`` (FP32 normalisations and head) ``2e-2`` and ``1e-2``,
as the FP16 pass on the CPU (tests/runtime/test_fp16.py).
"""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest

from segsentry.errors import BackendError, MissingDependencyError
from segsentry.runtime.backends import BackendOptions, create_backend, cuda_device_count
from segsentry.runtime.backends.tensorrt import (
    TensorrtBackend,
    cuda_device_name,
    engine_cache_path,
    import_cudart,
)
from segsentry.runtime.bundle import load_bundle

SHA = "ab" * 32
KEY = {"onnx_sha256": SHA, "trt_version": "10.13.0.35", "gpu_name": "NVIDIA H100 80GB HBM3 sm_90",
       "precision": "fp16", "max_batch": 4}
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 1e-2)}  # (logits/features of scale, distance rtol)
CUDA_MODULES = ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart")


def _create(bundle, name="tensorrt", **options):
    m = bundle.manifest
    return create_backend(name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                          options=BackendOptions(**options))


# -- the engine cache key ----------------------------------------------------------------------------------------

def test_engine_cache_path_beside_the_bundle(tmp_path):
    path = engine_cache_path(tmp_path / "lung.ood.onnx", **KEY)
    assert path.parent == tmp_path
    assert path.name.startswith("lung.ood.trt-fp16-b4-") and path.suffix == ".engine"
    assert path == engine_cache_path(tmp_path / "lung.ood.onnx", **KEY)  # deterministic
    assert engine_cache_path(str(tmp_path / "lung.ood.onnx"), **KEY) == path


def test_engine_cache_path_in_a_folder(tmp_path):
    path = engine_cache_path(tmp_path / "engines", **KEY)
    assert path.parent == tmp_path / "engines" and path.name.startswith("segsentry.trt-fp16-b4-")
    assert not (tmp_path / "engines").exists()  # pure: nothing is created or read


@pytest.mark.parametrize("field,other", [("onnx_sha256", "cd" * 32), ("trt_version", "10.13.0.36"),
                                         ("gpu_name", "NVIDIA H100 PCIe sm_90"), ("gpu_name", "NVIDIA A100 sm_80"),
                                         ("precision", "fp32"), ("max_batch", 8)])
def test_every_key_field_changes_the_engine_name(field, other, tmp_path):
    base = engine_cache_path(tmp_path, **KEY)
    changed = engine_cache_path(tmp_path, **{**KEY, field: other})
    assert changed != base and changed.parent == base.parent


@pytest.mark.parametrize("field,value,match", [("precision", "int8", "precision must be one of fp32, fp16"),
                                               ("max_batch", 0, "max batch must be at least 1"),
                                               ("onnx_sha256", "not-a-hash", "hex sha256")])
def test_engine_cache_path_checks_its_arguments(field, value, match, tmp_path):
    with pytest.raises(BackendError, match=match):
        engine_cache_path(tmp_path, **{**KEY, field: value})


# -- missing packages and no GPU -----------------------------------------------------------------------------------

def test_missing_tensorrt_names_the_trt_extra(ct_pipeline, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError) as info:
        _create(load_bundle(ct_pipeline.ood_onnx))
    assert info.value.extra == "trt" and info.value.package == "tensorrt"
    assert "The tensorrt backend needs" in str(info.value) and "pip install 'segsentry[trt]'" in str(info.value)


def test_missing_cuda_python_names_the_trt_extra(ct_pipeline, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # present, never reached
    for module in CUDA_MODULES:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError) as info:
        _create(load_bundle(ct_pipeline.ood_onnx))
    assert info.value.extra == "trt" and info.value.package == "cuda-python"


def _fake_cudart(*, error: int = 0, count: int = 0) -> types.ModuleType:
    """A stand-in for cuda-python's runtime module: enough for the device probe."""
    cudart = types.ModuleType("cuda.bindings.runtime")
    names = {0: "cudaSuccess", 35: "cudaErrorInsufficientDriver", 100: "cudaErrorNoDevice"}

    class Error(int):
        name = property(lambda self: names[int(self)])

    cudart.cudaGetDeviceCount = lambda: (Error(error), count)
    cudart.cudaGetErrorString = lambda err: (Error(0), b"no CUDA-capable device is detected")
    prop = types.SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\0\0\0", major=9, minor=0)
    cudart.cudaGetDeviceProperties = lambda device: (Error(0), prop)
    return cudart


def test_no_gpu_is_a_backend_error_before_anything_is_built(ct_pipeline, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # an empty module: never used
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_cudart(error=100))
    with pytest.raises(BackendError, match=r"needs an NVIDIA CUDA GPU, but CUDA reports none \(cudaErrorNoDevice"):
        _create(load_bundle(ct_pipeline.ood_onnx), cache_dir=None)


def test_cuda_device_name():
    assert cuda_device_name(_fake_cudart(count=2), 1) == "NVIDIA H100 80GB HBM3 sm_90"
    with pytest.raises(BackendError, match=r"CUDA reports none \(no device\)"):
        cuda_device_name(_fake_cudart(count=0), 0)
    with pytest.raises(BackendError, match="CUDA device 2 does not exist \\(this machine has 2\\)"):
        cuda_device_name(_fake_cudart(count=2), 2)


def test_no_gpu_with_the_real_cuda_python():
    """cuda-python's own answer on a machine without a GPU (or without an NVIDIA driver)."""
    try:
        cudart = import_cudart()
    except MissingDependencyError:
        pytest.skip("cuda-python is not installed (pip install 'segsentry[trt]')")
    if cuda_device_count() > 0:
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(BackendError, match="needs an NVIDIA CUDA GPU, but CUDA reports none"):
        cuda_device_name(cudart, 0)


# -- on a CUDA GPU with TensorRT (never run yet) --------------------------------------------------------------------

@pytest.fixture
def trt_ready():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install 'segsentry[trt]')")
    try:
        import_cudart()
    except MissingDependencyError:
        pytest.skip("cuda-python is not installed (pip install 'segsentry[trt]')")
    if cuda_device_count() == 0:
        pytest.skip("no CUDA GPU on this machine")


def _batch(bundle, n: int, seed: int = 9) -> np.ndarray:
    m = bundle.manifest
    return np.random.default_rng(seed).standard_normal((n, m.num_channels, *m.patch_size)).astype(np.float32)


def _assert_close(got, ref, precision, where):
    logit_tol, distance_rtol = TOLERANCES[precision]
    assert list(got) == list(ref), where
    for name, expected in ref.items():
        assert got[name].shape == expected.shape and got[name].dtype == np.float32, (where, name)
        assert np.all(np.isfinite(got[name])), (where, name)
        if name == "distance":
            np.testing.assert_allclose(got[name], expected, rtol=distance_rtol, err_msg=f"{where}: {name}")
        else:
            scale = max(1.0, float(np.max(np.abs(expected))))
            assert float(np.max(np.abs(got[name] - expected))) <= logit_tol * scale, (where, name)


def _trt(bundle, *, cuda_graph: bool = True, **options) -> TensorrtBackend:
    m = bundle.manifest
    return TensorrtBackend(bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                           options=BackendOptions(**options), cuda_graph=cuda_graph)


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("bundle_attr", ["features_onnx", "ood_onnx", "features_kept_onnx"])
def test_tensorrt_matches_onnxruntime_cpu(precision, bundle_attr, ct_pipeline, trt_ready):
    """Batches below, at and above the engine's max batch (2): plain execution, CUDA graph, and chunks."""
    bundle = load_bundle(getattr(ct_pipeline, bundle_attr))
    with _create(bundle, "onnxruntime") as cpu, _trt(bundle, precision=precision, max_batch=2) as trt:
        for i, n in enumerate((1, 2, 2, 5)):
            batch = _batch(bundle, n, seed=i)
            _assert_close(trt.run(batch), cpu.run(batch), precision, f"{bundle_attr}/{precision}#{i} (n={n})")


@pytest.mark.trt
def test_cuda_graph_replays_the_same_results(ct_pipeline, trt_ready):
    bundle = load_bundle(ct_pipeline.ood_onnx)
    batch = _batch(bundle, 2)
    with _trt(bundle, max_batch=2, cuda_graph=True) as graph, _trt(bundle, max_batch=2, cuda_graph=False) as plain:
        assert graph._graph_exec is not None and plain._graph_exec is None
        for name, value in plain.run(batch).items():
            np.testing.assert_allclose(graph.run(batch)[name], value, rtol=1e-6, atol=0, err_msg=name)


@pytest.mark.trt
def test_engine_cache_is_written_then_reused(ct_pipeline, trt_ready, tmp_path, caplog):
    bundle = load_bundle(ct_pipeline.ood_onnx)
    batch = _batch(bundle, 1)
    with caplog.at_level(logging.INFO, logger="segsentry.runtime.backends.tensorrt"):
        with _create(bundle, cache_dir=tmp_path) as first:
            expected = first.run(batch)
            path = first.cache_path
        assert path is not None and path.is_file() and path.parent == tmp_path
        caplog.clear()
        with _create(bundle, cache_dir=tmp_path) as second:
            assert second.cache_path == path
            for name, value in expected.items():
                np.testing.assert_array_equal(second.run(batch)[name], value)
    assert "loaded from" in caplog.text and "building" not in caplog.text
    path.write_bytes(b"not an engine")  # a broken cache is rebuilt, not fatal
    with _create(bundle, cache_dir=tmp_path) as third:
        assert third.run(batch).keys() == expected.keys()
    assert path.stat().st_size > 100


@pytest.mark.trt
def test_fp16_engine_keeps_distances_beyond_fp16_range(ct_pipeline, trt_ready):
    """A scaled head (distances > 65504) stays finite and accurate: the strongly typed head is FP32."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(ct_pipeline.ood_onnx))
    for init in model.graph.initializer:
        if init.name == "ood_head/components_t":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(100.0), init.name))
    data = model.SerializeToString()
    m = load_bundle(ct_pipeline.ood_onnx).manifest
    batch = _batch(load_bundle(ct_pipeline.ood_onnx), 2)
    with create_backend("onnxruntime", data, channels=m.num_channels, patch_size=m.patch_size) as cpu, \
            TensorrtBackend(data, channels=m.num_channels, patch_size=m.patch_size,
                            options=BackendOptions(precision="fp16")) as trt:
        ref = cpu.run(batch)
        assert ref["distance"].min() > 65504
        _assert_close(trt.run(batch), ref, "fp16", "scaled head")
