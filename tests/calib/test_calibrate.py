"""Calibration driver: out-of-sample training scores (cross-fit by case) versus the paper's in-sample scores;
unusable training cases, the fused-head check and the output guard."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from factory import write_volume

from segsentry.calib import calibrate
from segsentry.errors import CalibrationError
from segsentry.runtime import load_bundle


def test_cross_fitted_training_scores_are_out_of_sample(ct_pipeline, tmp_path):
    in_sample = calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "a.onnx", score_folds=1,
                          threshold_rule="paper")
    cross = calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "b.onnx", score_folds=2)
    assert in_sample.calibration.score_fit == "in-sample"
    assert cross.calibration.score_fit == "cross-fit, 2 folds by case"
    # a case scored by a Gaussian that never saw it is farther away than one the Gaussian was fitted on
    assert np.all(np.array(cross.calibration.train_scores) > np.array(in_sample.calibration.train_scores))
    # the deployed head is the same full fit either way
    a, b = load_bundle(tmp_path / "a.onnx"), load_bundle(tmp_path / "b.onnx")
    assert a.manifest.calibration.n_patches == b.manifest.calibration.n_patches
    assert in_sample.fit.shrinkage == cross.fit.shrinkage
    np.testing.assert_array_equal(in_sample.fit.mean, cross.fit.mean)


def test_score_folds_validation(ct_pipeline, tmp_path):
    with pytest.raises(CalibrationError, match="score_folds"):
        calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "x.onnx", score_folds=0)


def test_l2_feature_norm_is_recorded_and_deployed(ct_pipeline, test_cases, tmp_path):
    """Mahalanobis++ end to end: the fused head (checked inside calibrate against numpy on normalised features)
    and the deployed score differ from the raw-feature bundle, and the manifest says which one it is."""
    from segsentry.runtime import run_batch

    raw = calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "raw.onnx")
    l2 = calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "l2.onnx", feature_norm="l2")
    assert load_bundle(tmp_path / "l2.onnx").manifest.calibration.feature_norm == "l2"
    assert load_bundle(tmp_path / "raw.onnx").manifest.calibration.feature_norm == "none"
    assert l2.head_check_max_rel_error <= 1e-3
    assert not np.allclose(l2.fit.mean, raw.fit.mean)
    assert 0 < np.linalg.norm(l2.fit.mean) <= 1 + 1e-6 < np.linalg.norm(raw.fit.mean)  # a mean of unit rows
    case = next(iter(test_cases["ct"].values()))
    scores = [run_batch(b, case, tmp_path / name, backend="onnxruntime", qa=False).outcomes[0].report.score
              for name, b in (("r", tmp_path / "raw.onnx"), ("n", tmp_path / "l2.onnx"))]
    assert scores[0] != pytest.approx(scores[1])
    with pytest.raises(CalibrationError, match="feature normalisation"):
        calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "x.onnx", feature_norm="l3")


def test_subject_score_rule_is_recorded_and_shared_by_calibration_and_runtime(ct_pipeline, test_cases, tmp_path):
    """A patch reduction as the subject score: calibrate's in-sample training scores are the reduction of the
    patch distances the deployed head computes for those cases (float64 numpy vs the float32 head, rtol 1e-4),
    and ood-run's score of a new case is the reduction of its patch distances (rtol 1e-12); the paper's voxel-map
    mean lies between the smallest and the largest patch distance."""
    from segsentry.runtime import run_batch
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.io import CaseInput, collect_cases, read_case
    from segsentry.runtime.pipeline import infer_volume
    from segsentry.runtime.preprocess import preprocess

    bundles = {rule: calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / f"{rule}.onnx",
                               score_folds=1, threshold_rule="paper", subject_score=rule)
               for rule in ("mean", "patch-min", "lower-half")}
    bundle = load_bundle(tmp_path / "patch-min.onnx")
    m = bundle.manifest

    def patch_distances(files) -> np.ndarray:
        loaded = read_case(CaseInput("c", tuple(files)), num_channels=m.num_channels)
        data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
        with create_backend("onnxruntime", bundle.model_bytes, channels=m.num_channels, patch_size=m.patch_size,
                            manifest=m) as engine:
            return infer_volume(data, engine, m, accumulate_logits=False).distances

    training = [patch_distances(c.files) for c in collect_cases([ct_pipeline.images], num_channels=1)]
    assert min(len(d) for d in training) >= 2  # a reduction over one patch would test nothing
    for rule, reduce in (("patch-min", np.min), ("lower-half", lambda d: np.mean(np.sort(d)[:len(d) // 2]))):
        c = load_bundle(tmp_path / f"{rule}.onnx").manifest.calibration
        assert c.subject_score == rule and bundles[rule].calibration.subject_score == rule
        np.testing.assert_allclose(c.train_scores, [reduce(d) for d in training], rtol=1e-4)
    assert load_bundle(tmp_path / "mean.onnx").manifest.calibration.subject_score == "mean"
    case = next(iter(test_cases["ct"].values()))
    d = patch_distances(case)
    reports = {rule: run_batch(tmp_path / f"{rule}.onnx", case, tmp_path / f"out-{rule}", backend="onnxruntime",
                               qa=False).outcomes[0].report for rule in bundles}
    assert reports["patch-min"].score == pytest.approx(float(d.min()), rel=1e-12)
    assert reports["patch-min"].subject_score == "patch-min"
    assert d.min() <= reports["mean"].score <= d.max() and d.min() < d.max()
    assert reports["lower-half"].score == pytest.approx(float(np.mean(np.sort(d)[:d.size // 2])), rel=1e-12)
    with pytest.raises(CalibrationError, match="subject score"):
        calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "x.onnx", subject_score="median")


def test_a_calibrated_bundle_turns_back_into_its_features_bundle(ct_pipeline, tmp_path):
    """devtools.features_bundle (how the shipped demo is recalibrated without its training folder): the
    calibrated bundle without its head computes the exported features bundle's logits and features bit for bit,
    has no calibration, and calibrates again to the same training scores and threshold (rtol 1e-9)."""
    from segsentry.devtools.head_forms import features_bundle
    from segsentry.runtime.backends import create_backend

    first = calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "a.ood.onnx")
    stripped = tmp_path / "b.features.onnx"
    stripped.write_bytes(features_bundle((tmp_path / "a.ood.onnx").read_bytes()))
    exported, back = load_bundle(ct_pipeline.features_onnx), load_bundle(stripped)
    assert back.manifest.calibration is None and set(back.manifest.outputs) == {"logits", "features"}
    m = exported.manifest
    batch = np.random.default_rng(3).standard_normal((2, m.num_channels, *m.patch_size)).astype(np.float32)
    with create_backend("onnxruntime", exported.model_bytes, channels=m.num_channels, patch_size=m.patch_size) as a, \
            create_backend("onnxruntime", back.model_bytes, channels=m.num_channels, patch_size=m.patch_size) as b:
        want, got = a.run(batch), b.run(batch)
    assert set(got) == {"logits", "features"}
    for name in got:
        np.testing.assert_array_equal(got[name], want[name])
    again = calibrate(stripped, [ct_pipeline.images], tmp_path / "c.ood.onnx").calibration
    np.testing.assert_allclose(again.train_scores, first.calibration.train_scores, rtol=1e-9)
    assert again.threshold == pytest.approx(first.calibration.threshold, rel=1e-9)
    with pytest.raises(ValueError, match="no fused Mahalanobis head"):
        features_bundle(stripped.read_bytes())


def _training_folder_with_bad_cases(pipeline, folder):
    """The pipeline's four training cases plus four that cannot be used, each for another reason."""
    folder.mkdir()
    for files in pipeline.cases.values():
        for f in files:
            shutil.copy(f, folder / f.name)
    good = next(iter(pipeline.cases.values()))[0]
    (folder / "garbage_0000.nii.gz").write_bytes(b"not an image at all")
    shutil.copy(good, folder / "twochan_0000.nii.gz")  # a second channel for a one-channel model
    shutil.copy(good, folder / "twochan_0001.nii.gz")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(good))).astype(np.float32)
    array[3, 40, 30] = np.nan
    write_volume(folder / "nan_0000.mha", array, spacing_xyz=(0.8, 0.75, 4.0))  # NIfTI would drop the NaN
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 20), np.float32)), str(folder / "flat_0000.nii.gz"))
    return folder


