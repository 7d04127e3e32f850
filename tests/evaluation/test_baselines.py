"""The output baselines of one case, from the aggregated logits of the tiny CT network, against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest


def test_output_baselines_match_scipy(ct_pipeline, test_cases):
    """max softmax / KL / energy from the sliding window's float16 network-space logits, recomputed here with
    scipy in float64."""
    from scipy.special import logsumexp, softmax
    from scipy.stats import entropy

    from segsentry.evaluation.baselines import output_baselines
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.io import CaseInput
    from segsentry.runtime.pipeline import infer_volume_for_case
    from segsentry.runtime.preprocess import preprocess

    files = next(iter(test_cases["ct"].values()))
    bundle = load_bundle(ct_pipeline.ood_onnx)
    m = bundle.manifest
    loaded = read_case(CaseInput("c", tuple(files)), num_channels=1)
    data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
    with create_backend("onnxruntime", bundle.model_bytes, channels=1, patch_size=m.patch_size) as b:
        logits16 = infer_volume_for_case(data, b, m).logits
    assert logits16.dtype == np.float16 and logits16.shape[1:] == data.shape[1:]
    baselines = output_baselines(logits16)
    logits = logits16.astype(np.float64)
    assert set(baselines) == {"max_softmax_T1", "max_softmax_T10", "max_softmax_T100", "kl_uniform", "energy"}
    for t in (1, 10, 100):
        expected = float(np.mean(1 - softmax(logits / t, axis=0).max(0)))
        assert baselines[f"max_softmax_T{t}"] == pytest.approx(expected, rel=1e-9)
    assert baselines["energy"] == pytest.approx(float(np.mean(-logsumexp(logits, axis=0))), rel=1e-9)
    k = logits.shape[0]
    confidence = np.clip(1 - entropy(softmax(logits, axis=0), axis=0) / math.log(k), 0, 1)
    assert baselines["kl_uniform"] == pytest.approx(1 - float(np.mean(confidence)), rel=1e-6)
    assert 0 < baselines["kl_uniform"] < 1
