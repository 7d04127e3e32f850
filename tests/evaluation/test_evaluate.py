"""ood-eval on the embedded demo model and small phantom cohorts (ID vs far-OOD)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from segsentry.cli import app
from segsentry.demo import demo_bundle_path
from segsentry.phantoms import write_cohort
from segsentry.runtime import load_bundle


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts")
    write_cohort(root / "id", cohort="id", n=3, seed=11, prefix="ID")
    write_cohort(root / "far", cohort="far-ood", n=3, seed=12, prefix="FO")
    return root


def _tpr95(values) -> float:
    """The authors' rule, written out: sorted scores, index floor((n-1)·0.95), mean with the next one."""
    v = sorted(values)
    i = math.floor((len(v) - 1) * 0.95)
    return (v[i] + v[min(i + 1, len(v) - 1)]) / 2


def _esce(u, dice, bins: int = 10) -> float:
    """ESCE of confidence 1 - U against Dice, equal-width bins [lo, hi) of [0, 1], 1.0 in the last bin."""
    confidence, dice = 1 - np.asarray(u, dtype=np.float64), np.asarray(dice, dtype=np.float64)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    return sum(np.mean(index == m) * abs(dice[index == m].mean() - confidence[index == m].mean())
               for m in range(bins) if np.any(index == m))


def _column(method: str) -> str:
    """cases.csv column of a results.json method name ('max softmax (T=10)' -> 'max_softmax_T10')."""
    if method.startswith("max softmax (T="):
        return f"max_softmax_T{method[len('max softmax (T='):-1]}"
    return method.replace(" ", "_")


