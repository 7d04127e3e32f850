"""Every backend that can run here agrees with onnxruntime CPU, and backend selection fails clearly.

Tolerances (``other`` vs onnxruntime, same inputs):

* logits and features: ``max |other - ort| <= 1e-3 * max(1, max |ort|)`` -- per patch, and on a whole case
  after nnU-Net's float16 Gaussian accumulation (one float16 ulp at |logit| in [4, 8) is 3.9e-3, still inside);
* distances (per patch, and the voxel distance map): ``rtol = 1e-3``;
* masks written by ``run_batch``: identical except at most ``max(2, 1e-4 * n_voxels)`` voxels (argmax ties).

The OpenVINO tests skip without ``openvino``; the torch tests skip without torch and
dynamic-network-architectures (the ``export`` extra).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import SimpleITK as sitk

from segsentry.contract import HeadInitializer
from segsentry.errors import BackendError, MissingDependencyError
from segsentry.runtime import backends
from segsentry.runtime.backends import (
    AUTO_ORDER,
    AVAILABLE,
    BACKENDS,
    GPU_BACKENDS,
    BackendBase,
    BackendOptions,
    create_backend,
    resolve_auto,
    resolve_backend_name,
)
from segsentry.runtime.bundle import Bundle, load_bundle

LOGIT_RTOL = 1e-3
DISTANCE_RTOL = 1e-3


def _requires(backend: str) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino")
    elif backend == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("dynamic_network_architectures")


OTHER_BACKENDS = ["openvino", "torch"]
BUNDLES = ["features_onnx", "ood_onnx", "features_kept_onnx"]


def _engine(name: str, bundle: Bundle, **kwargs):
    m = bundle.manifest
    return create_backend(name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                          manifest=m, **kwargs)


def assert_outputs_match(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], *, where: str) -> None:
    """Same output names, shapes and float32 dtype; logits/features within 1e-3 of scale, distances rtol 1e-3."""
    assert set(got) == set(expected), where
    for name, ref in expected.items():
        out = got[name]
        assert out.shape == ref.shape and out.dtype == np.float32, (where, name, out.shape, out.dtype)
        if name == "distance":
            np.testing.assert_allclose(out, ref, rtol=DISTANCE_RTOL, err_msg=f"{where}: {name}")
        else:
            diff = float(np.max(np.abs(out.astype(np.float64) - ref)))
            scale = float(np.max(np.abs(ref)))
            assert diff <= LOGIT_RTOL * max(1.0, scale), f"{where}: {name} differs by {diff:.3g} (scale {scale:.3g})"


# -- per-patch parity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bundle_attr", BUNDLES)
@pytest.mark.parametrize("kind", ["ct", "mr"])
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_patch_parity_with_onnxruntime(backend, kind, bundle_attr, request):
    _requires(backend)
    pipeline = request.getfixturevalue(f"{kind}_pipeline")
    bundle = load_bundle(getattr(pipeline, bundle_attr))
    m = bundle.manifest
    rng = np.random.default_rng(11)
    batches = [rng.standard_normal((n, m.num_channels, *m.patch_size)).astype(np.float32) for n in (3, 1, 2)]
    with _engine("onnxruntime", bundle) as ref, _engine(backend, bundle) as other:
        assert other.name == backend
        for i, batch in enumerate(batches):  # varying batch sizes: the batch axis is dynamic in every engine
            assert_outputs_match(other.run(batch), ref.run(batch), where=f"{backend}/{kind}/{bundle_attr}#{i}")


def _older_head(bundle: Bundle) -> Bundle:
    """The bundle as calibrated before the compact head (``components_t`` beside ``basis``)."""
    from segsentry.devtools.head_forms import older_head_form

    older = older_head_form(onnx.load_model_from_string(bundle.model_bytes))
    names = {i.name for i in older.graph.initializer}
    assert HeadInitializer.COMPONENTS_T.tensor_name in names and HeadInitializer.SPAN_SCALE.tensor_name not in names
    return dataclasses.replace(bundle, model_bytes=older.SerializeToString())


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_an_older_heads_distances_match_the_compact_heads(backend, ct_pipeline):
    """Bundles calibrated before the compact head (components_t beside basis) still run, on every engine, to the
    compact head's distances."""
    _requires(backend)
    bundle = load_bundle(ct_pipeline.ood_onnx)
    names = {i.name for i in onnx.load_model_from_string(bundle.model_bytes).graph.initializer}
    assert HeadInitializer.SPAN_SCALE.tensor_name in names and HeadInitializer.COMPONENTS_T.tensor_name not in names
    older = _older_head(bundle)
    m = bundle.manifest
    batch = np.random.default_rng(5).standard_normal((2, m.num_channels, *m.patch_size)).astype(np.float32)
    with _engine("onnxruntime", bundle) as ref, _engine(backend, older) as other, \
            _engine("onnxruntime", older) as ort_older:
        expected = ref.run(batch)
        np.testing.assert_allclose(ort_older.run(batch)["distance"], expected["distance"], rtol=DISTANCE_RTOL)
        assert_outputs_match(other.run(batch), expected, where=f"{backend}/older head")


