"""Real oracles for the whole spine: nnU-Net's own predictor for masks, sklearn for distances.

Tolerances:
- masks: at most max(2, 1e-4 · n_voxels) voxels may differ from ``nnUNetPredictor`` (CPU, step 0.5, with
  nnU-Net's default test-time mirroring over the checkpoint's axes, and with ``--disable-tta``). Both
  accumulate logits in float16; onnxruntime's and torch's convolutions differ by ~1e-6, which can flip a voxel
  whose two best float16 logits tie.
- distances: fused ONNX head (float32) vs sklearn's float64 Mahalanobis on the same features, rtol 1e-3.
- top patches: boxes exact (integer voxel ranges), centres within 1e-6 mm of SimpleITK's and numpy's
  index-to-physical mapping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from factory import (
    ct_volume,
    network_box_to_input_ranges,
    nnunet_network_geometry,
    nnunet_predict,
    write_volume,
)

pytest.importorskip("nnunetv2")
sklearn_covariance = pytest.importorskip("sklearn.covariance")


def _mask_tolerance(n: int) -> int:
    return max(2, int(1e-4 * n))


@pytest.mark.parametrize(("kind", "mirroring"), [("ct", True), ("mr", True), ("ct", False)])
def test_masks_match_nnunet_predictor(kind, mirroring, request, test_cases, tmp_path):
    from segsentry.runtime import run_batch

    pipeline = request.getfixturevalue(f"{kind}_pipeline")
    cases = test_cases[kind]
    if mirroring:  # nnU-Net's 8 flips per patch: one case is enough (and costs 8x)
        cases = dict(list(cases.items())[:1])
    inputs = [f for files in cases.values() for f in files]
    result = run_batch(pipeline.ood_onnx, inputs, tmp_path / "out", mirroring=mirroring)
    assert [o.status for o in result.outcomes] == ["ok"] * len(cases)
    assert [o.report.mirror_axes for o in result.outcomes] == [[0, 1, 2] if mirroring else None] * len(cases)
    for case_id, files in cases.items():
        ours_image = sitk.ReadImage(str(tmp_path / "out" / f"{case_id}.nii.gz"))
        reference_image = sitk.ReadImage(str(files[0]))
        # written with the input geometry
        assert ours_image.GetSize() == reference_image.GetSize()
        np.testing.assert_allclose(ours_image.GetSpacing(), reference_image.GetSpacing())
        np.testing.assert_allclose(ours_image.GetOrigin(), reference_image.GetOrigin())
        np.testing.assert_allclose(ours_image.GetDirection(), reference_image.GetDirection())
        ours = sitk.GetArrayFromImage(ours_image)
        expected = nnunet_predict(pipeline.model_dir, files, use_mirroring=mirroring)
        assert ours.shape == expected.shape
        mismatches = int((ours != expected).sum())
        assert mismatches <= _mask_tolerance(ours.size), f"{case_id}: {mismatches} of {ours.size} voxels differ"
        assert len(np.unique(expected)) > 1, "test network should predict more than one class"
        uncertainty = sitk.ReadImage(str(tmp_path / "out" / f"{case_id}_uncertainty.nii.gz"))
        assert uncertainty.GetPixelID() == sitk.sitkFloat32
        assert uncertainty.GetSize() == reference_image.GetSize()


def _patch_features_and_distances(bundle_path, case_files, num_channels):
    """Run a bundle over one case through the runtime core; return per-patch outputs."""
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.io import CaseInput
    from segsentry.runtime.pipeline import infer_volume
    from segsentry.runtime.preprocess import preprocess

    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    loaded = read_case(CaseInput("c", tuple(case_files)), num_channels=num_channels)
    data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
    with create_backend("onnxruntime", bundle.model_bytes, channels=num_channels, patch_size=m.patch_size) as b:
        return infer_volume(data, b, m, accumulate_logits=False, collect_features="features" in m.outputs)


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_fused_distances_match_sklearn(kind, request, test_cases):
    pipeline = request.getfixturevalue(f"{kind}_pipeline")
    channels = len(pipeline.spec.channels)
    train = np.concatenate([
        _patch_features_and_distances(pipeline.features_onnx, files, channels).features
        for files in pipeline.cases.values()
    ]).astype(np.float64)
    test_files = next(iter(test_cases[kind].values()))

    kept = _patch_features_and_distances(pipeline.features_kept_onnx, test_files, channels)
    expected = sklearn_covariance.EmpiricalCovariance().fit(train).mahalanobis(kept.features.astype(np.float64))
    np.testing.assert_allclose(kept.distances, expected, rtol=1e-3)

    test_features = _patch_features_and_distances(pipeline.features_onnx, test_files, channels).features
    fused = _patch_features_and_distances(pipeline.ood_onnx, test_files, channels).distances
    expected = sklearn_covariance.LedoitWolf().fit(train).mahalanobis(test_features.astype(np.float64))
    np.testing.assert_allclose(fused, expected, rtol=1e-3)


def test_runtime_scores_training_cases_as_calibration_did(ct_pipeline, tmp_path):
    """Calibration and ood-run share one sliding-window core: same case, same score."""
    from segsentry.runtime import load_bundle, run_batch

    calibration = load_bundle(ct_pipeline.ood_onnx).manifest.calibration
    result = run_batch(ct_pipeline.ood_onnx, [ct_pipeline.images], tmp_path / "out")
    scores = [o.report.score for o in result.outcomes]
    np.testing.assert_allclose(sorted(scores), sorted(calibration.train_scores), rtol=1e-5)
    report = json.loads((tmp_path / "out" / f"{result.outcomes[0].case_id}.json").read_text())
    assert report["ood"] == (report["uncertainty"] > report["threshold"])
    assert sum(o.report.ood for o in result.outcomes) <= 1  # 95 % TPR on 4 training cases
    assert report["model_sha256"] == load_bundle(ct_pipeline.ood_onnx).weights_sha256
    assert len(report["top_patches"]) >= 1
    box = report["top_patches"][0]["box_zyx"]
    shape = sitk.GetArrayViewFromImage(sitk.ReadImage(str(ct_pipeline.cases[result.outcomes[0].case_id][0]))).shape
    assert all(0 <= lo < hi <= n for (lo, hi), n in zip(box, shape))


def _thin_ct_case(folder):
    """Six 4 mm slices: 10 after resampling to 2.5 mm, so the network pads z to the 16-slice patch (3 + 3).

    One tile then spans the padded axis, so its box must be clipped to the 10 real slices (the padding offset
    itself cannot show in a box: a padded axis always holds exactly one tile).
    """
    volume = ct_volume(np.random.default_rng(5), shape_zyx=(6, 80, 70))
    return {"thin": [write_volume(folder / "thin_0000.nii.gz", volume, spacing_xyz=(0.8, 0.75, 4.0))]}


@pytest.mark.parametrize("kind", ["ct-train", "ct-thin-padded", "mr-test"])
def test_top_patches_match_an_independent_geometry(kind, request, test_cases, tmp_path):
    """Top-patch boxes and centres recomputed from plans.json and the image alone: nonzero bbox, nnU-Net's
    new shape and tiling, centred padding, then back through the transpose (CT: (0, 2, 1)) to input voxels;
    centres through the input image's spacing / origin / direction (a 90° rotation)."""
    from segsentry.runtime import run_batch

    pipeline = request.getfixturevalue("mr_pipeline" if kind.startswith("mr") else "ct_pipeline")
    cases = {"ct-train": pipeline.cases, "mr-test": test_cases["mr"]}.get(kind) or _thin_ct_case(tmp_path / "in")
    case_id, files = next(iter(cases.items()))
    geometry = nnunet_network_geometry(pipeline.model_dir, files)
    if kind == "ct-thin-padded":
        assert geometry.pad_below[0] == 3 and geometry.shape_preprocessed[0] == 10
    result = run_batch(pipeline.ood_onnx, files, tmp_path / "out", backend="onnxruntime", qa=False)
    report = result.outcomes[0].report.to_dict()
    assert report["n_patches"] == len(geometry.tiles)

    # the per-patch distances of the same bundle (tiles in nnU-Net's order, checked against our own tiling)
    inference = _patch_features_and_distances(pipeline.ood_onnx, files, len(pipeline.spec.channels))
    assert [tuple(map(tuple, b)) for b in inference.boxes] == list(geometry.tiles)
    distances = inference.distances
    top = report["top_patches"]
    assert len(top) == min(5, len(geometry.tiles))
    indices = [t["patch"] for t in top]
    assert len(set(indices)) == len(indices)
    reported = np.array([t["distance"] for t in top])
    np.testing.assert_allclose(reported, distances[indices], rtol=1e-6)  # same backend, same input
    assert np.all(np.diff(reported) <= 0), "top patches are listed farthest first"
    others = np.delete(distances, indices)
    assert others.size == 0 or reported.min() >= others.max()
    assert indices[0] == int(np.argmax(distances))

    image = sitk.ReadImage(str(files[0]))
    shape_zyx = sitk.GetArrayViewFromImage(image).shape
    origin, spacing = np.array(image.GetOrigin()), np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    for t in top:
        expected_box = network_box_to_input_ranges(geometry.tiles[t["patch"]], geometry)
        assert t["box_zyx"] == expected_box, f"patch {t['patch']}"
        assert all(0 <= lo < hi <= n for (lo, hi), n in zip(expected_box, shape_zyx))
        # centre of the voxels start..stop-1, numpy (z, y, x) -> SimpleITK continuous index (x, y, z)
        centre_xyz = [(lo + hi - 1) / 2.0 for lo, hi in reversed(t["box_zyx"])]
        by_sitk = image.TransformContinuousIndexToPhysicalPoint(centre_xyz)
        by_numpy = origin + direction @ (spacing * np.array(centre_xyz))
        np.testing.assert_allclose(t["centre_mm"], by_sitk, rtol=0, atol=1e-6)
        np.testing.assert_allclose(t["centre_mm"], by_numpy, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Fold ensembles: one bundle, several folds with different weights, against nnUNetPredictor(use_folds=...,
# use_mirroring=True). Small volumes (2-4 patches) keep nnU-Net's 8 flips x folds passes cheap.


def _ensemble_case(spec, root, seed):
    from factory import CT_SPEC, mr_volumes

    rng = np.random.default_rng(seed)
    if spec is CT_SPEC:
        volumes, spacing = [ct_volume(rng, shape_zyx=(8, 48, 40))], (0.8, 0.75, 4.0)
    else:
        volumes, spacing = mr_volumes(rng, shape_zyx=(18, 30, 26)), (1.0, 1.1, 1.3)
    return [write_volume(root / f"ens{seed}_{c:04d}.nii.gz", v, spacing_xyz=spacing) for c, v in enumerate(volumes)]


@dataclass(frozen=True)
class _Ensemble:
    model_dir: Path
    folds: tuple[int, ...]
    case: list[Path]
    report: object  # CaseReport
    out: Path
    references: dict = field(default_factory=dict)  # folds -> nnU-Net's mask, computed once

    def nnunet(self, folds: tuple[int, ...]) -> np.ndarray:
        if folds not in self.references:
            self.references[folds] = nnunet_predict(self.model_dir, self.case, folds=folds, use_mirroring=True)
        return self.references[folds]


def _ensemble_run(tmp_path, spec, folds, exported, *, n_folders=5) -> _Ensemble:
    """A folder of ``n_folders`` folds with different weights; ``exported`` (None: all) as one calibrated
    bundle; one case through ``ood-run`` (mirroring on, nnU-Net's default)."""
    from segsentry.calib import calibrate
    from segsentry.export import export_nnunet
    from segsentry.runtime import run_batch
    from factory import make_model_folder

    model_dir = make_model_folder(tmp_path / "results", spec, folds=range(n_folders))
    images = tmp_path / "imagesTr"
    cases = [_ensemble_case(spec, images, seed) for seed in range(3)]
    features = export_nnunet(model_dir, tmp_path / "m.features.onnx", folds=exported)
    assert [f.fold for f in features.manifest.folds] == [str(f) for f in folds]
    ood = calibrate(features.path, [images], tmp_path / "m.ood.onnx", score_folds=1, threshold_rule="paper").path
    result = run_batch(ood, cases[0], tmp_path / "out")
    assert result.outcomes[0].status == "ok", result.outcomes[0].error
    return _Ensemble(model_dir, tuple(folds), cases[0], result.outcomes[0].report, tmp_path / "out")


def test_ood_bench_measures_an_ensemble_with_and_without_mirroring(ct_ensemble):
    """ood-bench on the 3-fold, mirrored bundle: the head is timed on (n, folds, D) features, each batch also as
    the runtime sends it mirrored (batch x 8 patches in one call, so slower per call), and the fold count and
    axes are recorded; the end-to-end volume run mirrors like ood-run."""
    from segsentry.bench import run_bench

    bundle = ct_ensemble.out.parent / "m.ood.onnx"
    results = run_bench(bundle, backends=["onnxruntime"], batch_sizes=[1], warmup=0, repeats=2, threads=1,
                        volume=ct_ensemble.case[0])
    r = results["results"][0]
    assert r["n_folds"] == 3 and r["mirror_axes"] == [0, 1, 2] and r["mirror_terms"] == 8
    b = r["batches"][0]
    assert b["head_only_p50_s_per_call"] is not None
    assert b["mirrored_p50_s_per_call"] > b["p50_s_per_call"]
    assert b["mirrored_patches_per_s"] == pytest.approx(1 / b["mirrored_p50_s_per_call"])
    assert r["volume"]["n_folds"] == 3 and r["volume"]["mirror_axes"] == [0, 1, 2]


def _check_parity(run: _Ensemble) -> np.ndarray:
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(run.out / "ens0.nii.gz")))
    expected = run.nnunet(run.folds)
    mismatches = int((ours != expected).sum())
    assert mismatches <= _mask_tolerance(ours.size), f"{mismatches} of {ours.size} voxels differ"
    assert len(np.unique(expected)) > 1, "test network should predict more than one class"
    return expected