def test_unusable_training_cases_are_skipped_reported_and_left_out(ct_pipeline, tmp_path, caplog):
    """Bad cases are skipped with a logged reason, reported in ``failed`` and to ``on_case``, and change nothing:
    the calibration equals the session bundle's, calibrated on the four good cases alone with the same settings
    (same backend, same patches: train scores rtol 1e-9)."""
    folder = _training_folder_with_bad_cases(ct_pipeline, tmp_path / "imagesTr")
    progress = []
    with caplog.at_level(logging.ERROR, logger="segsentry.calib.calibrate"):
        result = calibrate(ct_pipeline.features_onnx, [folder], tmp_path / "m.ood.onnx", estimator="ledoit-wolf",
                           score_folds=1, threshold_rule="paper", on_case=lambda *args: progress.append(args))

    expected_errors = {
        "garbage": "cannot read",
        "twochan": "expected channel files _0000, found _0000, _0001",
        "nan": "1 voxel(s) are NaN or infinite",
        "flat": "2D image",
    }
    assert set(result.failed) == set(expected_errors)
    for case_id, fragment in expected_errors.items():
        assert fragment in result.failed[case_id], (case_id, result.failed[case_id])
    skipped = {r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name.startswith("segsentry")}
    assert skipped == {f"training case {c} skipped: {e}" for c, e in result.failed.items()}
    assert {args for args in progress if args[2] is not None} == {(c, 0, e) for c, e in result.failed.items()}
    good = sorted(ct_pipeline.cases)
    assert result.case_ids == good
    assert [args for args in progress if args[2] is None] == [(c, 18, None) for c in good]  # 2 x 3 x 3 tiles

    reference = load_bundle(ct_pipeline.ood_onnx).manifest.calibration
    written = load_bundle(tmp_path / "m.ood.onnx").manifest.calibration
    assert written.n_cases == 4 and written.n_patches == 4 * 18 == reference.n_patches
    np.testing.assert_allclose(written.train_scores, reference.train_scores, rtol=1e-9)
    assert written.threshold == pytest.approx(reference.threshold, rel=1e-9)
    assert written.shrinkage == pytest.approx(reference.shrinkage, rel=1e-9)
    assert 0 <= result.head_check_max_rel_error <= 1e-3


