"""A fold ensemble's U fused with the folds' disagreement (``ood-calib --ensemble-score fused``): the calibration
matches what ``ood-run`` later measures on the same scans, the threshold is the conformal rule on the combined
values, and the deployed U is the documented mean."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from factory import write_volume

from segsentry.calib import calibrate
from segsentry.calib.calibrate import FUSION_MIN_SPREAD, fit_fusion
from segsentry.errors import BundleError, CalibrationError
from segsentry.manifest import Calibration
from segsentry.runtime import load_bundle, run_batch
from segsentry.runtime.scoring import normalise_score


def test_fit_fusion_matches_median_and_95th_percentile():
    rng = np.random.default_rng(3)
    u = rng.uniform(0.05, 0.4, 30)
    agreement = rng.uniform(0.6, 0.95, 30)
    fusion = fit_fusion(u, agreement, mirrored=True)
    mapped = np.array([fusion.uncertainty(a) for a in agreement])
    assert np.median(mapped) == pytest.approx(np.median(u), abs=1e-12)
    assert np.quantile(mapped, 0.95) == pytest.approx(np.quantile(u, 0.95), abs=1e-12)
    assert fusion.scale > 0 and fusion.mirrored
    np.testing.assert_allclose(fusion.calibration_disagreements, 1 - agreement)


def test_fit_fusion_floors_a_degenerate_disagreement_spread():
    """Folds that agree perfectly on every calibration case must not make a 0.001 disagreement a huge U."""
    u = np.linspace(0.1, 0.3, 20)
    fusion = fit_fusion(u, np.ones(20), mirrored=False)
    spread = np.quantile(u, 0.95) - np.median(u)
    assert fusion.scale == pytest.approx(spread / FUSION_MIN_SPREAD)
    assert fusion.uncertainty(1.0) == pytest.approx(np.median(u))
    with pytest.raises(CalibrationError, match="at least 2 calibration cases"):
        fit_fusion([0.1], [0.9], mirrored=False)


def test_combined_uncertainty_needs_the_fold_agreement():
    fusion = fit_fusion([0.1, 0.2, 0.3], [0.9, 0.8, 0.7], mirrored=True)
    calibration = Calibration(estimator="ledoit-wolf", shrinkage=0.1, rank=3, n_patches=9, n_cases=3,
                              aggregation="normalised", train_score_min=1.0, train_score_max=2.0, threshold=0.3,
                              train_scores=[1.0, 2.0], train_uncertainties=[0.25, 0.5], fusion=fusion)
    assert calibration.combined_uncertainty(0.2, 0.8) == pytest.approx(0.5 * (0.2 + fusion.uncertainty(0.8)))
    with pytest.raises(BundleError, match="no fold\nagreement|no fold agreement"):
        calibration.combined_uncertainty(0.2, None)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    pytest.importorskip("torch")
    from factory import CT_SPEC, ct_volume, make_model_folder

    from segsentry.export import export_nnunet

    root = tmp_path_factory.mktemp("fusion")
    model_dir = make_model_folder(root / "results", CT_SPEC, folds=(0, 1, 2))
    rng = np.random.default_rng(11)
    for folder, n in (("train", 4), ("cal", 5)):
        for i in range(n):
            write_volume(root / folder / f"{folder}{i}_0000.nii.gz", ct_volume(rng, shape_zyx=(8, 48, 40)),
                         spacing_xyz=(0.8, 0.75, 4.0))
    features = export_nnunet(model_dir, root / "e.features.onnx", verify=False).path
    return root, features


def test_fused_calibration_agrees_with_what_ood_run_measures(ensemble, tmp_path):
    """The calibration cases' recorded disagreement is 1 - the fold agreement ood-run reports for the same
    scans (mirrored, as deployed), the threshold is the conformal k-th smallest combined U, and each deployed
    U is the mean of the distance U and the mapped disagreement (1e-9)."""
    root, features = ensemble
    alpha = 0.25
    result = calibrate(features, [root / "train"], tmp_path / "f.ood.onnx", calibration_images=[root / "cal"],
                       alpha=alpha, ensemble_score="fused")
    c = result.calibration
    fusion = c.fusion
    assert fusion is not None and fusion.mirrored and len(fusion.calibration_disagreements) == 5
    manifest = load_bundle(result.path).manifest
    assert manifest.calibration.fusion == fusion  # survives the manifest round trip

    out = run_batch(result.path, [root / "cal"], tmp_path / "out", qa=False)
    reports = {o.case_id: json.loads((tmp_path / "out" / f"{o.case_id}.json").read_text()) for o in out.outcomes}
    ids = sorted(reports)
    np.testing.assert_allclose([1 - reports[i]["fold_agreement"] for i in ids], fusion.calibration_disagreements,
                               atol=1e-12)
    distance_u = [normalise_score(s, train_min=c.train_score_min, train_max=c.train_score_max)
                  for s in c.calibration_scores]
    np.testing.assert_allclose([reports[i]["distance_uncertainty"] for i in ids], distance_u, atol=1e-6)
    combined = [0.5 * (u + fusion.offset + fusion.scale * d)
                for u, d in zip(distance_u, fusion.calibration_disagreements)]
    k = math.ceil((len(combined) + 1) * (1 - alpha))
    assert c.threshold == pytest.approx(sorted(combined)[k - 1], abs=1e-12)
    for i in ids:
        r = reports[i]
        expected = 0.5 * (r["distance_uncertainty"] + fusion.offset + fusion.scale * (1 - r["fold_agreement"]))
        assert r["uncertainty"] == pytest.approx(expected, abs=1e-9)
        assert (r["uncertainty"] > r["threshold"]) == any(reason.startswith("U ") for reason in r["ood_reasons"])

    unmirrored = run_batch(result.path, [root / "cal" / f"{ids[0]}_0000.nii.gz"], tmp_path / "flat", qa=False,
                           mirroring=False)
    notes = json.loads((tmp_path / "flat" / f"{unmirrored.outcomes[0].case_id}.json").read_text())["notes"]
    assert any("fold-disagreement part was calibrated with test-time mirroring" in n for n in notes)


def test_fused_score_refusals(ensemble, ct_pipeline, tmp_path):
    root, features = ensemble
    with pytest.raises(CalibrationError, match="needs --calibration-images"):
        calibrate(features, [root / "train"], tmp_path / "a.onnx", ensemble_score="fused")
    with pytest.raises(CalibrationError, match="holds one network"):
        calibrate(ct_pipeline.features_onnx, [ct_pipeline.images], tmp_path / "b.onnx",
                  calibration_images=[root / "cal"], ensemble_score="fused")
    with pytest.raises(CalibrationError, match="unknown ensemble score 'mean'"):
        calibrate(features, [root / "train"], tmp_path / "c.onnx", ensemble_score="mean")
    assert not list(tmp_path.iterdir())


def test_ood_eval_scores_the_fused_variant_and_the_disagreement_as_ood_run_does(ensemble, tmp_path):
    """ood-eval on a distance-only ensemble bundle with the fused bundle as a variant: the variant's U and flag
    and the fold-disagreement baseline equal what ood-run writes for the same cases (cases.csv, 6 digits)."""
    import csv

    from segsentry.evaluation.evaluate import evaluate

    root, features = ensemble
    distance = calibrate(features, [root / "train"], tmp_path / "d.ood.onnx", calibration_images=[root / "cal"],
                         alpha=0.25, ensemble_score="distance").path
    fused = calibrate(features, [root / "train"], tmp_path / "f.ood.onnx", calibration_images=[root / "cal"],
                      alpha=0.25).path  # the default for an ensemble with calibration images
    assert load_bundle(fused).manifest.calibration.fusion is not None
    result = evaluate(distance, root / "cal", {"train": root / "train"}, tmp_path / "eval", backend="onnxruntime",
                      layers={"fused": fused})
    assert any(r["method"] == "fold disagreement" for r in result["scenarios"]["train"])
    rows = {r["case"]: r for r in csv.DictReader((tmp_path / "eval" / "cases.csv").open())}
    run_batch(fused, [root / "cal", root / "train"], tmp_path / "run", qa=False, backend="onnxruntime")
    for case, row in rows.items():
        report = json.loads((tmp_path / "run" / f"{case}.json").read_text())
        assert float(row["fold_disagreement"]) == pytest.approx(1 - report["fold_agreement"], rel=1e-5, abs=1e-6)
        assert float(row["mahalanobis[fused]"]) == pytest.approx(report["uncertainty"], rel=1e-5, abs=1e-6)
        assert int(row["flagged[fused]"]) == int(report["ood"])


def test_without_calibration_images_an_ensemble_keeps_the_distance(ensemble, tmp_path):
    root, features = ensemble
    result = calibrate(features, [root / "train"], tmp_path / "d.ood.onnx", score_folds=2)
    assert result.calibration.fusion is None