def test_openvino_throughput_hint_and_thread_limit(ct_pipeline):
    _requires("openvino")
    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    batch = np.random.default_rng(2).standard_normal((2, m.num_channels, *m.patch_size)).astype(np.float32)
    from segsentry.runtime.backends.openvino import OpenvinoBackend

    with _engine("onnxruntime", bundle) as ref, OpenvinoBackend(
        bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size, options=BackendOptions(threads=1),
        performance_hint="throughput",
    ) as ov:
        assert_outputs_match(ov.run(batch), ref.run(batch), where="openvino/throughput")
    with pytest.raises(BackendError, match="performance hint"):
        OpenvinoBackend(bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                        performance_hint="fast")  # type: ignore[arg-type]


def test_openvino_reads_from_a_temporary_file_when_bytes_are_refused(ct_pipeline):
    """Older OpenVINO builds cannot read ONNX from memory: the backend falls back to a temporary file."""
    ov = pytest.importorskip("openvino")
    from segsentry.runtime.backends.openvino import _read_model

    real = ov.Core()
    seen: list[object] = []

    class BytesRefusingCore:
        def read_model(self, model, weights=None):
            seen.append(model)
            if isinstance(model, bytes):
                raise RuntimeError("reading ONNX from bytes is not supported")
            assert Path(model).is_file()
            return real.read_model(model)

    network = _read_model(BytesRefusingCore(), load_bundle(ct_pipeline.ood_onnx).model_bytes)
    assert {"logits", "distance"} <= {n for port in network.outputs for n in port.get_names()}
    assert len(seen) == 2 and not Path(str(seen[1])).exists()  # the temporary file is removed