def test_every_training_case_failing_is_an_error(ct_pipeline, tmp_path):
    folder = tmp_path / "imagesTr"
    folder.mkdir()
    (folder / "garbage_0000.nii.gz").write_bytes(b"not an image at all")
    (folder / "rubbish_0000.nii.gz").write_bytes(b"not an image either")
    with pytest.raises(CalibrationError, match="every training case failed; nothing to calibrate on"):
        calibrate(ct_pipeline.features_onnx, [folder], tmp_path / "m.ood.onnx", threshold_rule="paper")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagesTr"]


def test_fused_head_that_disagrees_with_numpy_is_refused(ct_pipeline, tmp_path, monkeypatch):
    """A head folded from a Gaussian scaled by 1.1 (W -> 1.1 W, complement scale -> 1.21 x) gives distances
    1.21 x numpy's: a relative error of 0.21 (float32 noise ~1e-6 does not change the 3-digit message). The
    check must raise before anything is written."""
    module = importlib.import_module("segsentry.calib.calibrate")
    fold = module.fold_mahalanobis_head

    def skewed_fold(model, fit, **kwargs):
        skewed = dataclasses.replace(fit, components=fit.components * 1.1,
                                     complement_scale=fit.complement_scale * 1.21)
        return fold(model, skewed, **kwargs)

    monkeypatch.setattr(module, "fold_mahalanobis_head", skewed_fold)
    with pytest.raises(CalibrationError,
                       match=r"^fused head disagrees with the numpy distance \(max relative error 0\.21\)$"):
        calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "m.ood.onnx", score_folds=1,
                  threshold_rule="paper")
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary file


def test_output_may_not_overwrite_the_input_bundle(ct_pipeline, tmp_path):
    """The same file under three names (itself, a path through '..', a symlink): refused, input byte-identical,
    nothing else written."""
    features = tmp_path / "m.features.onnx"
    shutil.copy(ct_pipeline.features_onnx, features)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.onnx").symlink_to(features)
    before = features.read_bytes()
    for output in (features, tmp_path / "sub" / ".." / features.name, tmp_path / "link.onnx"):
        with pytest.raises(CalibrationError, match="the output must not overwrite the input bundle"):
            calibrate(features, [ct_pipeline.images], output)
        assert features.read_bytes() == before, output
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["link.onnx", "m.features.onnx", "sub"]
    assert (tmp_path / "link.onnx").is_symlink()


