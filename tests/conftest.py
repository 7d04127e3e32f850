"""Shared fixtures: tiny nnU-Net model folders exported and calibrated once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from factory import CT_SPEC, MR_SPEC, ModelSpec, ct_volume, make_model_folder, mr_volumes, write_volume

CT_SPACING_XYZ = (0.8, 0.75, 4.0)  # anisotropic: resampled with separate z
MR_SPACING_XYZ = (1.0, 1.1, 1.3)


@dataclass(frozen=True)
class Pipeline:
    spec: ModelSpec
    model_dir: Path
    images: Path  # nnU-Net raw imagesTr layout
    cases: dict[str, list[Path]]
    features_onnx: Path
    ood_onnx: Path
    features_kept_onnx: Path


def _write_cases(root: Path, spec: ModelSpec, n: int, seed: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(seed)
    cases: dict[str, list[Path]] = {}
    for i in range(n):
        case = f"{spec.name.split('_')[1].lower()}{seed}{i:02d}"
        if spec is CT_SPEC:
            volumes = [ct_volume(rng)]
            spacing = CT_SPACING_XYZ
        else:
            volumes = mr_volumes(rng)
            spacing = MR_SPACING_XYZ
        cases[case] = [write_volume(root / f"{case}_{c:04d}.nii.gz", v, spacing_xyz=spacing)
                       for c, v in enumerate(volumes)]
    return cases


def _build(tmp_path_factory: pytest.TempPathFactory, spec: ModelSpec) -> Pipeline:
    pytest.importorskip("torch")
    pytest.importorskip("dynamic_network_architectures")
    from segsentry.calib import calibrate
    from segsentry.export import export_nnunet

    root = tmp_path_factory.mktemp(spec.name)
    model_dir = make_model_folder(root / "results", spec)
    images = root / "imagesTr"
    cases = _write_cases(images, spec, 4, seed=0)
    features = export_nnunet(model_dir, root / "model.features.onnx").path
    ood = calibrate(features, [images], root / "model.ood.onnx", estimator="ledoit-wolf", score_folds=1,
                    threshold_rule="paper").path  # the authors' procedure: in-sample scores, 95 % TPR boundary
    kept = calibrate(features, [images], root / "model.kept.ood.onnx", estimator="empirical",
                     keep_features=True).path
    return Pipeline(spec, model_dir, images, cases, features, ood, kept)


@pytest.fixture(scope="session")
def ct_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return _build(tmp_path_factory, CT_SPEC)


@pytest.fixture(scope="session")
def mr_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return _build(tmp_path_factory, MR_SPEC)


@pytest.fixture(scope="session")
def test_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[Path]]]:
    """Held-out cases (other seeds) for both pipelines: {'ct': {...}, 'mr': {...}}."""
    root = tmp_path_factory.mktemp("test_cases")
    return {"ct": _write_cases(root / "ct", CT_SPEC, 2, seed=7), "mr": _write_cases(root / "mr", MR_SPEC, 2, seed=7)}
