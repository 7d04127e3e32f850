"""INT8 post-training quantisation (segsentry.calib.quantize) on the tiny calibrated CT bundle.

What is checked, and against what:
- the output is a sealed bundle (graph hash and seal verified by ``load_bundle``) whose manifest records
  precision int8, the float32 source's hash and the fidelity measured here;
- the convolutions are quantised (int8 per-channel weights behind DequantizeLinear), while every head node and
  every InstanceNormalization is still the float32 node it was, and the head's initializers are bit-identical;
- the calibration patches are patches the runtime's own sliding window feeds the network (recorded from
  ``infer_volume`` through a stand-in backend);
- the recorded fidelity is recomputed independently from two ``run_batch`` runs (fp32 and int8 bundle):
  voxel agreement and Dice exactly, U within 1e-9.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import SimpleITK as sitk
from onnx import numpy_helper
from typer.testing import CliRunner

pytest.importorskip("onnxruntime.quantization")


@pytest.fixture(scope="module")
def quantized(ct_pipeline, test_cases, tmp_path_factory):
    from segsentry.calib.quantize import quantize_bundle

    out = tmp_path_factory.mktemp("int8") / "model.int8.ood.onnx"
    fidelity = [f for files in test_cases["ct"].values() for f in files]
    return quantize_bundle(ct_pipeline.ood_onnx, out, calibration_images=[ct_pipeline.images],
                           fidelity_images=fidelity, max_patches=12)


def test_int8_bundle_is_sealed_and_records_its_precision(quantized, ct_pipeline, test_cases):
    from segsentry.runtime import load_bundle

    source = load_bundle(ct_pipeline.ood_onnx).manifest
    bundle = load_bundle(quantized.path)  # raises on a broken seal or hash
    q = bundle.manifest.quantization
    assert q is not None and q.precision == "int8"
    assert q.source_weights_sha256 == source.weights_sha256 != bundle.manifest.weights_sha256
    assert q.n_calibration_cases == len(ct_pipeline.cases)
    assert q.n_calibration_patches == 12
    assert q.fidelity is not None and q.fidelity.n_cases == len(test_cases["ct"])
    assert bundle.manifest.calibration == source.calibration  # not re-calibrated, said so in the docstring


def test_convolutions_int8_head_and_norms_float32(quantized, ct_pipeline):
    from segsentry.contract import HEAD_SCOPE
    from segsentry.graph.scope import head_nodes

    before = onnx.load(str(ct_pipeline.ood_onnx))
    after = onnx.load(str(quantized.path))
    inits = {t.name: t for t in after.graph.initializer}
    producers = {o: n for n in after.graph.node for o in n.output}
    convs = [n for n in after.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert convs and len(convs) == sum(n.op_type in ("Conv", "ConvTranspose") for n in before.graph.node)
    for conv in convs:
        weight = producers[conv.input[1]]  # DequantizeLinear(int8 weight, per-channel scale)
        assert weight.op_type == "DequantizeLinear"
        assert inits[weight.input[0]].data_type == onnx.TensorProto.INT8
        assert numpy_helper.to_array(inits[weight.input[1]]).size > 1, "per-channel scales"
        assert producers[conv.input[0]].op_type == "DequantizeLinear"
    kept = [before.graph.node[i] for i in sorted(head_nodes(before.graph))]
    kept += [n for n in before.graph.node if n.op_type == "InstanceNormalization"]
    assert sorted(quantized.quantization.fp32_nodes) == sorted(n.name for n in kept)
    after_nodes = {n.name: n for n in after.graph.node}
    for node in kept:
        assert after_nodes[node.name].op_type == node.op_type
        for x in after_nodes[node.name].input:
            if x in producers:
                assert producers[x].op_type != "QuantizeLinear"
    head = [n for n in after.graph.node if n.name in {k.name for k in kept} and n.name.startswith(HEAD_SCOPE)]
    assert head and all(list(after_nodes[n.name].input) == list(n.input) for n in head)
    for t in before.graph.initializer:
        if t.name.startswith(HEAD_SCOPE):
            assert inits[t.name].data_type == t.data_type  # float32 stays float32 (int64 axes stay int64)
            np.testing.assert_array_equal(numpy_helper.to_array(inits[t.name]), numpy_helper.to_array(t))


def test_calibration_patches_are_the_sliding_window_patches(ct_pipeline):
    from segsentry.calib.quantize import calibration_patches
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.io import collect_cases
    from segsentry.runtime.pipeline import infer_volume
    from segsentry.runtime.preprocess import preprocess

    manifest = load_bundle(ct_pipeline.ood_onnx).manifest
    seen: list[np.ndarray] = []

    class Recorder:
        name = "recorder"

        def run(self, batch):
            seen.extend(batch.copy())
            n = len(batch)
            return {"logits": np.zeros((n, manifest.num_classes, *manifest.patch_size), np.float32),
                    "distance": np.zeros(n, np.float32)}

        run_network = run  # mirrored flips

    for case in collect_cases([ct_pipeline.images], num_channels=1):
        data, _ = preprocess(*(lambda c: (c.image, c.spacing))(read_case(case, num_channels=1)),
                             manifest.preprocessing)
        infer_volume(data, Recorder(), manifest)
    patches = list(calibration_patches(manifest, [ct_pipeline.images], max_patches=7))
    assert len(patches) == 7
    assert all(p.shape == (1, 1, *manifest.patch_size) and p.dtype == np.float32 for p in patches)
    for p in patches:
        assert any(np.array_equal(p[0], s) for s in seen)
    assert len({p.tobytes() for p in patches}) == 7, "spread over tiles, no repeats"


def test_recorded_fidelity_matches_two_ood_runs(quantized, ct_pipeline, test_cases, tmp_path):
    from segsentry.calib.quantize import foreground_dice
    from segsentry.runtime import run_batch

    fidelity_files = [f for files in test_cases["ct"].values() for f in files]
    a = run_batch(ct_pipeline.ood_onnx, fidelity_files, tmp_path / "fp32", backend="onnxruntime", qa=False)
    b = run_batch(quantized.path, fidelity_files, tmp_path / "int8", backend="onnxruntime", qa=False)
    assert [o.status for o in b.outcomes] == ["ok"] * len(fidelity_files)
    by_case = {c.case_id: c for c in quantized.cases}
    agreements, dices = [], []
    for oa, ob in zip(a.outcomes, b.outcomes):
        ma = sitk.GetArrayFromImage(sitk.ReadImage(oa.report.outputs["mask"]))
        mb = sitk.GetArrayFromImage(sitk.ReadImage(ob.report.outputs["mask"]))
        case = by_case[oa.case_id]
        assert case.voxel_agreement == float(np.mean(ma == mb))
        assert case.dice == foreground_dice(mb, ma)
        assert abs(case.u_fp32 - oa.report.uncertainty) < 1e-9 and abs(case.u_int8 - ob.report.uncertainty) < 1e-9
        agreements.append(case.voxel_agreement)
        dices.append(case.dice)
    f = quantized.quantization.fidelity
    assert f.voxel_agreement_min == min(agreements) and f.dice_min == min(dices)
    assert f.flags_changed == sum(oa.report.ood != ob.report.ood for oa, ob in zip(a.outcomes, b.outcomes))
    assert f.voxel_agreement_min > 0.9  # a broken quantisation (e.g. wrong ranges) lands far below


def test_foreground_dice():
    from segsentry.calib.quantize import foreground_dice

    a = np.array([0, 1, 2, 2, 0])
    assert foreground_dice(a, a) == 1.0
    assert foreground_dice(np.zeros(3), np.zeros(3)) == 1.0
    assert foreground_dice(np.array([0, 1, 0, 0, 0]), a) == pytest.approx(2 * 1 / (1 + 3))


def test_quantising_twice_is_refused(quantized, ct_pipeline, tmp_path):
    from segsentry.calib.quantize import quantize_bundle
    from segsentry.errors import BundleError

    with pytest.raises(BundleError, match="already quantised"):
        quantize_bundle(quantized.path, tmp_path / "x.onnx", calibration_images=[ct_pipeline.images])


def test_quantize_cli(ct_pipeline, tmp_path):
    from segsentry.cli import app
    from segsentry.runtime import load_bundle

    out = tmp_path / "cli.int8.onnx"
    result = CliRunner().invoke(app, ["quantize", str(ct_pipeline.ood_onnx), "-o", str(out),
                                      "--calibration-images", str(ct_pipeline.images), "--max-patches", "4"])
    assert result.exit_code == 0, result.output
    assert load_bundle(out).manifest.quantization.n_calibration_patches == 4
    result = CliRunner().invoke(app, ["quantize", str(ct_pipeline.ood_onnx), "-o", str(out),
                                      "--calibration-images", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "error" in result.output