def test_fold_ensemble_distance_is_the_mean_of_per_fold_sklearn_distances(tmp_path):
    """Two folds with different weights: one Gaussian per fold (sklearn's EmpiricalCovariance on that fold's
    features), the bundle's distance = the mean of the folds' squared distances (rtol 1e-3, float32 head vs
    float64); the same ensemble bundle runs under openvino, under the torch reference backend (both folds rebuilt
    from the model folder; a changed fold-1 checkpoint is refused) and as the mixed-FP16 graph the GPU backends
    build."""
    pytest.importorskip("torch")
    covariance = pytest.importorskip("sklearn.covariance")
    from factory import CT_SPEC, ct_volume, make_model_folder

    from segsentry.export import export_nnunet
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.io import CaseInput, read_case
    from segsentry.runtime.pipeline import infer_volume
    from segsentry.runtime.preprocess import preprocess

    model_dir = make_model_folder(tmp_path / "results", CT_SPEC, folds=(0, 1))
    rng = np.random.default_rng(4)
    files = [write_volume(tmp_path / "img" / f"e{i}_0000.nii.gz", ct_volume(rng, shape_zyx=(8, 48, 40)),
                          spacing_xyz=(0.8, 0.75, 4.0)) for i in range(4)]
    features = export_nnunet(model_dir, tmp_path / "e.features.onnx", verify=False).path
    result = calibrate(features, files[:3], tmp_path / "e.ood.onnx", estimator="empirical", keep_features=True,
                       score_folds=1, threshold_rule="paper")
    assert len(result.fits) == 2 and len(result.calibration.fold_rank) == 2
    bundle = load_bundle(result.path)
    m = bundle.manifest

    def run(backend: str, model: bytes, case: str) -> object:
        loaded = read_case(CaseInput(case, (files[int(case)],)), num_channels=1)
        data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
        with create_backend(backend, model, channels=1, patch_size=m.patch_size, manifest=m) as engine:
            return infer_volume(data, engine, m, collect_features=True)

    train = [run("onnxruntime", bundle.model_bytes, str(i)).features for i in range(3)]
    test = run("onnxruntime", bundle.model_bytes, "3")
    assert test.features.shape[1:] == (2, m.features.dim) and test.fold_labels.shape[0] == 2
    per_fold = [covariance.EmpiricalCovariance().fit(np.concatenate(train)[:, f].astype(np.float64))
                .mahalanobis(test.features[:, f].astype(np.float64)) for f in range(2)]
    np.testing.assert_allclose(test.distances, np.mean(per_fold, axis=0), rtol=1e-3)
    assert not np.allclose(per_fold[0], per_fold[1], rtol=1e-2)  # two different Gaussians

    if importlib.util.find_spec("openvino") is not None:
        other = run("openvino", bundle.model_bytes, "3")
        np.testing.assert_allclose(other.distances, test.distances, rtol=1e-3)
        assert int((other.logits.argmax(0) != test.logits.argmax(0)).sum()) <= max(2, 1e-4 * other.logits[0].size)
    # the torch reference backend rebuilds both folds from the model folder: same fold labels, same distances
    reference = run("torch", bundle.model_bytes, "3")
    np.testing.assert_allclose(reference.distances, test.distances, rtol=1e-3)
    assert int((reference.fold_labels != test.fold_labels).sum()) <= max(2, 1e-4 * test.fold_labels.size)
    np.testing.assert_allclose(reference.logits.astype(np.float32), test.logits.astype(np.float32), atol=2e-2)
    import torch

    checkpoint = model_dir / "fold_1" / "checkpoint_final.pth"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    # every alias of a shared module is a state_dict key, so change them all (else a later alias restores it)
    state["network_weights"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["network_weights"].items()}
    torch.save(state, checkpoint)
    from segsentry.errors import BackendError

    with pytest.raises(BackendError, match="differs from the bundle's weights"):
        run("torch", bundle.model_bytes, "3")
    import onnx
    import onnxruntime as ort

    from segsentry.runtime.backends.fp16 import to_mixed_fp16

    half = to_mixed_fp16(onnx.load_model_from_string(bundle.model_bytes))
    session = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    patch = np.random.default_rng(0).standard_normal((2, 1, *m.patch_size)).astype(np.float32)
    reference = create_backend("onnxruntime", bundle.model_bytes, channels=1, patch_size=m.patch_size).run(patch)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": patch})))
    assert got["logits"].shape == reference["logits"].shape == (2, 2, 3, *m.patch_size)
    np.testing.assert_allclose(got["distance"], reference["distance"], rtol=0.05)  # FP16 network, FP32 head