def test_onnxruntime_low_memory_turns_the_arena_off_and_changes_no_output(ct_pipeline):
    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    batch = np.random.default_rng(4).normal(size=(2, m.num_channels, *m.patch_size)).astype(np.float32)
    with create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size) as fast, \
            create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                           options=BackendOptions(low_memory=True)) as lean:
        assert fast.session.get_session_options().enable_cpu_mem_arena is True
        assert lean.session.get_session_options().enable_cpu_mem_arena is False
        a, b = fast.run(batch), lean.run(batch)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_onnxruntime_memory_pattern_follows_the_patch_size_and_changes_no_output(ct_pipeline):
    """onnxruntime's memory pattern stays on for small patches and is off from 2**19 voxels and with
    ``low_memory`` (ort_loader.cpu_memory_pattern); a session without it returns what a session with
    onnxruntime's default pattern returns, bit for bit, on two runs (the pattern is planned on the first)."""
    import onnxruntime as ort

    from segsentry.runtime.backends.ort_loader import PATTERN_MAX_PATCH_VOXELS, cpu_memory_pattern

    assert PATTERN_MAX_PATCH_VOXELS == 2**19
    assert cpu_memory_pattern((32, 64, 64)) is True  # the demo's patch, 2**17 voxels
    assert cpu_memory_pattern((32, 128, 127)) is True  # just below the bound
    assert cpu_memory_pattern((32, 128, 128)) is False  # 2**19
    assert cpu_memory_pattern((64, 128, 128)) is False  # the fullres net's patch, 2**20
    assert cpu_memory_pattern((32, 64, 64), low_memory=True) is False
    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    assert np.prod(m.patch_size) < PATTERN_MAX_PATCH_VOXELS
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(2, m.num_channels, *m.patch_size)).astype(np.float32) for _ in range(2)]
    default = ort.SessionOptions()
    assert default.enable_mem_pattern is True  # onnxruntime's default
    reference = ort.InferenceSession(bundle.model_bytes, sess_options=default, providers=["CPUExecutionProvider"])
    for options, pattern in ((BackendOptions(), True), (BackendOptions(low_memory=True), False)):
        with create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                            options=options) as engine:
            assert engine.session.get_session_options().enable_mem_pattern is pattern
            for batch in batches:
                ours = engine.run(batch)
                theirs = dict(zip(engine.output_names,
                                  reference.run(engine.output_names, {engine.input_name: batch})))
                for name in ours:
                    np.testing.assert_array_equal(ours[name], theirs[name])


@pytest.mark.parametrize("bundle_attr", ["ood_onnx", "features_onnx"])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_run_network_skips_the_head_where_the_engine_holds_it_apart(backend, bundle_attr, ct_pipeline):
    """The CPU engines hold a calibrated bundle's head apart: ``run`` equals one onnxruntime session of the whole
    bundle (onnxruntime: rtol 1e-6, bit-identical measured; OpenVINO: the parity tolerances above) and
    ``run_network`` (mirrored flips) returns the same logits, the pooled features and no distance. A bundle
    without a head is one engine and ``run_network`` is ``run``."""
    import onnxruntime as ort

    _requires(backend)
    bundle = load_bundle(getattr(ct_pipeline, bundle_attr))
    m = bundle.manifest
    batch = np.random.default_rng(5).standard_normal((2, m.num_channels, *m.patch_size)).astype(np.float32)
    whole = ort.InferenceSession(bundle.model_bytes, providers=["CPUExecutionProvider"])
    expected = dict(zip((o.name for o in whole.get_outputs()), whole.run(None, {"image": batch})))
    calibrated = bundle_attr == "ood_onnx"
    with _engine(backend, bundle) as engine:
        assert engine.head_apart is calibrated
        got, network = engine.run(batch), engine.run_network(batch)
    if backend == "onnxruntime":
        assert list(got) == list(expected)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=0, err_msg=name)
    else:
        assert_outputs_match(got, expected, where=f"{backend}/{bundle_attr}")
    np.testing.assert_array_equal(network["logits"], got["logits"])
    if calibrated:
        assert "distance" not in network and network["features"].shape[0] == 2
    else:
        assert sorted(network) == sorted(got)


def test_backend_input_checks_are_shared(ct_pipeline):
    _requires("openvino")
    bundle = load_bundle(ct_pipeline.ood_onnx)
    with _engine("openvino", bundle) as ov:
        with pytest.raises(BackendError, match="backend input must be"):
            ov.run(np.zeros((1, 2, 4, 4, 4), dtype=np.float32))


