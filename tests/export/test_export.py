"""Export: pooling plan, layer selection, ONNX vs torch, manifest contents, checkpoint safety."""

from __future__ import annotations

import json
import pickle

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from segsentry.errors import ExportError, ModelFolderError  # noqa: E402
from segsentry.export import export_module, export_nnunet  # noqa: E402
from segsentry.export.pooling import pooling_plan  # noqa: E402
from segsentry.manifest import Preprocessing, read_manifest  # noqa: E402


@pytest.mark.parametrize(
    ("shape", "kernels", "dim"),
    [
        ((320, 4, 4, 4), [[2, 2, 2]], 320 * 8),  # nnU-Net 3d_fullres bottleneck: 20480 -> 2560
        ((32, 8, 16, 16), [[2, 2, 2]], 32 * 4 * 8 * 8),  # 65536 -> 8192
        ((64, 1, 16, 16), [[1, 2, 2]], 64 * 8 * 8),  # axis of size 1 keeps kernel 1
        ((32, 2, 4, 4), [], 1024),  # already below 1e4
        ((20000, 1, 1, 1), [], 20000),  # nothing left to pool
        ((16, 5, 25, 25), [[2, 2, 2]], 16 * 2 * 12 * 12),  # odd sizes floor like avg_pool3d
    ],
)
def test_pooling_plan(shape, kernels, dim):
    assert pooling_plan(shape) == (kernels, dim)


def test_pooling_plan_matches_torch_shapes():
    x = torch.zeros((1, 16, 5, 25, 25))
    kernels, dim = pooling_plan(x.shape[1:])
    for k in kernels:
        x = torch.nn.functional.avg_pool3d(x, kernel_size=k, stride=k)
    assert x.numel() == dim


