"""The ort-gpu backend: clear errors without CUDA, device IO binding, and parity with onnxruntime CPU on a GPU.

Run everywhere: the error for an onnxruntime without the CUDA provider (on a CPU-only onnxruntime it is the
real one), the refusal of a session that lost the CUDA provider, the provider options, and
:class:`DeviceIoBinding` on onnxruntime's CPU device. The ``gpu`` tests need onnxruntime-gpu and a CUDA device
and skip with the reason otherwise; they have not run yet (no GPU on the development machine).

GPU tolerances (ort-gpu vs onnxruntime CPU, same inputs): ``fp32`` (TF32 off) as the CPU backends, logits and
features ``1e-3 * max(1, scale)``, distances ``rtol 1e-3``; ``fp16`` as the FP16 pass, ``2e-2`` and ``1e-2``.
"""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import numpy as np
import onnxruntime
import pytest

from segsentry.errors import BackendError, MissingDependencyError
from segsentry.runtime.backends import BackendOptions, create_backend, cuda_device_count
from segsentry.runtime.backends.fp16 import mixed_fp16_bytes
from segsentry.runtime.backends.ort_gpu import DeviceIoBinding, OrtGpuBackend
from segsentry.runtime.backends.ort_loader import CUDA_EP, TRT_EP, provider_list
from segsentry.runtime.bundle import load_bundle

REAL_SESSION = onnxruntime.InferenceSession
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 1e-2)}  # (logits/features of scale, distance rtol)


def _gpu(bundle, *, use_trt_ep: bool = False, **options) -> OrtGpuBackend:
    m = bundle.manifest
    return OrtGpuBackend(bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                         options=BackendOptions(**options), use_trt_ep=use_trt_ep)


def _batch(bundle, n: int, seed: int = 5) -> np.ndarray:
    m = bundle.manifest
    return np.random.default_rng(seed).standard_normal((n, m.num_channels, *m.patch_size)).astype(np.float32)