# -- whole-case parity -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ct", "mr"])
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_volume_parity_with_onnxruntime(backend, kind, request, test_cases):
    """``infer_volume`` on a held-out case: accumulated logits, patch distances, distance map and features."""
    _requires(backend)
    from segsentry.runtime import read_case
    from segsentry.runtime.io import CaseInput
    from segsentry.runtime.pipeline import infer_volume
    from segsentry.runtime.preprocess import preprocess

    pipeline = request.getfixturevalue(f"{kind}_pipeline")
    bundle = load_bundle(pipeline.features_kept_onnx)
    m = bundle.manifest
    case_id, files = next(iter(test_cases[kind].items()))
    loaded = read_case(CaseInput(case_id, tuple(files)), num_channels=m.num_channels)
    data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
    results = {}
    for name in ("onnxruntime", backend):
        with _engine(name, bundle) as engine:
            results[name] = infer_volume(data, engine, m, batch_size=2, aggregation="normalised",
                                         collect_features=True)
    ref, got = results["onnxruntime"], results[backend]
    assert len(ref.boxes) > 1
    def outputs(v):
        return {"logits": v.logits.astype(np.float32), "features": v.features,
                "distance": v.distances.astype(np.float32)}

    assert_outputs_match(outputs(got), outputs(ref), where=f"{backend}/{kind} volume")
    np.testing.assert_allclose(got.distance_map, ref.distance_map, rtol=DISTANCE_RTOL)


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_run_batch_masks_match_onnxruntime(backend, ct_pipeline, test_cases, tmp_path):
    _requires(backend)
    from segsentry.runtime.batch import run_batch

    files = [f for fs in test_cases["ct"].values() for f in fs]
    ref = run_batch(ct_pipeline.ood_onnx, files, tmp_path / "ort", backend="onnxruntime", qa=False)
    got = run_batch(ct_pipeline.ood_onnx, files, tmp_path / backend, backend=backend, qa=False, batch_size=2)
    assert got.backend == backend and not got.failed and not ref.failed
    for a, b in zip(ref.outcomes, got.outcomes):
        assert b.report.backend == backend
        mask_ref = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ort" / f"{a.case_id}.nii.gz")))
        mask_got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / backend / f"{a.case_id}.nii.gz")))
        assert mask_got.shape == mask_ref.shape
        differing = int(np.count_nonzero(mask_got != mask_ref))
        assert differing <= max(2, 1e-4 * mask_ref.size), f"{a.case_id}: {differing} of {mask_ref.size} voxels"
        np.testing.assert_allclose(b.report.score, a.report.score, rtol=DISTANCE_RTOL)
        np.testing.assert_allclose(b.report.uncertainty, a.report.uncertainty, rtol=DISTANCE_RTOL)
        assert b.report.ood == a.report.ood


