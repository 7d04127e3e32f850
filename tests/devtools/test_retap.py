"""retap: a features bundle tapped at another layer from its graph alone equals ood-export at that layer."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("dynamic_network_architectures")

from segsentry.devtools.nnunet_folder import CT_SPEC, make_model_folder  # noqa: E402
from segsentry.devtools.retap import retap  # noqa: E402
from segsentry.export import export_nnunet  # noqa: E402
from segsentry.runtime import load_bundle  # noqa: E402
from segsentry.runtime.backends import create_backend  # noqa: E402


def _outputs(path, batch):
    bundle = load_bundle(path)
    m = bundle.manifest
    with create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size) as e:
        return m, e.run(batch)


@pytest.mark.parametrize(("folds", "layer"), [((0,), "decoder.stages.1"), ((0, 1), "decoder.stages.0"),
                                              ((0, 1), "encoder.stages.2")])
def test_retap_equals_export_at_that_layer(tmp_path, folds, layer):
    """One fold and a 2-fold ensemble (different weights per fold), decoder and encoder layers: the retapped
    bundle's manifest FeatureSpec equals ood-export's at that layer, its features agree with the export's within
    1e-6 of their scale (float32 pooling order) and its logits are bit-identical to the bundle it came from."""
    model_dir = make_model_folder(tmp_path / "results", CT_SPEC, folds=folds)
    default = export_nnunet(model_dir, tmp_path / "default.onnx", verify=False).path
    direct = export_nnunet(model_dir, tmp_path / "direct.onnx", layer=layer, verify=False).path
    moved = tmp_path / "moved.onnx"
    moved.write_bytes(retap(default.read_bytes(), layer))
    batch = np.random.default_rng(5).standard_normal((2, 1, *CT_SPEC.patch_size)).astype(np.float32)
    (m_default, before), (m_direct, want), (m_moved, got) = (_outputs(p, batch) for p in (default, direct, moved))
    assert m_moved.features == m_direct.features and m_moved.features != m_default.features
    assert m_moved.n_folds == len(folds) and set(got) == {"logits", "features"}
    assert got["features"].shape == want["features"].shape
    scale = float(np.abs(want["features"]).max())
    assert scale > 0
    np.testing.assert_allclose(got["features"], want["features"], rtol=0, atol=1e-6 * scale)
    np.testing.assert_array_equal(got["logits"], before["logits"])


def test_retap_refuses_what_it_cannot_tap(tmp_path, ct_pipeline):
    """A calibrated bundle, an unknown layer and a layer path with a negative index are refused by name."""
    with pytest.raises(ValueError, match="features bundle"):
        retap(ct_pipeline.ood_onnx.read_bytes(), "decoder.stages.0")
    with pytest.raises(ValueError, match="module scope 'network.decoder.stages.9'"):
        retap(ct_pipeline.features_onnx.read_bytes(), "decoder.stages.9")
    with pytest.raises(ValueError, match="canonical"):
        retap(ct_pipeline.features_onnx.read_bytes(), "decoder.stages.-1")