@pytest.fixture(scope="module")
def ct_ensemble(tmp_path_factory):
    from factory import CT_SPEC

    return _ensemble_run(tmp_path_factory.mktemp("ct_ensemble"), CT_SPEC, (0, 1, 2), [0, 1, 2])


def test_ct_fold_ensemble_matches_nnunet(ct_ensemble):
    """Three folds (multi-class, transposed axes (0, 2, 1)), mirrored, vs nnUNetPredictor(use_folds=(0, 1, 2))."""
    expected = _check_parity(ct_ensemble)
    assert ct_ensemble.report.mirror_axes == [0, 1, 2]
    fold0 = ct_ensemble.nnunet((0,))
    assert int((fold0 != expected).sum()) > 10 * _mask_tolerance(expected.size)  # the ensemble is not fold 0


def test_ct_fold_agreement_matches_nnunet_fold_masks(ct_ensemble):
    """``fold_agreement`` (computed on our per-fold masks in network space) vs the mean pairwise Dice of
    nnU-Net's own per-fold masks in the input geometry: within 0.05 (the spaces differ by a resampling); the
    disagreement map is written in the input geometry, in [0, 1], and 0 wherever nnU-Net's folds all agree
    with its ensemble, except near a boundary (a voxel's neighbourhood of one)."""
    from scipy import ndimage

    from segsentry.runtime.agreement import mean_pairwise_dice

    folds = np.stack([ct_ensemble.nnunet((f,)) for f in ct_ensemble.folds])
    expected = mean_pairwise_dice(folds, [1, 2])
    assert 0.0 < expected < 0.99, "folds with different weights should disagree somewhat"
    assert ct_ensemble.report.fold_agreement == pytest.approx(expected, abs=0.05)
    image = sitk.ReadImage(str(ct_ensemble.report.outputs["disagreement_map"]))
    reference = sitk.ReadImage(str(ct_ensemble.case[0]))
    assert image.GetSize() == reference.GetSize() and image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection())
    disagreement = sitk.GetArrayFromImage(image)
    assert disagreement.min() >= 0 and disagreement.max() <= 1 and disagreement.max() > 0
    ensemble = ct_ensemble.nnunet(ct_ensemble.folds)
    unanimous = ndimage.binary_erosion((folds == ensemble).all(0), iterations=1)
    assert float(np.abs(disagreement[unanimous]).max(initial=0)) < 0.5
    assert float(disagreement[unanimous].mean()) < 0.05
    qa = ct_ensemble.out / "qa"  # the QA page draws the map and states the agreement
    assert (qa / "ens0_axial_disagreement.png").is_file() and (qa / "ens0_coronal_disagreement.png").is_file()
    assert "Fold agreement (mean pairwise Dice" in (ct_ensemble.out / "qa.html").read_text()