# -- selection ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_gpu(monkeypatch):
    """A machine whose NVIDIA driver reports no CUDA device, whatever this one has."""
    monkeypatch.setattr(backends, "cuda_device_count", lambda: 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine with one CUDA device and the GPU engines usable unless a test blocks their packages."""
    monkeypatch.setattr(backends, "cuda_device_count", lambda: 1)
    real = backends._importable
    monkeypatch.setattr(backends, "_importable",
                        lambda module: module.split(".")[0] in ("tensorrt", "cuda", "onnx") or real(module))
    monkeypatch.setattr(backends, "_cuda_provider_available", lambda: True)
    return monkeypatch


def test_auto_picks_openvino_when_importable(no_gpu):
    pytest.importorskip("openvino")
    assert resolve_backend_name("auto") == "openvino" == resolve_auto()
    assert resolve_backend_name("AUTO") == "openvino"


def test_auto_falls_back_to_onnxruntime(no_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    assert resolve_backend_name("auto") == "onnxruntime"


def test_auto_never_picks_torch():
    assert resolve_backend_name("auto") in AUTO_ORDER and "torch" not in AUTO_ORDER


def test_auto_is_cpu_only_without_a_gpu(no_gpu, monkeypatch):
    """Even with tensorrt and the CUDA provider 'installed', no CUDA device means a CPU engine."""
    monkeypatch.setattr(backends, "_cuda_provider_available", lambda: True)
    monkeypatch.setattr(backends, "_importable", lambda module: module.split(".")[0] in ("tensorrt", "cuda", "onnx"))
    assert resolve_backend_name("auto") == "onnxruntime"


def test_auto_prefers_tensorrt_then_ort_gpu_on_a_gpu(fake_gpu):
    assert resolve_backend_name("auto") == "tensorrt"
    fake_gpu.setattr(backends, "_importable", lambda module: module.split(".")[0] not in ("tensorrt", "openvino"))
    assert resolve_backend_name("auto") == "ort-gpu"
    fake_gpu.setattr(backends, "_cuda_provider_available", lambda: False)
    assert resolve_backend_name("auto") == "onnxruntime"


@pytest.mark.parametrize("missing", ["tensorrt", "cuda", "onnx"])
def test_auto_skips_tensorrt_when_a_package_it_needs_is_missing(missing, fake_gpu):
    real = backends._importable
    fake_gpu.setattr(backends, "_importable", lambda module: module.split(".")[0] != missing and real(module))
    assert resolve_backend_name("auto") == "ort-gpu"


def test_cuda_device_count_reads_the_driver(monkeypatch):
    """0 without a driver library or when cuInit fails; the driver's count otherwise (ctypes stand-ins)."""
    import ctypes

    class Driver:
        def __init__(self, init: int, count: int) -> None:
            self.init, self.count = init, count

        def cuInit(self, flags):
            return self.init

        def cuDeviceGetCount(self, pointer):
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_int))[0] = self.count
            return 0

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert backends.cuda_device_count() == 0
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(init=100, count=2))  # CUDA_ERROR_NO_DEVICE
    assert backends.cuda_device_count() == 0
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(init=0, count=2))
    assert backends.cuda_device_count() == 2


def test_auto_backend_records_its_concrete_name(ct_pipeline, no_gpu, monkeypatch):
    bundle = load_bundle(ct_pipeline.ood_onnx)
    with _engine("auto", bundle) as engine:
        assert engine.name == resolve_backend_name("auto")
    monkeypatch.setitem(sys.modules, "openvino", None)
    with _engine("auto", bundle) as engine:
        assert engine.name == "onnxruntime"


@pytest.mark.parametrize("alias,name", [("ort", "onnxruntime"), ("CPU", "onnxruntime"), ("onnxruntime", "onnxruntime"),
                                        ("ov", "openvino"), ("OpenVINO", "openvino"), ("pytorch", "torch"),
                                        ("TensorRT", "tensorrt"), ("trt", "tensorrt"), ("onnxruntime-gpu", "ort-gpu"),
                                        ("ORT-GPU", "ort-gpu")])
def test_aliases(alias, name):
    assert resolve_backend_name(alias) == name


def test_available_names():
    assert AVAILABLE == ("onnxruntime", "openvino", "torch", "ort-gpu", "tensorrt")
    assert AUTO_ORDER == ("tensorrt", "ort-gpu", "openvino", "onnxruntime")


def test_registry_is_the_one_table():
    """AVAILABLE and GPU_BACKENDS are read off BACKENDS; every entry names a real class of its module."""
    import importlib

    assert AVAILABLE == tuple(BACKENDS)
    assert GPU_BACKENDS == ("tensorrt", "ort-gpu")
    assert {name for name, spec in BACKENDS.items() if spec.gpu} == set(GPU_BACKENDS)
    assert {name for name, spec in BACKENDS.items() if spec.needs_manifest} == {"torch"}
    assert {name: spec.extra for name, spec in BACKENDS.items()} == {
        "onnxruntime": None, "openvino": "openvino", "torch": "export", "ort-gpu": "gpu", "tensorrt": "trt"}
    for name, spec in BACKENDS.items():
        if name == "torch":
            _requires("torch")  # its module lives in segsentry.export, which needs torch
        backend_class = getattr(importlib.import_module(spec.module), spec.class_name)
        assert backend_class.name == name and issubclass(backend_class, BackendBase)