class TinyNet(torch.nn.Module):
    """A non-nnU-Net 3D segmentation net with a named block to tap."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Conv3d(8, 8, 3, padding=1), torch.nn.ReLU())
                                           for _ in range(2)])
        self.head = torch.nn.Conv3d(8, 3, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _spec() -> Preprocessing:
    return Preprocessing(transpose_forward=[0, 1, 2], transpose_backward=[0, 1, 2], spacing=[1.0, 1.0, 1.0],
                         normalization_schemes=["ZScoreNormalization"], use_mask_for_norm=[False],
                         intensity_properties={"0": {}})


def test_export_module_any_network(tmp_path):
    torch.manual_seed(0)
    result = export_module(TinyNet().eval(), tmp_path / "tiny.features.onnx", patch_size=(8, 16, 16), in_channels=1,
                           labels={"background": 0, "a": 1, "b": 2}, preprocessing=_spec(), layer="blocks.-1")
    m = result.manifest
    assert m.features.layer == "blocks.1"
    assert m.features.layer_shape == [8, 8, 16, 16]
    assert m.features.pooling == [[2, 2, 2]]  # 16384 -> 2048
    assert m.features.dim == 8 * 4 * 8 * 8
    v = result.verification
    assert v.logits_max_abs <= 1e-4 * max(1, v.logits_scale)
    assert v.features_max_abs <= 1e-4 * max(1, v.features_scale)
    model = onnx.load(str(result.path))
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert read_manifest(result.path.read_bytes()).features == m.features


def test_export_rejects_bad_layer(tmp_path):
    with pytest.raises(ExportError, match="not a submodule"):
        export_module(TinyNet(), tmp_path / "x.onnx", patch_size=(8, 16, 16), in_channels=1, labels={"bg": 0, "a": 1},
                      preprocessing=_spec(), layer="blocks.nope")
    with pytest.raises(ExportError, match="out of range"):
        export_module(TinyNet(), tmp_path / "x.onnx", patch_size=(8, 16, 16), in_channels=1, labels={"bg": 0, "a": 1},
                      preprocessing=_spec(), layer="blocks.5")
    assert not (tmp_path / "x.onnx").exists()


def test_nnunet_export_manifest_and_parity(ct_pipeline):
    """The session fixture exported the CT folder; check what the manifest took from the plans."""
    manifest = read_manifest(ct_pipeline.features_onnx.read_bytes())
    plans = json.loads((ct_pipeline.model_dir / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert manifest.source["kind"] == "nnunetv2"
    assert manifest.patch_size == config["patch_size"]
    assert manifest.preprocessing.spacing == config["spacing"]
    assert manifest.preprocessing.transpose_forward == plans["transpose_forward"]
    assert manifest.preprocessing.normalization_schemes == ["CTNormalization"]
    assert manifest.preprocessing.intensity_properties["0"]["percentile_99_5"] == 900.0
    assert manifest.features.layer == "encoder.stages.3"
    assert manifest.labels == {"background": 0, "lesion": 1, "vessel": 2}
    assert manifest.tiling.mirror_axes == [0, 1, 2]  # the checkpoint's inference_allowed_mirroring_axes


def test_mirroring_plan_for_new_old_and_disabled_bundles(ct_pipeline):
    from dataclasses import replace

    from segsentry.runtime.pipeline import mirroring_plan

    manifest = read_manifest(ct_pipeline.ood_onnx.read_bytes())
    assert mirroring_plan(manifest) == ([0, 1, 2], [])
    axes, notes = mirroring_plan(manifest, mirroring=False)
    assert axes is None and "--disable-tta" in notes[0]
    old = manifest.replace(tiling=replace(manifest.tiling, mirror_axes=None))  # a bundle from before mirroring
    axes, notes = mirroring_plan(old)
    assert axes is None and "records no allowed mirroring axes" in notes[0]
    none_allowed = manifest.replace(tiling=replace(manifest.tiling, mirror_axes=[]))
    assert mirroring_plan(none_allowed) == (None, [])


def test_nnunet_export_selectable_layer_and_torch_parity(ct_pipeline, tmp_path):
    result = export_nnunet(ct_pipeline.model_dir, tmp_path / "stage1.onnx", layer="encoder.stages.1")
    assert result.manifest.features.layer_shape == [8, 8, 16, 16]
    assert result.manifest.features.pooling == [[2, 2, 2]]
    v = result.verification
    assert v.logits_max_abs <= 1e-4 * max(1, v.logits_scale)
    assert v.features_max_abs <= 1e-4 * max(1, v.features_scale)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_arbitrary_objects_is_refused(ct_pipeline, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(ct_pipeline.model_dir, folder)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    state = torch.load(checkpoint, weights_only=False)
    state["evil"] = _Evil()
    torch.save(state, checkpoint, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ModelFolderError, match="weights_only"):
        export_nnunet(folder, tmp_path / "out.onnx")


def test_missing_model_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        export_nnunet(tmp_path / "nope", tmp_path / "o.onnx")
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelFolderError, match="plans.json not found"):
        export_nnunet(tmp_path / "m", tmp_path / "o.onnx")


def test_features_output_equals_pooled_layer(ct_pipeline):
    """The graph's features are avg-pooled + flattened encoder output (checked against torch directly)."""
    import onnxruntime as ort

    from segsentry.export.nnunet import load_model_folder

    model = load_model_folder(ct_pipeline.model_dir)
    x = np.random.default_rng(1).standard_normal((1, 1, *model.patch_size)).astype(np.float32)
    with torch.no_grad():
        skips = model.network.encoder(torch.from_numpy(x))
    expected = skips[-1].flatten(1).numpy()
    session = ort.InferenceSession(str(ct_pipeline.features_onnx), providers=["CPUExecutionProvider"])
    _, features = session.run(None, {"image": x})
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_numpy1_checkpoint_loads_weights_only(ct_pipeline, tmp_path):
    """A checkpoint pickled under numpy 1 (``numpy.core.multiarray.scalar``) exports like a numpy 2 one."""
    import re
    import shutil
    import zipfile

    from segsentry.devtools.nnunet_folder import rewrite_as_numpy1
    from segsentry.export.nnunet import load_model_folder

    folder = tmp_path / "model"
    shutil.copytree(ct_pipeline.model_dir, folder)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    rewrite_as_numpy1(checkpoint)
    with zipfile.ZipFile(checkpoint) as archive:
        pickled = next(archive.read(n) for n in archive.namelist() if n.endswith("/data.pkl"))
    assert set(re.findall(rb"c(numpy[\w.]*)\n(\w+)\n", pickled)) == {(b"numpy.core.multiarray", b"scalar"),
                                                                     (b"numpy", b"dtype")}
    model = load_model_folder(folder)
    reference = load_model_folder(ct_pipeline.model_dir)
    for (name, a), b in zip(model.network.state_dict().items(), reference.network.state_dict().values()):
        assert torch.equal(a, b), name
    result = export_nnunet(folder, tmp_path / "numpy1.features.onnx", verify=False)
    assert result.manifest.features == read_manifest(ct_pipeline.features_onnx.read_bytes()).features