def test_single_fold_of_a_five_fold_folder_matches_nnunet(tmp_path):
    from factory import CT_SPEC

    run = _ensemble_run(tmp_path, CT_SPEC, (3,), [3])
    _check_parity(run)
    assert run.report.fold_agreement is None and "disagreement_map" not in run.report.outputs


@pytest.mark.slow
def test_mr_five_fold_ensemble_matches_nnunet(tmp_path):
    """Every fold of a five-fold folder (the default: folds=None), two channels."""
    from factory import MR_SPEC

    _check_parity(_ensemble_run(tmp_path, MR_SPEC, (0, 1, 2, 3, 4), None))


def test_region_based_ensemble_matches_nnunet(tmp_path):
    """A BraTS-style region model (sigmoid outputs "whole" = {1, 2}, "core" = {2}, regions_class_order (1, 2)),
    two folds, two channels, mirrored: nnU-Net's region -> label conversion; the folds' agreement is computed on
    the converted labels."""
    from factory import REGION_SPEC

    run = _ensemble_run(tmp_path, REGION_SPEC, (0, 1), None, n_folders=2)
    expected = _check_parity(run)
    assert set(np.unique(expected)) <= {0, 1, 2} and 2 in expected  # the later region overwrites
    assert run.report.fold_agreement is not None and 0 <= run.report.fold_agreement <= 1