# -- options -----------------------------------------------------------------------------------------------

def test_backend_options_defaults_and_checks(tmp_path):
    options = BackendOptions()
    assert (options.threads, options.low_memory, options.cache_dir, options.device, options.precision,
            options.max_batch) == (None, False, None, 0, None, None)
    assert options.resolve_precision("tensorrt", ("fp16", "fp32")) == "fp16"  # None: the backend's default
    assert BackendOptions(precision="fp32").resolve_precision("tensorrt", ("fp16", "fp32")) == "fp32"
    assert BackendOptions(cache_dir=str(tmp_path)).cache_dir == tmp_path  # a str path becomes a Path
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.threads = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        BackendOptions(2)  # type: ignore[misc]  # keyword-only
    for bad, match in [({"threads": 0}, "threads must be a positive number"),
                       ({"threads": True}, "threads must be a positive number"),
                       ({"device": -1}, "CUDA device must be an index"),
                       ({"device": "cuda"}, "CUDA device must be an index"),
                       ({"precision": "int8"}, "precision must be one of fp32, fp16"),
                       ({"max_batch": 0}, "max batch must be at least 1")]:
        with pytest.raises(BackendError, match=match):
            BackendOptions(**bad)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_cpu_backends_refuse_fp16(backend, ct_pipeline):
    """fp16 on a CPU engine would silently run float32: refused, with the backends that can do it named."""
    _requires(backend)
    bundle = load_bundle(ct_pipeline.ood_onnx)
    with pytest.raises(BackendError, match=f"the {backend} backend runs fp32.* not 'fp16'.*tensorrt or ort-gpu"):
        _engine(backend, bundle, options=BackendOptions(precision="fp16"))
    with _engine(backend, bundle, options=BackendOptions(precision="fp32")) as engine:
        assert engine.options.precision == "fp32"


def test_create_backend_hands_the_options_over(ct_pipeline):
    bundle = load_bundle(ct_pipeline.ood_onnx)
    options = BackendOptions(threads=1, low_memory=True, cache_dir=ct_pipeline.ood_onnx, max_batch=2)
    with _engine("onnxruntime", bundle, options=options) as engine:  # cache_dir, max_batch: ignored on the CPU
        assert engine.options is options
        session = engine.session.get_session_options()
        assert session.intra_op_num_threads == 1 and session.enable_cpu_mem_arena is False
    with _engine("onnxruntime", bundle) as engine:
        assert engine.options == BackendOptions()


@pytest.mark.parametrize("name,extra,package", [("tensorrt", "trt", "tensorrt"), ("trt", "trt", "tensorrt"),
                                                ("ort-gpu", "gpu", "onnxruntime-gpu")])
