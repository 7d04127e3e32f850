"""Several feature taps of one network in one graph (``segsentry fuse-taps``): each tap's distance equals its own
bundle's, U is the documented mean on the first tap's scale, the threshold is the conformal rule on the fused
calibration U, the network is stored once, and what cannot be fused is refused by name."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from factory import write_volume

from segsentry.calib import calibrate
from segsentry.calib.taps import calibration_uncertainties, fuse_taps, tap_output_name
from segsentry.contract import HEAD_SCOPE
from segsentry.errors import BundleError, CalibrationError
from segsentry.runtime import load_bundle, run_batch
from segsentry.runtime.backends import create_backend

pytest.importorskip("torch")

ALPHA = 0.25
SECOND = "decoder.stages.0"


@pytest.fixture(scope="module")
def taps(tmp_path_factory):
    """A 2-fold ensemble calibrated at its default layer and at ``SECOND`` on the same cases (U fused with the
    folds' disagreement, as the shipped demo), and the two bundles fused."""
    from factory import CT_SPEC, ct_volume, make_model_folder

    from segsentry.export import export_nnunet

    root = tmp_path_factory.mktemp("taps")
    model_dir = make_model_folder(root / "results", CT_SPEC, folds=(0, 1))
    rng = np.random.default_rng(17)
    for folder, n in (("train", 4), ("cal", 5), ("new", 2)):
        for i in range(n):
            write_volume(root / folder / f"{folder}{i}_0000.nii.gz", ct_volume(rng, shape_zyx=(8, 48, 40)),
                         spacing_xyz=(0.8, 0.75, 4.0))
    first = export_nnunet(model_dir, root / "first.features.onnx", verify=False).path
    second = root / "second.features.onnx"
    assert _cli("retap", first, "--layer", SECOND, "-o", second).exit_code == 0  # the same graph, tapped again
    bundles = {name: calibrate(features, [root / "train"], root / f"{name}.ood.onnx",
                               calibration_images=[root / "cal"], alpha=ALPHA).path
               for name, features in (("first", first), ("second", second))}
    result = fuse_taps(bundles["first"], [bundles["second"]], root / "fused.ood.onnx")
    return root, model_dir, bundles, result


def _cli(*args):
    from typer.testing import CliRunner

    from segsentry.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _reports(bundle, folder, out, **kwargs):
    run = run_batch(bundle, [folder], out, qa=False, **kwargs)
    return {o.case_id: json.loads((out / f"{o.case_id}.json").read_text()) for o in run.outcomes}


def test_fused_u_is_the_mean_of_the_taps_u_on_the_first_scale(taps, tmp_path):
    """ood-run on new cases: the fused bundle's U is the mean of the first bundle's U and the second's mapped by
    the recorded affine map (1e-9), each reported by layer; the masks are the first bundle's, voxel for voxel; the
    mapped calibration U matches the first's median and 95th percentile, and the threshold is the conformal
    k-th smallest of the fused calibration U."""
    import SimpleITK as sitk

    root, _, bundles, result = taps
    c = result.calibration
    (tap,) = c.taps
    assert tap.output == tap_output_name(1) and tap.features.layer == SECOND
    assert result.max_rel_error <= 1e-5
    first_u = calibration_uncertainties(load_bundle(bundles["first"]).manifest.calibration)
    second_u = calibration_uncertainties(tap.calibration)
    mapped = tap.offset + tap.scale * second_u
    assert np.median(mapped) == pytest.approx(np.median(first_u), abs=1e-12)
    assert np.quantile(mapped, 0.95) == pytest.approx(np.quantile(first_u, 0.95), abs=1e-12)
    fused = sorted(0.5 * (first_u + mapped))
    assert c.threshold == pytest.approx(fused[math.ceil((len(fused) + 1) * (1 - ALPHA)) - 1], abs=1e-12)
    assert load_bundle(result.path).manifest.calibration == c  # the manifest round trip keeps every tap

    first_layer = load_bundle(bundles["first"]).manifest.features.layer
    got = _reports(result.path, root / "new", tmp_path / "fused")
    want = {name: _reports(bundles[name], root / "new", tmp_path / name) for name in ("first", "second")}
    for case, r in got.items():
        u_first, u_second = want["first"][case]["uncertainty"], want["second"][case]["uncertainty"]
        expected = 0.5 * (u_first + tap.offset + tap.scale * u_second)
        assert r["uncertainty"] == pytest.approx(expected, abs=1e-9)
        assert r["tap_uncertainties"] == pytest.approx({first_layer: u_first,
                                                        SECOND: tap.offset + tap.scale * u_second}, abs=1e-9)
        assert r["ood"] == (r["uncertainty"] > c.threshold)
        masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(d / f"{case}.nii.gz")))
                 for d in (tmp_path / "fused", tmp_path / "first")]
        np.testing.assert_array_equal(*masks)


