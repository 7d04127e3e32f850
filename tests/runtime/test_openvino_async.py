"""OpenVINO throughput mode: CPU streams and an asynchronous infer queue, one patch per request.

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
