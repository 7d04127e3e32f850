"""The tensorrt backend: engine cache key, clear errors without TensorRT / cuda-python / a GPU, and GPU parity.

Run everywhere: :func:`engine_cache_path` (a pure function), the errors for a missing ``tensorrt`` or
``cuda-python`` and for a machine without a CUDA GPU (a stand-in ``cudart`` module, and cuda-python's own when
it is installed), and the loader and runner wired together against stand-ins for tensorrt and cuda-python
(build, cache, buffers, chunks, CUDA graph replay, close). The ``trt`` tests need TensorRT, cuda-python and a
CUDA GPU and skip with the reason otherwise; they have not run yet (no GPU on the development machine).

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
from segsentry.runtime.backends.tensorrt import TensorrtBackend, cuda_device_name, import_cudart
from segsentry.runtime.backends.tensorrt_loader import engine_cache_path
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


def _trt(bundle, *, cuda_graph: bool = True, workspace_bytes: int | None = None, **options) -> TensorrtBackend:
    m = bundle.manifest
    return TensorrtBackend(bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                           options=BackendOptions(**options), cuda_graph=cuda_graph, workspace_bytes=workspace_bytes)


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
    with caplog.at_level(logging.INFO, logger="segsentry.runtime.backends.tensorrt_loader"):
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


# -- the runner and loader against a stand-in TensorRT and cuda-python (runs everywhere) ----------------------------
#
# The stand-ins model only what segsentry calls: the builder records what it was asked to build and serializes
# the bundle's output names; the engine's outputs are the first three input values of each patch times
# (output index + 1); device and pinned memory are real host memory (ctypes), copies are memmove, and CUDA graph
# capture records the enqueued work to replay it. They check segsentry's own wiring (loader -> runner, cache,
# buffers, chunks, CUDA graph, close), not TensorRT's API.

class _FakeCuda:
    """A stand-in for cuda-python's runtime module, with real host memory behind every pointer."""

    def __init__(self) -> None:
        self.memory: dict[int, object] = {}
        self.capturing: list | None = None
        self.graph_launches = 0
        self.streams: set[int] = set()
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal=1)
        self.cudaStreamNonBlocking = 1

    def _alloc(self, nbytes):
        import ctypes

        buffer = ctypes.create_string_buffer(int(nbytes))
        self.memory[ctypes.addressof(buffer)] = buffer
        return 0, ctypes.addressof(buffer)

    cudaMalloc = cudaMallocHost = _alloc

    def cudaFree(self, pointer):
        del self.memory[int(pointer)]
        return (0,)

    cudaFreeHost = cudaFree

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetErrorString(self, err):
        return 0, b""

    def cudaGetDeviceProperties(self, device):
        return 0, types.SimpleNamespace(name=b"Fake GPU\0\0", major=9, minor=0)

    def cudaSetDevice(self, device):
        return (0,)

    def cudaStreamCreateWithFlags(self, flags):
        self.streams.add(77)
        return 0, 77

    def cudaStreamDestroy(self, stream):
        self.streams.discard(int(stream))
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        import ctypes

        ctypes.memmove(int(dst), int(src), int(nbytes))
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        graph, self.capturing = self.capturing, None
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        return 0, list(graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.graph_launches += 1
        for work in graph_exec:
            work()
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (0,)

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaGetLastError(self):
        return (0,)


def _fake_tensorrt(cuda: _FakeCuda) -> types.ModuleType:
    """A stand-in for the tensorrt module: builder, parser, runtime, engine and execution context."""
    import json

    from segsentry import _onnx_wire

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-fake"
    trt.builds = []  # one dict per build_serialized_network call
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.nptype = lambda dtype: np.float32

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self) -> None:
            pass

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs, self.parsed = flags, [], [], b""

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return types.SimpleNamespace(name=self.inputs[i])

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse(self, data):
            self.network.parsed, self.network.inputs = data, ["image"]
            self.network.outputs = list(_onnx_wire.graph_output_names(data))
            return True

    class Config:
        def __init__(self):
            self.cleared, self.pools, self.profiles = [], {}, []

        def clear_flag(self, flag):
            self.cleared.append(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Profile:
        def set_shape(self, name, low, opt, high):
            self.shapes = (name, tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            (profile,) = config.profiles
            trt.builds.append({"flags": network.flags, "parsed": network.parsed, "cleared": config.cleared,
                               "pools": dict(config.pools), "profile": profile.shapes})
            return b"ENGINE" + json.dumps({"outputs": network.outputs, "max_batch": profile.shapes[3][0]}).encode()

    class Context:
        def __init__(self, engine):
            self.engine, self.shape, self.addresses = engine, None, {}

        def set_input_shape(self, name, shape):
            if name != "image" or not 1 <= shape[0] <= self.engine.max_batch:
                return False
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return (self.shape[0], 3)

        def set_tensor_address(self, name, pointer):
            self.addresses[name] = int(pointer)
            return True

        def _compute(self, shape):
            import ctypes
            import math

            def view(name, dims):
                count = math.prod(dims)
                return np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses[name])).reshape(dims)

            inputs = view("image", shape).reshape(shape[0], -1)
            for k, name in enumerate(self.engine.outputs):
                view(name, (shape[0], 3))[:] = inputs[:, :3] * np.float32(k + 1)

        def execute_async_v3(self, stream):
            shape = self.shape
            if cuda.capturing is not None:
                cuda.capturing.append(lambda: self._compute(shape))
            else:
                self._compute(shape)
            return True

    class Engine:
        def __init__(self, spec):
            self.outputs, self.max_batch = spec["outputs"], spec["max_batch"]
            self.names = ["image", *self.outputs]
            self.num_io_tensors = len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "image" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return "float32"

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return Engine(json.loads(data[len(b"ENGINE"):])) if data.startswith(b"ENGINE") else None

    trt.ILogger, trt.OnnxParser, trt.Builder, trt.Runtime = ILogger, OnnxParser, Builder, Runtime
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    cuda = _FakeCuda()
    trt = _fake_tensorrt(cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
    return trt, cuda


def _expected(bundle, batch):
    from segsentry import _onnx_wire

    names = _onnx_wire.graph_output_names(bundle.model_bytes)
    flat = batch.reshape(batch.shape[0], -1)[:, :3]
    return {name: flat * np.float32(k + 1) for k, name in enumerate(names)}


def test_stand_in_tensorrt_builds_caches_runs_in_chunks_and_frees(ct_pipeline, fake_trt, tmp_path, caplog):
    trt, cuda = fake_trt
    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    with caplog.at_level(logging.INFO, logger="segsentry.runtime.backends"):
        with _create(bundle, precision="fp32", max_batch=2, cache_dir=tmp_path) as first:
            assert first.name == "tensorrt" and first.precision == "fp32" and first.max_batch == 2
            assert first.cache_path is not None and first.cache_path.is_file() and first.cache_path.parent == tmp_path
            assert first.cache_path.name.startswith("segsentry.trt-fp32-b2-")
            assert first._graph_exec is not None  # captured at max_batch
            for i, n in enumerate((1, 2, 5, 2)):
                batch = _batch(bundle, n, seed=i)
                got = first.run(batch)
                for name, value in _expected(bundle, batch).items():
                    np.testing.assert_array_equal(got[name], value, err_msg=f"n={n} {name}")
            assert cuda.graph_launches == 4  # n=2 twice and the two full chunks of n=5
            buffers = len(cuda.memory)
            assert buffers == 2 * (1 + len(first.output_names))  # device + pinned host per tensor
    (build,) = trt.builds
    assert build["parsed"] == bundle.model_bytes and build["flags"] == 1 and build["cleared"] == ["TF32"]
    assert build["profile"] == ("image", (1, m.num_channels, *m.patch_size), (2, m.num_channels, *m.patch_size),
                                (2, m.num_channels, *m.patch_size))
    assert build["pools"] == {}
    assert not cuda.memory and not cuda.streams  # close() freed every buffer and the stream
    first.close()  # twice is fine
    with pytest.raises(BackendError, match="was closed"):
        first.run(_batch(bundle, 1))
    assert "building the TensorRT engine" in caplog.text and "cached at" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segsentry.runtime.backends"):
        with _create(bundle, precision="fp32", max_batch=2, cache_dir=tmp_path) as second:
            assert second.cache_path == first.cache_path
    assert len(trt.builds) == 1 and "loaded from" in caplog.text  # reused, not rebuilt
    first.cache_path.write_bytes(b"not an engine")
    with _create(bundle, precision="fp32", max_batch=2, cache_dir=tmp_path):
        pass
    assert len(trt.builds) == 2 and first.cache_path.read_bytes().startswith(b"ENGINE")  # rebuilt, overwritten


def test_stand_in_tensorrt_defaults_fp16_graph_no_cache_and_no_cuda_graph(ct_pipeline, fake_trt, tmp_path):
    from segsentry.runtime.backends.fp16 import mixed_fp16_bytes

    trt, cuda = fake_trt
    bundle = load_bundle(ct_pipeline.ood_onnx)
    with _create(bundle) as engine:  # defaults: fp16, max batch 4, no cache
        assert engine.precision == "fp16" and engine.max_batch == 4 and engine.cache_path is None
    assert trt.builds[-1]["parsed"] == mixed_fp16_bytes(bundle.model_bytes, extra="trt")
    assert not any(tmp_path.iterdir())
    batch = _batch(bundle, 3)
    with _trt(bundle, precision="fp32", max_batch=2, cuda_graph=False, workspace_bytes=1 << 20) as plain:
        assert plain._graph_exec is None
        got = plain.run(batch)
    assert trt.builds[-1]["pools"] == {"WORKSPACE": 1 << 20}
    for name, value in _expected(bundle, batch).items():
        np.testing.assert_array_equal(got[name], value)
    assert cuda.graph_launches == 0 and not cuda.memory
    with _create(bundle, precision="fp32", cache_dir=tmp_path) as fp32, \
            _create(bundle, precision="fp16", cache_dir=tmp_path) as fp16:
        assert fp32.cache_path != fp16.cache_path and fp32.cache_path.parent == fp16.cache_path.parent


def test_stand_in_tensorrt_runs_on_when_the_cache_cannot_be_written(ct_pipeline, fake_trt, tmp_path, caplog):
    trt, _ = fake_trt
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bundle = load_bundle(ct_pipeline.ood_onnx)
    with caplog.at_level(logging.WARNING, logger="segsentry.runtime.backends"):
        with _create(bundle, precision="fp32", cache_dir=blocker / "engines") as engine:
            assert engine.cache_path.parent == blocker / "engines" and not engine.cache_path.exists()
            assert set(engine.run(_batch(bundle, 1))) == set(engine.output_names)
    assert "cannot write the TensorRT engine cache" in caplog.text and len(trt.builds) == 1


def test_loader_network_is_the_bundle_or_its_fp16_graph(ct_pipeline):
    from segsentry.runtime.backends.fp16 import mixed_fp16_bytes
    from segsentry.runtime.backends.tensorrt_loader import cache_path_for, network_bytes

    model = load_bundle(ct_pipeline.ood_onnx).model_bytes
    assert network_bytes(model, "fp32") is model
    assert network_bytes(model, "fp16") == mixed_fp16_bytes(model, extra="trt")
    key = {k: v for k, v in KEY.items() if k != "onnx_sha256"}
    assert cache_path_for(None, model, **key) is None
    from segsentry.manifest import weights_sha256

    assert cache_path_for(ct_pipeline.ood_onnx, model, **key) == engine_cache_path(
        ct_pipeline.ood_onnx, onnx_sha256=weights_sha256(model), **key)