class SessionWithoutCuda:
    """A real CPU session that records how it was asked for and reports only the CPU provider as active."""

    created: ClassVar[list[dict]] = []

    def __init__(self, model, sess_options=None, providers=None):
        SessionWithoutCuda.created.append({"model": model, "providers": providers})
        self._session = REAL_SESSION(model, sess_options=sess_options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def __getattr__(self, name):
        return getattr(self._session, name)


# -- errors that run on any machine --------------------------------------------------------------------------

def test_cpu_only_onnxruntime_names_the_gpu_extra(ct_pipeline):
    """The real onnxruntime of a CPU machine has no CUDA provider: the error says what to install and why."""
    if CUDA_EP in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider (onnxruntime-gpu); the monkeypatched test covers it")
    with pytest.raises(MissingDependencyError) as info:
        _gpu(load_bundle(ct_pipeline.ood_onnx))
    message = str(info.value)
    assert info.value.extra == "gpu" and info.value.package == "onnxruntime-gpu"
    assert "pip install 'segsentry[gpu]'" in message and "NVIDIA CUDA GPU" in message


def test_missing_cuda_provider_through_create_backend(ct_pipeline, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    with pytest.raises(MissingDependencyError, match=r"ort-gpu backend.*pip install 'segsentry\[gpu\]'"):
        create_backend("ort-gpu", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size)


def test_tensorrt_provider_must_be_available_when_asked_for(ct_pipeline, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_EP, "CPUExecutionProvider"])
    with pytest.raises(MissingDependencyError, match="TensorRT provider"):
        _gpu(load_bundle(ct_pipeline.ood_onnx), use_trt_ep=True)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_session_that_lost_cuda_is_refused_not_run_on_the_cpu(precision, ct_pipeline, monkeypatch):
    """onnxruntime falls back to the CPU when CUDA fails to start; the backend must refuse that session."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_EP, TRT_EP, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", SessionWithoutCuda)
    SessionWithoutCuda.created.clear()
    bundle = load_bundle(ct_pipeline.ood_onnx)
    with pytest.raises(BackendError, match="could not start CUDAExecutionProvider.*Not falling back to the CPU"):
        _gpu(bundle, precision=precision, device=1)
    (asked,) = SessionWithoutCuda.created
    assert [name for name, _ in asked["providers"]] == [CUDA_EP]  # the CPU provider is never requested
    assert asked["providers"][0][1]["device_id"] == 1
    expected = bundle.model_bytes if precision == "fp32" else mixed_fp16_bytes(bundle.model_bytes, extra="gpu")
    assert asked["model"] == expected  # fp16 runs the mixed graph (FP32 normalisations and head)


def test_precision_is_checked(ct_pipeline):
    with pytest.raises(BackendError, match="precision must be one of fp32, fp16"):
        _gpu(load_bundle(ct_pipeline.ood_onnx), precision="int8")  # type: ignore[arg-type]


def test_provider_options(tmp_path):
    (cuda,) = provider_list(device_id=2, precision="fp32", use_trt_ep=False, cache_dir=None)
    assert cuda == (CUDA_EP, {"device_id": 2, "cudnn_conv_algo_search": "EXHAUSTIVE",
                              "cudnn_conv_use_max_workspace": "1", "use_tf32": "0"})
    trt, cuda_again = provider_list(device_id=0, precision="fp16", use_trt_ep=True, cache_dir=tmp_path)
    assert trt == (TRT_EP, {"device_id": 0, "trt_fp16_enable": False, "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(tmp_path)})
    assert cuda_again[0] == CUDA_EP
    beside_bundle = provider_list(device_id=0, precision="fp16", use_trt_ep=True, cache_dir=tmp_path / "m.ood.onnx")
    assert beside_bundle[0][1]["trt_engine_cache_path"] == str(tmp_path)
    assert "trt_engine_cache_enable" not in provider_list(device_id=0, precision="fp32", use_trt_ep=True,
                                                          cache_dir=None)[0][1]


# -- IO binding, on the CPU device ------------------------------------------------------------------------------

def test_device_io_binding_matches_session_run(ct_pipeline):
    """The binding code path (input OrtValue reused or reallocated, outputs bound and copied back) on 'cpu'."""
    bundle = load_bundle(ct_pipeline.features_kept_onnx)
    session = onnxruntime.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    io = DeviceIoBinding(onnxruntime, session, input_name="image", output_names=names, device_type="cpu")
    previous = None
    for i, n in enumerate((2, 2, 3, 1)):
        batch = _batch(bundle, n, seed=i)
        got = io.run(batch)
        ref = dict(zip(names, session.run(names, {"image": batch})))
        assert list(got) == names == ["logits", "features", "distance"]
        for name in names:
            assert got[name].shape == ref[name].shape and got[name].dtype == np.float32
            np.testing.assert_array_equal(got[name], ref[name])
        assert (io._input is previous) == (i == 1)  # same shape: updated in place; new shape: reallocated
        previous = io._input


class SessionClaimingCuda(SessionWithoutCuda):
    """A real CPU session that reports the CUDA provider as active (the loader's check passes)."""

    def get_providers(self):
        return [CUDA_EP]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_runner_wiring_with_a_session_that_claims_cuda(precision, ct_pipeline, monkeypatch):
    """Loader -> runner -> IO binding -> close, on the CPU: the session claims CUDA, the binding uses 'cpu'."""
    from segsentry.runtime.backends import ort_gpu

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA_EP, "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", SessionClaimingCuda)
    real_binding = ort_gpu.DeviceIoBinding
    monkeypatch.setattr(ort_gpu, "DeviceIoBinding",
                        lambda *args, **kwargs: real_binding(*args, **{**kwargs, "device_type": "cpu"}))
    SessionWithoutCuda.created.clear()
    bundle = load_bundle(ct_pipeline.ood_onnx)
    batch = _batch(bundle, 2)
    with _gpu(bundle, precision=precision, device=0, threads=1) as gpu:
        assert gpu.name == "ort-gpu" and gpu.precision == precision and gpu.device_id == 0
        assert gpu.output_names == ["logits", "distance"]
        got = gpu.run(batch)
        (asked,) = SessionWithoutCuda.created
        expected_model = bundle.model_bytes if precision == "fp32" else mixed_fp16_bytes(bundle.model_bytes,
                                                                                          extra="gpu")
        assert asked["model"] == expected_model and [n for n, _ in asked["providers"]] == [CUDA_EP]
        ref_session = REAL_SESSION(expected_model, providers=["CPUExecutionProvider"])
        ref = dict(zip(gpu.output_names, ref_session.run(gpu.output_names, {"image": batch})))
        for name in gpu.output_names:
            np.testing.assert_array_equal(got[name], ref[name])
    assert gpu.session is None
    with pytest.raises(BackendError, match="the ort-gpu backend was closed"):
        gpu.run(batch)


# -- on a CUDA GPU (never run yet) --------------------------------------------------------------------------------

@pytest.fixture
def cuda_ready():
    if CUDA_EP not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider (pip install 'segsentry[gpu]' on a CUDA machine)")
    if cuda_device_count() == 0:
        pytest.skip("no CUDA GPU on this machine")


def _assert_close(got, ref, precision, where):
    logit_tol, distance_rtol = TOLERANCES[precision]
    assert list(got) == list(ref), where
    for name, expected in ref.items():
        assert got[name].shape == expected.shape and got[name].dtype == np.float32, (where, name)
        if name == "distance":
            np.testing.assert_allclose(got[name], expected, rtol=distance_rtol, err_msg=f"{where}: {name}")
        else:
            scale = max(1.0, float(np.max(np.abs(expected))))
            assert float(np.max(np.abs(got[name] - expected))) <= logit_tol * scale, (where, name)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("bundle_attr", ["features_onnx", "ood_onnx", "features_kept_onnx"])
def test_gpu_matches_onnxruntime_cpu(precision, bundle_attr, ct_pipeline, cuda_ready):
    bundle = load_bundle(getattr(ct_pipeline, bundle_attr))
    m = bundle.manifest
    with create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels,
                        patch_size=m.patch_size) as cpu, _gpu(bundle, precision=precision) as gpu:
        assert gpu.session.get_providers()[0] == CUDA_EP
        for i, n in enumerate((2, 2, 1)):
            batch = _batch(bundle, n, seed=i)
            _assert_close(gpu.run(batch), cpu.run(batch), precision, f"{bundle_attr}/{precision}#{i}")


@pytest.mark.gpu
def test_gpu_with_tensorrt_provider(ct_pipeline, cuda_ready, tmp_path):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("onnxruntime's TensorRT provider needs the TensorRT libraries (pip install tensorrt)")
    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    batch = _batch(bundle, 2)
    with create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels,
                        patch_size=m.patch_size) as cpu, \
            _gpu(bundle, precision="fp16", use_trt_ep=True, cache_dir=tmp_path) as gpu:
        assert gpu.session.get_providers()[:2] == [TRT_EP, CUDA_EP]
        _assert_close(gpu.run(batch), cpu.run(batch), "fp16", "trt-ep")
    assert any(tmp_path.iterdir())  # the TensorRT provider cached its engine
