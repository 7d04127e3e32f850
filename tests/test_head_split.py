"""``split_at_head``: a bundle cut at its fused head on the protobuf wire, against onnx's own reading of it.

Oracles: the onnx package parses both halves and ``onnx.checker`` accepts them; the head's nodes are exactly
:func:`segsentry.graph.head_nodes` of the parsed bundle and its boundary :func:`segsentry.graph.head_boundary`;
onnxruntime running network then head gives the whole bundle's outputs (``rtol = 1e-6``; bit-identical measured
on the demo and the fullres bundle); each half keeps only the initializers its nodes read.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from segsentry._head_split import split_at_head
from segsentry.demo import demo_bundle_path
from segsentry.graph import head_boundary, head_nodes


def _bundles(ct_pipeline):
    return {"demo (2 folds, 2 taps)": demo_bundle_path().read_bytes(),
            "ct (1 fold, 1 tap)": ct_pipeline.ood_onnx.read_bytes()}


def _outputs(session, feeds):
    return dict(zip((o.name for o in session.get_outputs()), session.run(None, feeds)))


def test_the_two_halves_compute_the_whole_bundle(ct_pipeline):
    for label, data in _bundles(ct_pipeline).items():
        split = split_at_head(data)
        whole = onnx.load_model_from_string(data)
        network, head = onnx.load_model_from_string(split.network), onnx.load_model_from_string(split.head)
        onnx.checker.check_model(network)
        onnx.checker.check_model(head)
        members = head_nodes(whole.graph)
        assert [n.name for n in head.graph.node] == [whole.graph.node[i].name for i in sorted(members)], label
        assert [n.name for n in network.graph.node] == [n.name for i, n in enumerate(whole.graph.node)
                                                        if i not in members], label
        assert (split.boundary, split.head_outputs) == head_boundary(whole.graph), label
        assert [i.name for i in head.graph.input] == split.boundary
        assert [o.name for o in head.graph.output] == split.head_outputs
        assert [o.name for o in network.graph.output] == [
            o.name for o in whole.graph.output if o.name not in split.head_outputs] + split.boundary
        for half in (network, head):
            read = {x for n in half.graph.node for x in n.input}
            assert {t.name for t in half.graph.initializer} <= read, label
        assert not network.metadata_props and not head.metadata_props  # the manifest stays with the bundle

        providers = ["CPUExecutionProvider"]
        full = ort.InferenceSession(data, providers=providers)
        shape = [d if isinstance(d, int) else 2 for d in full.get_inputs()[0].shape]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        expected = _outputs(full, {full.get_inputs()[0].name: x})
        got = _outputs(ort.InferenceSession(split.network, providers=providers), {full.get_inputs()[0].name: x})
        got.update(_outputs(ort.InferenceSession(split.head, providers=providers),
                            {name: got[name] for name in split.boundary}))
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=0, err_msg=f"{label}: {name}")


def test_what_cannot_be_cut_comes_back_as_none(ct_pipeline):
    assert split_at_head(ct_pipeline.features_onnx.read_bytes()) is None  # no head yet
    model = onnx.load_model_from_string(ct_pipeline.ood_onnx.read_bytes())
    boundary, _ = head_boundary(model.graph)
    kept = [v for v in model.graph.value_info if v.name not in boundary]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    assert split_at_head(model.SerializeToString()) is None  # the features' type is not declared


def test_bytes_that_are_not_a_model_raise_value_error():
    with pytest.raises(ValueError):
        split_at_head(b"\x0a\xff\xff\xff")