def test_eval_report(cohorts, tmp_path):
    """Every number in the far-OOD table recomputed from cases.csv; the Mahalanobis score separates far-OOD
    phantoms from ID ones.

    Tolerances: cases.csv holds 6 significant digits (Dice 6 decimals), so thresholds rel 1e-5, ESCE and mean
    Dice abs 1e-5; AUC, TPR and FPR are ratios of counts and compared exactly (abs 1e-12). Measured here (3 ID,
    3 far-OOD phantoms): Mahalanobis AUC 1.0 (ID U 0.208-0.252, far-OOD 0.267-0.297), FPR 0, error 1/6; the
    output-based baselines 0.0 (far-OOD phantoms look *more* confident -- the silent failures of the paper).
    With 3 x 3 cases the AUC is a multiple of 1/9: the bound 8/9 allows one misordered ID/OOD pair, while a
    random score gives 0.5 in expectation and an inverted one 0.
    """
    from sklearn.metrics import roc_auc_score

    result = CliRunner().invoke(app, ["eval", "run", str(demo_bundle_path()), "--id", str(cohorts / "id"),
                                      "--ood", f"far={cohorts / 'far'}", "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    rows = {r["method"]: r for r in data["scenarios"]["far"]}
    assert set(rows) >= {"mahalanobis", "kl uniform", "energy"}
    assert any(m.startswith("max softmax (T=") for m in rows)
    cases = list(csv.DictReader((tmp_path / "report" / "cases.csv").open()))
    assert len(cases) == 6
    assert sorted(c["case"] for c in cases) == ["FO_000", "FO_001", "FO_002", "ID_000", "ID_001", "ID_002"]
    assert {c["group"] for c in cases if c["case"].startswith("ID")} == {"id"}
    assert {c["group"] for c in cases if c["case"].startswith("FO")} == {"far"}
    is_ood = [c["group"] == "far" for c in cases]
    dice = np.array([float(c["dice"]) for c in cases])

    assert rows["mahalanobis"]["auc"] >= 8 / 9
    for method, row in rows.items():
        scores = np.array([float(c[_column(method)]) for c in cases])
        ids, oods = scores[~np.array(is_ood)], scores[np.array(is_ood)]
        assert row["auc"] == pytest.approx(roc_auc_score(is_ood, scores), abs=1e-12), method
        assert row["threshold"] == pytest.approx(_tpr95(ids), rel=1e-5), method
        tpr, fpr = float(np.mean(ids <= row["threshold"])), float(np.mean(oods <= row["threshold"]))
        assert row["tpr"] == pytest.approx(tpr, abs=1e-12) and row["fpr"] == pytest.approx(fpr, abs=1e-12), method
        assert row["error"] == pytest.approx(0.5 * (1 - tpr) + 0.5 * fpr, abs=1e-12), method
        if method == "energy":  # not a [0, 1] uncertainty: no ESCE
            assert row["esce"] is None
        else:
            assert row["esce"] == pytest.approx(_esce(scores, dice), abs=1e-5), method
    # the reported max-softmax temperature is the lowest-ESCE one of T = 1, 10, 100 (ties: the smaller T)
    by_t = {t: _esce([float(c[f"max_softmax_T{t}"]) for c in cases], dice) for t in (1, 10, 100)}
    best = min(by_t, key=lambda t: (by_t[t], t))
    assert f"max softmax (T={best})" in rows
    assert data["mean_dice"]["id"] == pytest.approx(dice[~np.array(is_ood)].mean(), abs=1e-5)
    assert data["mean_dice"]["far"] == pytest.approx(dice[np.array(is_ood)].mean(), abs=1e-5)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| method | ESCE | Error (re-fitted) | FPR (re-fitted) | AUC |" in md
    r = rows["mahalanobis"]
    assert f"| mahalanobis | {r['esce']:.3f} | {r['error']:.3f} [{r['error_ci'][0]:.3f}–{r['error_ci'][1]:.3f}] | " in md
    for method, row in rows.items():  # every bootstrap interval brackets its point estimate
        for key in ("auc", "fpr", "error"):
            lo, hi = row[f"{key}_ci"]
            assert lo <= row[key] + 1e-12 and row[key] <= hi + 1e-12, (method, key)

    # the deployed view: the bundle's own flags, counted from cases.csv, with a Wilson interval around the rate
    deployed = {r["set"]: r for r in data["deployed"]["sets"] if r["bundle"] == "mahalanobis"}
    for group in ("id", "far"):
        flags = [int(c["flagged"]) for c in cases if c["group"] == group]
        assert deployed[group]["flagged"] == sum(flags) and deployed[group]["n"] == len(flags)
        lo, hi = deployed[group]["rate_ci"]
        assert lo <= sum(flags) / len(flags) <= hi and 0 <= lo and hi <= 1
    assert deployed["id"]["meaning"] == "false alarms" and deployed["far"]["meaning"] == "detected"
    assert data["deployed"]["threshold"] == load_bundle(demo_bundle_path()).manifest.calibration.threshold

    # failure detection: AURC of the Mahalanobis U with risk = 1 - Dice, recomputed from cases.csv by the
    # definition (sort by U, mean over k of the top-k mean risk; the CSV's U are distinct here)
    u = np.array([float(c["mahalanobis"]) for c in cases])
    risk = 1 - dice
    order = np.argsort(u, kind="stable")
    by_definition = float(np.mean(np.cumsum(risk[order]) / np.arange(1, 7)))
    failure = {row["key"]: row for row in data["failure_detection"]["rows"]}
    assert failure["mahalanobis"]["aurc"] == pytest.approx(by_definition, abs=1e-5)
    assert data["failure_detection"]["random_aurc"] == pytest.approx(risk.mean(), abs=1e-5)
    assert failure["mahalanobis"]["e_aurc"] >= -1e-12
    assert "## Failure detection" in md and "## Deployed flag" in md
    assert "<polyline" in (tmp_path / "report" / "report.html").read_text()  # the risk-coverage curves
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<svg" in html and "silent failures" in html


def test_eval_usage_errors(cohorts, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["eval", "run", str(demo_bundle_path()), "--id", str(cohorts / "id"), "--ood", "nofolder",
                              "-o", str(tmp_path / "r")])
    assert bad.exit_code == 2
    reserved = runner.invoke(app, ["eval", "run", str(demo_bundle_path()), "--id", str(cohorts / "id"),
                                   "--ood", f"id={cohorts / 'far'}", "-o", str(tmp_path / "r")])
    assert reserved.exit_code == 1 and "reserved" in reserved.output


def test_eval_shift_command(cohorts, tmp_path):
    pytest.importorskip("torchio")
    import SimpleITK as sitk

    out = tmp_path / "shifted"
    result = CliRunner().invoke(app, ["eval", "shift", str(cohorts / "id"), "-o", str(out), "--kind", "affine",
                                      "--level", "strong", "--seed", "0"])
    assert result.exit_code == 0, result.output
    original = sitk.ReadImage(str(cohorts / "id" / "imagesTr" / "ID_000_0000.nii.gz"))
    shifted = sitk.ReadImage(str(out / "imagesTr" / "ID_000_0000.nii.gz"))
    assert shifted.GetSize() == original.GetSize()
    assert (out / "labelsTr" / "ID_000.nii.gz").exists()
    bad = CliRunner().invoke(app, ["eval", "shift", str(cohorts / "id"), "-o", str(tmp_path / "x"), "--kind", "wobble"])
    assert bad.exit_code == 2


def test_tta_baseline_matches_a_direct_computation(tmp_path):
    """TTA = voxel mean of the std over 8 flips of the foreground probability, recomputed with scipy; the case's
    own unflipped logits stand in for the identity flip without changing the value."""
    import itertools

    import numpy as np
    from scipy.special import softmax

    from segsentry.evaluation.evaluate import tta_std, tta_uncertainty
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.io import CaseInput
    from segsentry.runtime.pipeline import infer_volume
    from segsentry.runtime.preprocess import preprocess

    write_cohort(tmp_path, cohort="id", n=1, seed=31, prefix="ID", shape=(24, 96, 96))
    bundle = load_bundle(demo_bundle_path())
    m = bundle.manifest
    files = [tmp_path / "imagesTr" / "ID_000_0000.nii.gz"]
    loaded = read_case(CaseInput("c", tuple(files)), num_channels=1)
    data, _ = preprocess(loaded.image, loaded.spacing, m.preprocessing)
    with create_backend("onnxruntime", bundle.model_bytes, channels=1, patch_size=m.patch_size) as engine:
        flips = [c for r in range(4) for c in itertools.combinations((1, 2, 3), r)]
        logits = [infer_volume(np.ascontiguousarray(np.flip(data, axes)), engine, m).logits for axes in flips]
        got = tta_uncertainty(files, bundle, engine)  # read and preprocessed there, all 8 flips run
        assert tta_std(data, engine, m, logits=logits[0]) == got  # 7 flips run, the unflipped one given
    assert len(logits) == 8 and flips[0] == ()
    probs = [1 - softmax(np.flip(x.astype(np.float64), axes), axis=0)[0] for x, axes in zip(logits, flips)]
    assert got == pytest.approx(float(np.mean(np.std(np.stack(probs), axis=0))), rel=1e-4)


def test_eval_with_sampled_baselines_adds_rows(tmp_path, monkeypatch):
    """TTA and MC dropout rows; every case is read, preprocessed and run through the main sliding window once
    (the baselines work on those arrays), and no per-case files are written."""
    from segsentry.evaluation import evaluate as module
    from segsentry.evaluation.evaluate import evaluate

    calls = {"read_case": 0, "preprocess": 0, "infer_volume_for_case": 0}

    def counting(name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(module, name, counting(name))
    write_cohort(tmp_path / "id", cohort="id", n=2, seed=21, prefix="ID", shape=(24, 96, 96))
    write_cohort(tmp_path / "far", cohort="far-ood", n=1, seed=22, prefix="FO", shape=(24, 96, 96))
    result = evaluate(demo_bundle_path(), tmp_path / "id", {"far": tmp_path / "far"}, tmp_path / "r", tta=True,
                      mc_dropout=True, mc_passes=2, backend="onnxruntime")
    assert calls == {"read_case": 3, "preprocess": 3, "infer_volume_for_case": 3}
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["cases.csv", "report.html", "report.md",
                                                                 "results.json"]
    rows = {r["method"]: r for r in result["scenarios"]["far"]}
    for method in ("TTA (8 flips)", "MC dropout"):
        assert method in rows and 0 <= rows[method]["auc"] <= 1
    header = (tmp_path / "r" / "cases.csv").read_text().splitlines()[0].split(",")
    assert {"tta", "mc_dropout"} <= set(header)
    assert set(result["distributions"]) >= {"tta", "mc_dropout", "mahalanobis"}
    assert result["sampled_baselines"]["mc_dropout"] == {"passes": 2, "p": 0.5}
    assert "MC dropout: p = 0.5 after every encoder stage, 2 passes" in (tmp_path / "r" / "report.md").read_text()


def test_distributions_per_set(cohorts, tmp_path):
    """Fig. 8: per method and set the median / quartiles of the scores, recomputed from cases.csv; one SVG
    per method in the HTML report."""
    import csv

    import numpy as np

    from segsentry.evaluation.evaluate import evaluate

    result = evaluate(demo_bundle_path(), cohorts / "id", {"far": cohorts / "far"}, tmp_path / "r",
                      backend="onnxruntime")
    rows = list(csv.DictReader((tmp_path / "r" / "cases.csv").open()))
    for key in ("mahalanobis", "kl_uniform", "energy"):
        for group in ("id", "far"):
            values = [float(r[key]) for r in rows if r["group"] == group]
            got = result["distributions"][key][group]
            assert got["n"] == 3
            assert got["median"] == pytest.approx(float(np.median(values)), rel=1e-5)
            assert got["q1"] == pytest.approx(float(np.percentile(values, 25)), rel=1e-5)
    html = (tmp_path / "r" / "report.html").read_text()
    # one scatter, one distribution figure per method, one risk-coverage figure
    assert html.count("<svg") == 1 + len(result["distributions"]) + 1
    assert "Score distributions per set" in (tmp_path / "r" / "report.md").read_text()


def test_feature_layer_ablation(ct_pipeline, tmp_path):
    """Table 11: a second bundle tapped at another layer; its AUC per scenario equals sklearn's on cases.csv."""
    import csv

    import numpy as np
    from sklearn.metrics import roc_auc_score

    from factory import ct_volume, write_volume
    from segsentry.calib import calibrate
    from segsentry.export import export_nnunet

    features = export_nnunet(ct_pipeline.model_dir, tmp_path / "stage1.features.onnx", layer="encoder.stages.1").path
    other = calibrate(features, [ct_pipeline.images], tmp_path / "stage1.ood.onnx", score_folds=1,
                      threshold_rule="paper").path
    rng = np.random.default_rng(3)
    for i in range(3):
        write_volume(tmp_path / "ood" / f"odd{i}_0000.nii.gz", ct_volume(rng)[::-1] * 0.3 + 400.0,
                     spacing_xyz=(0.8, 0.75, 4.0))
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "run", str(ct_pipeline.ood_onnx), "--id", str(ct_pipeline.images),
                                 "--ood", f"odd={tmp_path / 'ood'}", "--layer", f"stage1={other}",
                                 "-o", str(tmp_path / "r"), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    ablation = {r["key"]: r for r in data["layer_ablation"]}
    assert set(ablation) == {"mahalanobis", "mahalanobis[stage1]"}
    assert "encoder.stages.1" in ablation["mahalanobis[stage1]"]["layer"]
    rows = list(csv.DictReader((tmp_path / "r" / "cases.csv").open()))
    labels = [r["group"] != "id" for r in rows]
    for key, row in ablation.items():
        scores = [float(r[key]) for r in rows]
        assert row["odd"]["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    main = next(r for r in data["scenarios"]["odd"] if r["method"] == "mahalanobis")
    assert main["auc"] == ablation["mahalanobis"]["odd"]["auc"]
    assert [float(r["mahalanobis"]) for r in rows] != [float(r["mahalanobis[stage1]"]) for r in rows]
    assert "Feature-layer ablation" in (tmp_path / "r" / "report.md").read_text()
    # each layer bundle's own deployed flag: its U against its own threshold (the CT test cases pass the guard)
    threshold = load_bundle(other).manifest.calibration.threshold
    for r in rows:
        assert int(r["flagged[stage1]"]) == int(float(r["mahalanobis[stage1]"]) > threshold), r["case"]
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    assert {d["bundle"] for d in data["deployed"]["sets"]} == {"mahalanobis", "mahalanobis[stage1]"}
    bad = runner.invoke(app, ["eval", "run", str(ct_pipeline.ood_onnx), "--id", str(ct_pipeline.images),
                              "--ood", f"odd={tmp_path / 'ood'}", "--layer", f"x={tmp_path / 'missing.onnx'}",
                              "-o", str(tmp_path / "r2")])
    assert bad.exit_code == 1 and "is not a file" in " ".join(bad.output.split())


def test_layer_bundle_mirroring_need_not_match_unless_fused(ct_pipeline, tmp_path):
    """A layer bundle's distance comes from the un-mirrored pass, so a bundle exported before mirroring was
    recorded (mirror_axes None) compares with a new one; a fused U takes the main run's masks, so it must match,
    and any other tiling change is refused."""
    from dataclasses import replace

    import onnx

    from segsentry.evaluation.evaluate import _same_network
    from segsentry.evaluation.metrics import EvaluationError
    from segsentry.manifest import DisagreementFusion, write_manifest

    main = load_bundle(ct_pipeline.ood_onnx)
    assert main.manifest.tiling.mirror_axes == [0, 1, 2]

    def variant(name: str, **changes):
        m = main.manifest
        calibration = replace(m.calibration, **changes.pop("calibration", {}))
        path = tmp_path / f"{name}.ood.onnx"
        path.write_bytes(write_manifest(onnx.load(str(ct_pipeline.ood_onnx)),
                                        m.replace(tiling=replace(m.tiling, **changes), calibration=calibration)))
        return path

    unmirrored = variant("old", mirror_axes=None)
    assert set(_same_network(main, {"old": unmirrored})) == {"old"}
    fusion = DisagreementFusion(offset=0.0, scale=1.0, calibration_disagreements=[0.1], mirrored=True)
    with pytest.raises(EvaluationError, match="in its tiling"):
        _same_network(main, {"fused": variant("fused", mirror_axes=None, calibration={"fusion": fusion})})
    with pytest.raises(EvaluationError, match="in its tiling"):
        _same_network(main, {"step": variant("step", step_size=0.25)})


def test_failing_case_names_case_and_set(cohorts, tmp_path):
    """A case that cannot be processed stops the evaluation with its id and set in the message."""
    from segsentry.evaluation.evaluate import evaluate
    from segsentry.evaluation.metrics import EvaluationError

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "AAA_0000.nii.gz").write_bytes(b"not an image")
    with pytest.raises(EvaluationError, match=r"case AAA of set 'id' failed: cannot read .*AAA_0000\.nii\.gz"):
        evaluate(demo_bundle_path(), tmp_path / "bad", {"far": cohorts / "far"}, tmp_path / "r",
                 backend="onnxruntime")
    assert not (tmp_path / "r").exists()


def test_wilson_interval_reference_values():
    """Published Wilson score intervals (z = 1.96): 0/10 -> [0, 0.2775], 5/10 -> [0.2366, 0.7634], 10/10 -> [0.7225, 1]."""
    from segsentry.evaluation.metrics import wilson_interval

    assert wilson_interval(0, 10) == [0.0, pytest.approx(0.2775, abs=1e-4)]
    assert wilson_interval(5, 10) == [pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4)]
    assert wilson_interval(10, 10) == [pytest.approx(0.7225, abs=1e-4), 1.0]