def test_the_fused_graph_stores_the_network_once_and_each_head(taps):
    """Outputs logits, distance and distance_tap1; the second tap adds only its pooling and its heads (every
    added initializer under ood_head/tap1/ or tap1/), so the file grows by the second bundle's head bytes alone
    (within 1 KiB); the heads alone can be extracted (ood-bench times them)."""
    root, _, bundles, result = taps
    graphs = {name: onnx.load(str(p)).graph for name, p in (*bundles.items(), ("fused", result.path))}
    assert [o.name for o in graphs["fused"].output] == ["logits", "distance", tap_output_name(1)]

    def head_bytes(graph, scope=HEAD_SCOPE):
        return sum(len(i.raw_data) for i in graph.initializer if i.name.startswith(scope))

    added = {i.name for i in graphs["fused"].initializer} - {i.name for i in graphs["first"].initializer}
    assert added and all(name.startswith(HEAD_SCOPE + "tap1/") or name.startswith("tap1/") for name in added)
    total = {name: sum(len(i.raw_data) for i in g.initializer) for name, g in graphs.items()}
    # identical small constants (the folds' index scalars) are shared with the first head, not copied
    assert 0 <= head_bytes(graphs["second"]) - head_bytes(graphs["fused"], HEAD_SCOPE + "tap1/") <= 1024
    assert 0 <= total["fused"] - total["first"] - head_bytes(graphs["fused"], HEAD_SCOPE + "tap1/") <= 1024
    from segsentry.bench import head_only

    # each tap's features keep their declared type, so the heads can be cut out of the graph alone
    head = onnx.load_model_from_string(head_only(load_bundle(result.path))).graph
    assert [i.name for i in head.input] == ["features", "tap1/features"]
    assert [o.name for o in head.output] == ["distance", tap_output_name(1)]


def test_openvino_runs_the_fused_bundle_as_onnxruntime_does(taps):
    """The OpenVINO backend (network compiled, heads in float32 on onnxruntime) gives both taps' distances."""
    pytest.importorskip("openvino")
    _, _, _, result = taps
    bundle = load_bundle(result.path)
    m = bundle.manifest
    x = np.random.default_rng(2).standard_normal((2, 1, *m.patch_size)).astype(np.float32)
    outs = {}
    for name in ("onnxruntime", "openvino"):
        with create_backend(name, bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                            manifest=m) as engine:
            outs[name] = engine.run(x)
    for key in ("distance", tap_output_name(1)):
        np.testing.assert_allclose(outs["openvino"][key], outs["onnxruntime"][key], rtol=1e-3)


def test_the_torch_backend_refuses_a_fused_bundle_by_name(taps):
    """The torch reference scores one tap; a fused bundle is refused before anything is loaded, naming the
    backends that run it."""
    from segsentry.errors import BackendError

    _, _, _, result = taps
    bundle = load_bundle(result.path)
    m = bundle.manifest
    with pytest.raises(BackendError, match="fuses 2 .*onnxruntime or openvino"):
        create_backend("torch", bundle.model_bytes, channels=1, patch_size=m.patch_size, manifest=m)


def test_fuse_taps_refuses_what_is_not_one_network_calibrated_alike(taps, tmp_path):
    from factory import CT_SPEC, make_model_folder

    from segsentry.export import export_nnunet

    root, model_dir, bundles, result = taps
    with pytest.raises(BundleError, match="taps the same layer"):
        fuse_taps(bundles["first"], [bundles["first"]], tmp_path / "a.onnx")
    with pytest.raises(BundleError, match="already fuses"):
        fuse_taps(result.path, [bundles["second"]], tmp_path / "b.onnx")
    with pytest.raises(BundleError, match="not calibrated"):
        fuse_taps(bundles["first"], [root / "second.features.onnx"], tmp_path / "c.onnx")
    with pytest.raises(CalibrationError, match="overwrite"):
        fuse_taps(bundles["first"], [bundles["second"]], bundles["second"])
    features = root / "second.features.onnx"
    other_cases = calibrate(features, [root / "train"], tmp_path / "d.ood.onnx",
                            calibration_images=[root / "cal", root / "new"], alpha=ALPHA).path
    with pytest.raises(CalibrationError, match="calibrated differently|other cases"):
        fuse_taps(bundles["first"], [other_cases], tmp_path / "e.onnx")
    traced_again = calibrate(export_nnunet(model_dir, tmp_path / "t.features.onnx", layer=SECOND, verify=False).path,
                             [root / "train"], tmp_path / "t.ood.onnx", calibration_images=[root / "cal"],
                             alpha=ALPHA).path
    with pytest.raises(BundleError, match="exported separately"):
        fuse_taps(bundles["first"], [traced_again], tmp_path / "g.onnx")
    other_dir = make_model_folder(tmp_path / "results", CT_SPEC, folds=(0, 1), seed=99)
    other = calibrate(export_nnunet(other_dir, tmp_path / "o.features.onnx", layer=SECOND, verify=False).path,
                      [root / "train"], tmp_path / "o.ood.onnx", calibration_images=[root / "cal"], alpha=ALPHA).path
    with pytest.raises((BundleError, CalibrationError), match="not the same network|calibration cases"):
        fuse_taps(bundles["first"], [other], tmp_path / "f.onnx")
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".onnx" and p.name[0] in "abcefg"]


def test_the_first_taps_features_bundle_comes_out_of_a_fused_bundle(taps, tmp_path):
    """devtools.head_forms.features_bundle (what scripts/recalibrate_demo.py starts from) gives the first tap's
    network and features: the same outputs as the first tap's own features bundle."""
    from segsentry.devtools.head_forms import features_bundle

    root, _, _, result = taps
    (tmp_path / "first.features.onnx").write_bytes(features_bundle(result.path.read_bytes()))
    got = load_bundle(tmp_path / "first.features.onnx")
    want = load_bundle(root / "first.features.onnx")
    assert got.manifest.features == want.manifest.features and got.manifest.calibration is None
    m = want.manifest
    x = np.random.default_rng(4).standard_normal((1, 1, *m.patch_size)).astype(np.float32)
    outs = []
    for bundle in (got, want):
        with create_backend("onnxruntime", bundle.model_bytes, channels=1, patch_size=m.patch_size) as engine:
            outs.append(engine.run(x))
    np.testing.assert_array_equal(outs[0]["features"], outs[1]["features"])