def test_refused_checkpoint_message_has_no_escape_codes(ct_pipeline, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(ct_pipeline.model_dir, folder)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    state = torch.load(checkpoint, weights_only=False)
    state["evil"] = _Evil()
    torch.save(state, checkpoint)
    with pytest.raises(ModelFolderError) as info:
        export_nnunet(folder, tmp_path / "out.onnx")
    assert "Weights only load failed" in str(info.value)  # torch's message, which prints bold text
    assert "\x1b" not in str(info.value)


@pytest.mark.parametrize(("args", "expected"), [
    (["--folds", "0", "1", "2"], {"folds": ["0", "1", "2"], "fold": None}),  # nnU-Net's "-f 0 1 2" form
    (["--folds", "0", "--folds", "3"], {"folds": ["0", "3"], "fold": None}),
    (["--fold", "2"], {"folds": None, "fold": "2"}),
    ([], {"folds": None, "fold": None}),  # every fold_N with the checkpoint
])
def test_export_cli_fold_selection(args, expected, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import segsentry.export
    from segsentry.cli import export_app

    seen = {}

    def fake_export(model_dir, output, **kwargs):
        seen.update(kwargs)
        raise ModelFolderError("stop here")

    monkeypatch.setattr(segsentry.export, "export_nnunet", fake_export)
    result = CliRunner().invoke(export_app, [str(tmp_path), *args, "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 1 and "stop here" in result.output, result.output
    assert {k: seen[k] for k in expected} == expected


@pytest.mark.parametrize("args", [["--fold", "1", "--folds", "0"], ["--folds", "0", "x"], ["1", "2"]])
def test_export_cli_rejects_bad_fold_selection(args, tmp_path):
    from typer.testing import CliRunner

    from segsentry.cli import export_app

    result = CliRunner().invoke(export_app, [str(tmp_path), *args, "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2, result.output


def test_ensemble_export_size_and_manifest(tmp_path):
    """Three folds in one bundle: the weights are three folds' (initializer bytes exactly 3x, no shared or
    duplicated constants beyond a few bytes), the manifest lists each fold with its checkpoint's sha256."""
    import hashlib

    from segsentry.devtools.nnunet_folder import CT_SPEC, make_model_folder

    model_dir = make_model_folder(tmp_path / "results", CT_SPEC, folds=(0, 1, 2))
    one = export_nnunet(model_dir, tmp_path / "one.onnx", fold=1, verify=False)
    three = export_nnunet(model_dir, tmp_path / "three.onnx", verify=False)
    assert [f.fold for f in one.manifest.folds] == ["1"] and one.manifest.n_folds == 1
    assert [f.fold for f in three.manifest.folds] == ["0", "1", "2"]
    for f in three.manifest.folds:
        digest = hashlib.sha256((model_dir / f"fold_{f.fold}" / "checkpoint_final.pth").read_bytes()).hexdigest()
        assert f.sha256 == digest
    assert len({f.sha256 for f in three.manifest.folds}) == 3

    def weight_bytes(path):
        return sum(len(i.raw_data) for i in onnx.load(str(path)).graph.initializer)

    assert abs(weight_bytes(tmp_path / "three.onnx") - 3 * weight_bytes(tmp_path / "one.onnx")) < 1024
    model = onnx.load(str(three.path))
    shapes = {o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert shapes["logits"][1:] == [3, 3, *CT_SPEC.patch_size] and shapes["features"][1:] == [3, three.manifest.features.dim]
    with pytest.raises(ModelFolderError, match="fold_7"):
        export_nnunet(model_dir, tmp_path / "x.onnx", folds=[0, 7])