def test_gpu_backend_without_its_package_names_the_extra(name, extra, package, ct_pipeline, monkeypatch):
    """The GPU backends are implemented: asking for one without its package names the pip extra."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(MissingDependencyError) as info:
        _engine(name, load_bundle(ct_pipeline.ood_onnx))
    assert info.value.extra == extra and info.value.package == package
    assert f"pip install 'segsentry[{extra}]'" in str(info.value)


def test_unknown_backend_lists_the_choices():
    with pytest.raises(BackendError) as info:
        resolve_backend_name("coreml")
    message = str(info.value)
    assert message.startswith("unknown backend 'coreml'")
    assert "onnxruntime, openvino, torch, ort-gpu, tensorrt, auto" in message and "\n" not in message


# -- missing packages --------------------------------------------------------------------------------------

def test_missing_openvino_names_the_extra(ct_pipeline, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingDependencyError) as info:
        _engine("openvino", load_bundle(ct_pipeline.ood_onnx))
    assert info.value.extra == "openvino" and info.value.package == "openvino"
    assert "pip install 'segsentry[openvino]'" in str(info.value)


@pytest.mark.parametrize("module,package", [("torch", "torch"),
                                            ("dynamic_network_architectures", "dynamic-network-architectures")])
def test_missing_torch_names_the_export_extra(module, package, ct_pipeline, monkeypatch):
    bundle = load_bundle(ct_pipeline.ood_onnx)  # its model folder exists, so the import is what fails
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError) as info:
        _engine("torch", bundle)
    assert info.value.extra == "export" and info.value.package == package
    assert "The torch backend needs" in str(info.value) and "segsentry[export]" in str(info.value)


def test_missing_package_via_import_module(ct_pipeline, no_gpu, monkeypatch):
    """The same error when the import itself fails (e.g. a broken install), simulated on ``import_module``."""
    import importlib

    real = importlib.import_module

    def fake(name, package=None):
        if name.split(".")[0] == "openvino":
            raise ImportError("libopenvino.so: cannot open shared object file")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert resolve_backend_name("auto") == "onnxruntime"
    with pytest.raises(MissingDependencyError, match=r"segsentry\[openvino\]"):
        _engine("openvino", load_bundle(ct_pipeline.ood_onnx))


# -- torch backend refusals --------------------------------------------------------------------------------

def _with_source(bundle: Bundle, **source) -> Bundle:
    manifest = bundle.manifest.replace(source={**bundle.manifest.source, **source})
    return dataclasses.replace(bundle, manifest=manifest)


def test_torch_needs_the_manifest(ct_pipeline):
    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    with pytest.raises(BackendError, match="needs the bundle manifest"):
        create_backend("torch", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size)


def test_torch_refuses_a_non_nnunet_source(ct_pipeline):
    bundle = _with_source(load_bundle(ct_pipeline.ood_onnx), kind="torch")
    with pytest.raises(BackendError, match="source is kind 'torch'; use --backend onnxruntime"):
        _engine("torch", bundle)


def test_torch_refuses_a_missing_model_folder(ct_pipeline, tmp_path):
    bundle = _with_source(load_bundle(ct_pipeline.ood_onnx), model_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(BackendError, match="does not exist on this machine"):
        _engine("torch", bundle)


def test_torch_refuses_a_changed_checkpoint(ct_pipeline, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("dynamic_network_architectures")
    folder = tmp_path / "model"
    shutil.copytree(ct_pipeline.model_dir, folder)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["network_weights"] = {k: v * 1.01 if v.is_floating_point() else v
                                for k, v in state["network_weights"].items()}
    torch.save(state, checkpoint)
    bundle = _with_source(load_bundle(ct_pipeline.ood_onnx), model_dir=str(folder))
    with pytest.raises(BackendError, match="model folder changed since export"):
        _engine("torch", bundle)


def test_torch_fp16_is_cuda_only(ct_pipeline):
    _requires("torch")
    from segsentry.export.torch_backend import TorchBackend

    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    with pytest.raises(BackendError, match="fp16 autocast is supported on CUDA only"):
        TorchBackend(bundle.model_bytes, manifest=m, channels=m.num_channels, patch_size=m.patch_size,
                     options=BackendOptions(precision="fp16"))


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_l2_feature_norm_parity_with_onnxruntime(backend, ct_pipeline, tmp_path):
    """A Mahalanobis++ bundle (ReduceL2/Max/Div in the head) gives the same distances on every engine; the torch
    backend applies the normalisation itself from the manifest."""
    from segsentry.calib import calibrate

    _requires(backend)
    path = calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "l2.onnx", feature_norm="l2").path
    bundle = load_bundle(path)
    m = bundle.manifest
    batch = np.random.default_rng(3).standard_normal((2, m.num_channels, *m.patch_size)).astype(np.float32)
    with _engine("onnxruntime", bundle) as ref, _engine(backend, bundle) as other:
        assert_outputs_match(other.run(batch), ref.run(batch), where=f"{backend}/l2")
