"""OpenVINO's one-patch engine: throughput mode (CPU streams, an asynchronous infer queue, one patch per
request) and latency mode (a batch as one inference per patch on the one request).

Oracle: onnxruntime on the same tiny calibrated CT bundle, patch by patch (tolerances of
tests/runtime/test_backends.py: ``assert_outputs_match``). The patches differ, so outputs put back in the wrong
batch order fail the comparison.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")


def _engines(bundle, **kwargs):
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.backends.openvino import OpenvinoBackend
    from segsentry.runtime.backends.options import BackendOptions

    m = bundle.manifest
    ref = create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size)
    ov = OpenvinoBackend(bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                         options=BackendOptions(threads=2), **kwargs)
    return ref, ov


def test_async_queue_runs_a_batch_in_order(ct_pipeline):
    from segsentry.runtime import load_bundle
    from test_backends import assert_outputs_match

    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    ref, ov = _engines(bundle, performance_hint="throughput", streams=2)
    with ref, ov:
        assert ov.streams == 2 and ov.requests >= 2 and ov.preferred_batch == ov.requests
        batch = np.random.default_rng(3).standard_normal((5, m.num_channels, *m.patch_size)).astype(np.float32)
        got = ov.run(batch)
        expected = {k: np.concatenate([ref.run(batch[i:i + 1])[k] for i in range(5)]) for k in got}
        assert_outputs_match(got, expected, where="openvino/async")
        assert not np.allclose(got["distance"][0], got["distance"][1:]), "patches must give distinct outputs"
        single = ov.run(batch[:1])  # one patch: the synchronous request
        assert_outputs_match(single, {k: v[:1] for k, v in expected.items()}, where="openvino/async/1")


def test_latency_mode_has_one_request_and_streams_need_throughput(ct_pipeline):
    from segsentry.errors import BackendError
    from segsentry.runtime import load_bundle

    bundle = load_bundle(ct_pipeline.ood_onnx)
    ref, ov = _engines(bundle)
    with ref, ov:
        assert ov.requests == 1 and ov._queue is None
    with pytest.raises(BackendError, match="throughput hint"):
        _engines(bundle, streams=2)


def test_the_engine_takes_one_patch_and_a_batch_is_one_inference_each(ct_pipeline):
    """Static shape (1, C, *patch): a batch of 3 gives, bit for bit, what its patches give one call each, and
    matches onnxruntime. Fails if the engine's batch axis is left dynamic or the patches come back reordered."""
    from segsentry.runtime import load_bundle
    from test_backends import assert_outputs_match

    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    ref, ov = _engines(bundle)
    with ref, ov:
        assert ov.compiled.input(0).get_partial_shape().is_static
        assert list(ov.compiled.input(0).get_shape()) == [1, m.num_channels, *m.patch_size]
        batch = np.random.default_rng(4).standard_normal((3, m.num_channels, *m.patch_size)).astype(np.float32)
        got = ov.run(batch)
        singles = [ov.run(batch[i:i + 1]) for i in range(3)]
        for k in got:
            assert got[k].shape[0] == 3
            np.testing.assert_array_equal(got[k], np.concatenate([s[k] for s in singles]))
        assert not np.allclose(got["distance"][0], got["distance"][1:]), "patches must give distinct outputs"
        expected = {k: np.concatenate([ref.run(batch[i:i + 1])[k] for i in range(3)]) for k in got}
        assert_outputs_match(got, expected, where="openvino/latency/3")
