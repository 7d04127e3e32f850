"""``ood-bench``: latency, throughput, stage times, memory and OOD-head overhead of a bundle per backend.

Everything runs through the runtime's own backends and sliding-window core. Per backend:
- per-patch latency (p50 / p95 over ``repeats`` after ``warmup``) at each batch size, and throughput; where the
  bundle records mirroring axes also with nnU-Net's test-time mirroring (the batch and then each of its flips, one
  call each, as the runtime sends them); the bundle's fold count is recorded beside (an ensemble runs every fold per call);
- the same for the network alone (the bundle pruned to its ``logits`` output), which gives the cost of the
  fused Mahalanobis head;
- end-to-end time of one volume with its stage breakdown (read, preprocess, inference, scoring, resample back,
  write), the distance-aggregation time on that run's padded volume and tiles (one map per feature tap), and the
  process's peak RSS; the OOD share of that run counts the head once per patch where the engine holds it apart
  (onnxruntime, OpenVINO: the mirrored flips go through ``run_network`` without it), else once per engine call,
  so with mirroring once per flip too (an engine that runs its whole graph on every flip);
- for the GPU backends, the GPU memory in use (NVML, device-wide) before the engines are created and while
  they are loaded, after the timed runs.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from segsentry.contract import Output
from segsentry.errors import InputError
from segsentry.runtime.backends import GPU_BACKENDS, BackendOptions, create_backend, resolve_backend_name
from segsentry.runtime.bundle import Bundle, load_bundle
from segsentry.runtime.sliding import mirror_combinations


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Unlike ru_maxrss it is not inherited across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def gpu_memory_used_mb(device: int = 0) -> float | None:
    """Memory in use on GPU ``device`` as the NVIDIA driver's NVML reports it (all processes), in MiB; ``None``
    where there is no NVML (no NVIDIA driver) or it fails. A ctypes call: no CUDA package needed."""

    class _Memory(ctypes.Structure):
        _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]

    for name in ("libnvidia-ml.so.1", "libnvidia-ml.so", "nvml.dll"):
        try:
            nvml = ctypes.CDLL(name)
        except OSError:
            continue
        handle, memory = ctypes.c_void_p(), _Memory()
        if nvml.nvmlInit_v2() != 0:
            return None
        try:
            if nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(device), ctypes.byref(handle)) != 0:
                return None
            if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
                return None
            return memory.used / 2**20
        finally:
            nvml.nvmlShutdown()
    return None


def network_only(bundle: Bundle) -> bytes:
    """The bundle's graph pruned to its ``logits`` output (no features, no head): the baseline for overhead."""
    import onnx

    from segsentry.graph import GraphIndex, extract

    model = onnx.load_model_from_string(bundle.model_bytes)
    logits = bundle.manifest.output_name(Output.LOGITS)
    return extract(model, GraphIndex(model.graph).inputs, [logits]).SerializeToString()


