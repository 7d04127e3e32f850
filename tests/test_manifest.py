"""Manifest round trip, the torch-free protobuf reader, and the weight hash."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from segsentry import _onnx_wire
from segsentry.errors import BundleError
from segsentry.manifest import (
    MANIFEST_KEY,
    Calibration,
    FeatureSpec,
    Manifest,
    Preprocessing,
    Tiling,
    read_manifest,
    weights_sha256,
    write_manifest,
)


def _manifest(calibrated: bool = False) -> Manifest:
    return Manifest(
        source={"kind": "torch"}, labels={"background": 0, "lesion": 1}, channels={"0": "CT"}, file_ending=".nii.gz",
        num_classes=2, patch_size=[16, 32, 32],
        preprocessing=Preprocessing(transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2], spacing=[1, 1, 1],
                                    normalization_schemes=["CTNormalization"], use_mask_for_norm=[False],
                                    intensity_properties={"0": {"mean": 1.0}}),
        tiling=Tiling(), features=FeatureSpec(layer="a.b", layer_shape=[32, 2, 4, 4], pooling=[], dim=1024),
        calibration=Calibration(estimator="empirical", shrinkage=0.0, rank=3, n_patches=4, n_cases=2,
                                aggregation="paper", train_score_min=1.0, train_score_max=2.0, threshold=0.5,
                                train_scores=[1.0, 2.0], train_uncertainties=[0.0, 1 / 3]) if calibrated else None,
    )


def _model() -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3])], [weight])
    model = helper.make_model(graph)
    entry = model.metadata_props.add()
    entry.key, entry.value = "author", "someone"
    return model


@pytest.mark.parametrize("calibrated", [False, True])
def test_round_trip_and_merge(calibrated):
    data = write_manifest(_model(), _manifest(calibrated))
    parsed = onnx.load_model_from_string(data)
    props = {p.key: p.value for p in parsed.metadata_props}
    assert props["author"] == "someone"  # existing props survive
    assert _onnx_wire.metadata_props(data) == props  # our reader agrees with onnx's
    manifest = read_manifest(data)
    assert manifest.replace(weights_sha256="") == _manifest(calibrated)
    assert manifest.weights_sha256 == weights_sha256(parsed.SerializeToString())


def test_restamping_replaces_not_duplicates():
    model = onnx.load_model_from_string(write_manifest(_model(), _manifest()))
    data = write_manifest(model, _manifest(True))
    keys = [p.key for p in onnx.load_model_from_string(data).metadata_props]
    assert keys.count(MANIFEST_KEY) == 1
    assert read_manifest(data).calibration is not None


def test_graph_bytes_match_onnx_serialization():
    model = _model()
    assert bytes(_onnx_wire.graph_bytes(model.SerializeToString())) == model.graph.SerializeToString()


def test_tampering_detected():
    model = onnx.load_model_from_string(write_manifest(_model(), _manifest()))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((2, 3), np.float32), "w"))
    with pytest.raises(BundleError, match="weight hash mismatch"):
        read_manifest(model.SerializeToString())
    assert read_manifest(model.SerializeToString(), verify_hash=False).num_classes == 2


def test_missing_and_malformed_manifest():
    with pytest.raises(BundleError, match="no segsentry manifest"):
        read_manifest(_model().SerializeToString())
    model = _model()
    entry = model.metadata_props.add()
    entry.key, entry.value = MANIFEST_KEY, '{"version": 1, "labels": 3}'
    with pytest.raises(BundleError, match="malformed"):
        read_manifest(model.SerializeToString())
    entry.value = '{"version": 99}'
    with pytest.raises(BundleError, match="version 99"):
        read_manifest(model.SerializeToString())
    with pytest.raises(BundleError):
        read_manifest(b"\xff\xff\xff garbage")


def test_edited_manifest_is_refused():
    """The seal covers the manifest text (which records the graph hash): raising the threshold by hand breaks it,
    while re-stamping through write_manifest (what ood-calib does) keeps it valid and keeps one seal."""
    import json

    from segsentry.manifest import SEAL_KEY

    data = write_manifest(_model(), _manifest(True))
    model = onnx.load_model_from_string(data)
    keys = [p.key for p in model.metadata_props]
    assert keys.count(SEAL_KEY) == 1
    for prop in model.metadata_props:
        if prop.key == MANIFEST_KEY:
            raw = json.loads(prop.value)
            raw["calibration"]["threshold"] = 0.999
            prop.value = json.dumps(raw, sort_keys=True)
    with pytest.raises(BundleError, match="manifest was edited"):
        read_manifest(model.SerializeToString())
    assert read_manifest(model.SerializeToString(), verify_hash=False).calibration.threshold == 0.999
    restamped = write_manifest(onnx.load_model_from_string(data), _manifest(True))
    assert [p.key for p in onnx.load_model_from_string(restamped).metadata_props].count(SEAL_KEY) == 1
    assert read_manifest(restamped).calibration is not None
    # a bundle from before the seal (no seal entry) still loads
    unsealed = onnx.load_model_from_string(data)
    kept = [p for p in unsealed.metadata_props if p.key != SEAL_KEY]
    del unsealed.metadata_props[:]
    unsealed.metadata_props.extend(kept)
    assert read_manifest(unsealed.SerializeToString()).calibration is not None