def head_only(bundle: Bundle) -> bytes | None:
    """The fused Mahalanobis head alone (``features`` -> ``distance``; every tap's where several are fused), or
    None for an uncalibrated bundle."""
    import onnx

    from segsentry.graph import extract, head_boundary

    model = onnx.load_model_from_string(bundle.model_bytes)
    inputs, outputs = head_boundary(model.graph)
    if not outputs:
        return None
    return extract(model, inputs, outputs).SerializeToString()


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _timed(call: Callable[[], object], *, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``call``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _calls_per_patch(mirror_axes: Sequence[int] | None) -> int:
    """Engine calls per patch: one, and one per flip with mirroring (runtime.sliding.iterate_patches)."""
    return len(mirror_combinations(mirror_axes)) + 1 if mirror_axes else 1


def bench_backend(
    bundle: Bundle, backend: str, *, batch_sizes: Sequence[int], warmup: int, repeats: int, threads: int | None,
    volume: Path | None,
) -> dict:
    """All measurements for one backend (see module docstring). Times in seconds."""
    m = bundle.manifest
    name = resolve_backend_name(backend)
    rng = np.random.default_rng(0)
    # a mirrored batch is one call per flip (runtime.sliding.iterate_patches): time the whole tile too
    mirror_terms = _calls_per_patch(m.tiling.mirror_axes)
    result: dict = {"backend": name, "n_folds": m.n_folds, "mirror_axes": m.tiling.mirror_axes,
                    "mirror_terms": mirror_terms, "batches": []}
    gpu_before = gpu_memory_used_mb() if name in GPU_BACKENDS else None
    plain = network_only(bundle)
    head = head_only(bundle)  # timed alone on onnxruntime CPU
    if head is not None:
        import onnxruntime as ort

        head_session = ort.InferenceSession(head, providers=["CPUExecutionProvider"])
        head_inputs = head_session.get_inputs()  # the features tensor (one per fused tap)
    with create_backend(name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                        options=BackendOptions(threads=threads, cache_dir=bundle.path), manifest=m) as full, \
            create_backend(name, plain, channels=m.num_channels, patch_size=m.patch_size,
                           options=BackendOptions(threads=threads), manifest=m) as bare:
        for n in batch_sizes:
            batch = rng.standard_normal((n, m.num_channels, *m.patch_size)).astype(np.float32)
            with_head = _timed(lambda b=batch: full.run(b), warmup=warmup, repeats=repeats)
            without = _timed(lambda b=batch: bare.run(b), warmup=warmup, repeats=repeats)
            head_p50 = None
            if head is not None:
                z = {x.name: np.random.default_rng(0).standard_normal(
                        [d if isinstance(d, int) else n for d in x.shape]).astype(np.float32) for x in head_inputs}
                head_p50 = statistics.median(_timed(lambda z=z: head_session.run(None, z),
                                                    warmup=warmup, repeats=repeats))
            mirrored_p50 = None
            if mirror_terms > 1:
                def tile(b: np.ndarray = batch) -> None:  # as iterate_patches sends a mirrored batch
                    full.run(b)
                    for _ in range(mirror_terms - 1):
                        full.run_network(b)

                mirrored_p50 = statistics.median(_timed(tile, warmup=warmup, repeats=repeats))
            p50, p50_bare = statistics.median(with_head), statistics.median(without)
            result["batches"].append({
                "batch": n,
                "p50_s_per_call": p50,
                "p95_s_per_call": _percentile(with_head, 95),
                "p50_s_per_patch": p50 / n,
                "patches_per_s": n / p50,
                "network_only_p50_s_per_call": p50_bare,
                "head_overhead_fraction": (p50 - p50_bare) / p50_bare,
                "head_only_p50_s_per_call": head_p50,
                # with nnU-Net's test-time mirroring: mirror_terms calls of the batch (None: no axes)
                "mirrored_p50_s_per_call": mirrored_p50,
                "mirrored_patches_per_s": None if mirrored_p50 is None else n / mirrored_p50,
            })
        if name in GPU_BACKENDS:  # both engines (with and without the head) are loaded at this point
            result["gpu_memory_used_mb"] = {"before_engines": gpu_before, "with_engines": gpu_memory_used_mb()}
    if volume is not None:
        result["volume"] = bench_volume(bundle, name, volume, threads=threads)
    result["process_peak_rss_mb_so_far"] = peak_rss_mb()
    return result


def bench_volume(bundle: Bundle, backend: str, volume: Path, *, threads: int | None) -> dict:
    """End-to-end time of one case, per stage, and the cost of the distance aggregation alone.

    The case goes once through the runtime's own stages, as ``ood-run`` runs it: read, preprocess, inference
    (sliding window), scoring, resample back, write (into a temporary folder). ``wall_s`` is the engine's
    creation plus the case; ``stages_s`` the seconds of each stage and their ``total``, as ``CASE.json`` records
    them. The aggregation is then replayed on that run's padded volume and tiles (one add per patch), so the
    volume is read and preprocessed only once.
    """
    from segsentry.runtime.io import collect_cases, read_case, write_image
    from segsentry.runtime.pipeline import predict_case
    from segsentry.runtime.sliding import DistanceAccumulator, importance_for

    m = bundle.manifest
    cases = collect_cases([volume], num_channels=m.num_channels)
    if len(cases) != 1:
        raise InputError(f"the benchmark volume {volume} must be one case, found {len(cases)}; pass one image")
    case = cases[0]
    with tempfile.TemporaryDirectory(prefix="segsentry-bench-") as tmp:
        start = time.perf_counter()
        with create_backend(backend, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                            options=BackendOptions(threads=threads, cache_dir=bundle.path), manifest=m) as engine:
            case_start = t0 = time.perf_counter()
            loaded = read_case(case, num_channels=m.num_channels)
            read_s = time.perf_counter() - t0
            prediction = predict_case(loaded, engine, m)  # preprocess, inference, scoring, resample back
            t0 = time.perf_counter()
            ending = loaded.output_ending
            write_image(prediction.mask, loaded.reference, Path(tmp) / f"{case.case_id}{ending}")
            if prediction.uncertainty is not None:
                write_image(prediction.uncertainty, loaded.reference,
                            Path(tmp) / f"{case.case_id}_uncertainty{ending}")
            stages = {"read": read_s, **prediction.timings, "write": time.perf_counter() - t0,
                      "total": time.perf_counter() - case_start}
            head_apart = engine.head_apart
        total = time.perf_counter() - start
    calls = _calls_per_patch(prediction.mirror_axes)
    out = {"volume": str(volume), "n_patches": prediction.n_patches, "wall_s": total,
           "n_folds": m.n_folds, "mirror_axes": prediction.mirror_axes, "engine_calls_per_patch": calls,
           # the heads run on the un-mirrored call only where the engine holds them apart (run_network)
           "head_calls_per_patch": 1 if head_apart else calls,
           "stages_s": {k: round(v, 4) for k, v in stages.items()}}
    if m.calibration is not None:
        # the distance maps alone (one per feature tap): the run's patch adds on its padded volume
        gaussian = importance_for(m.patch_size, sigma_scale=m.tiling.sigma_scale,
                                  value_scaling_factor=m.tiling.value_scaling_factor)
        start = time.perf_counter()
        for _ in range(1 + len(m.calibration.taps)):
            acc = DistanceAccumulator(prediction.padded_shape, gaussian, aggregation=m.calibration.aggregation)
            for box in prediction.tiles:
                acc.add(box, 1.0)
            acc.result()
        out["distance_aggregation_s"] = time.perf_counter() - start
        out["ood_overhead_fraction_of_e2e"] = None  # filled by the caller from the head overhead
    return out


def run_bench(
    bundle_path: str | Path, *, backends: Sequence[str], batch_sizes: Sequence[int] = (1, 2, 4), warmup: int = 2,
    repeats: int = 10, threads: int | None = None, volume: Path | None = None,
) -> dict:
    bundle = load_bundle(bundle_path)
    results = []
    for backend in backends:
        r = bench_backend(bundle, backend, batch_sizes=batch_sizes, warmup=warmup, repeats=repeats,
                          threads=threads, volume=volume)
        if "volume" in r and "distance_aggregation_s" in r["volume"]:
            v = r["volume"]
            first = r["batches"][0]
            head = first["head_only_p50_s_per_call"] / first["batch"] * v["head_calls_per_patch"]
            v["ood_overhead_fraction_of_e2e"] = (head * v["n_patches"] + v["distance_aggregation_s"]) / v["wall_s"]
        results.append(r)
    return {
        "bundle": str(bundle.path),
        "model_sha256": bundle.weights_sha256,
        "patch_size": bundle.manifest.patch_size,
        "feature_dim": bundle.manifest.features.dim,
        "results": results,
        "machine": machine_info(),
        "versions": package_versions(("segsentry", "numpy", "onnxruntime", "openvino", "torch")),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def package_versions(packages: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each package (None when absent), recorded with every benchmark result."""
    found: dict[str, str | None] = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _first_cpu() -> dict[str, str]:
    """The first processor's block of ``/proc/cpuinfo`` as ``key -> value``; empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    block: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if not key.strip():
            if block:  # the blank line after the first processor
                break
            continue
        block.setdefault(key.strip(), value.strip())
    return block


def machine_info() -> dict:
    """CPU model (and, from ``/proc/cpuinfo``, its family / model / stepping numbers, which tell CPU generations
    apart where the model name is only "AMD EPYC"), core count, Python and platform, recorded with every
    benchmark result."""
    cpu = _first_cpu()
    info = {"cpu": cpu.get("model name") or platform.processor(), "cores": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(), "cpu_flags": cpu_flags()}
    numbers = {k: cpu[k] for k in ("cpu family", "model", "stepping") if k in cpu}
    if numbers:
        info["cpu_id"] = {k.replace(" ", "_"): int(v) if v.isdigit() else v for k, v in numbers.items()}
    return info


SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> dict[str, bool]:
    """Which of :data:`SPEED_FLAGS` (the instructions INT8 / BF16 / FP32 kernels use) ``/proc/cpuinfo`` lists;
    empty where there is no ``/proc/cpuinfo``."""
    cpu = _first_cpu()
    if not cpu:
        return {}
    flags = cpu.get("flags", "").split()
    return {f: f in flags for f in SPEED_FLAGS}
