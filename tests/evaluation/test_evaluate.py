"""ood-eval on the embedded demo model and small phantom cohorts (ID vs far-OOD)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from segsentry.cli import app
from segsentry.demo import demo_bundle_path
from segsentry.phantoms import write_cohort


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts")
    write_cohort(root / "id", cohort="id", n=3, seed=11, prefix="ID")
    write_cohort(root / "far", cohort="far-ood", n=3, seed=12, prefix="FO")
    return root


def test_eval_report(cohorts, tmp_path):
    result = CliRunner().invoke(app, ["eval", "run", str(demo_bundle_path()), "--id", str(cohorts / "id"),
                                      "--ood", f"far={cohorts / 'far'}", "-o", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    rows = {r["method"]: r for r in data["scenarios"]["far"]}
    assert set(rows) >= {"mahalanobis", "kl uniform", "energy"}
    assert any(m.startswith("max softmax (T=") for m in rows)
    for r in rows.values():
        assert 0 <= r["auc"] <= 1 and 0 <= r["fpr"] <= 1 and 0 <= r["error"] <= 1
    assert rows["mahalanobis"]["esce"] is not None and rows["energy"]["esce"] is None
    assert 0 <= data["mean_dice"]["id"] <= 1
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| method | ESCE | Error | FPR | AUC |" in md
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<svg" in html and "silent failures" in html
    lines = (tmp_path / "report" / "cases.csv").read_text().splitlines()
    assert len(lines) == 1 + 6


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


def test_tta_baseline_matches_a_direct_computation(cohorts):
    """TTA = voxel mean of the std over 8 flips of the foreground probability, recomputed with scipy."""
    import itertools

    import numpy as np
    from scipy.special import softmax

    from segsentry.evaluation.evaluate import tta_uncertainty
    from segsentry.runtime import load_bundle, read_case
    from segsentry.runtime.backends import create_backend
    from segsentry.runtime.io import CaseInput
    from segsentry.runtime.pipeline import infer_volume
    from segsentry.runtime.preprocess import preprocess

    bundle = load_bundle(demo_bundle_path())
    m = bundle.manifest
    files = [cohorts / "id" / "imagesTr" / "ID_000_0000.nii.gz"]
    with create_backend("onnxruntime", bundle.model_bytes, channels=1, patch_size=m.patch_size) as engine:
        got = tta_uncertainty(files, bundle, engine)
        data, _ = preprocess(read_case(CaseInput("c", tuple(files)), num_channels=1).image,
                             read_case(CaseInput("c", tuple(files)), num_channels=1).spacing, m.preprocessing)
        probs = []
        for axes in [c for r in range(4) for c in itertools.combinations((1, 2, 3), r)]:
            logits = infer_volume(np.ascontiguousarray(np.flip(data, axes)), engine, m).logits.astype(np.float64)
            probs.append(1 - softmax(np.flip(logits, axes), axis=0)[0])
    assert len(probs) == 8
    assert got == pytest.approx(float(np.mean(np.std(np.stack(probs), axis=0))), rel=1e-4)


def test_eval_with_tta_adds_a_row(tmp_path):
    from segsentry.evaluation.evaluate import evaluate

    write_cohort(tmp_path / "id", cohort="id", n=2, seed=21, prefix="ID")
    write_cohort(tmp_path / "far", cohort="far-ood", n=1, seed=22, prefix="FO")
    result = evaluate(demo_bundle_path(), tmp_path / "id", {"far": tmp_path / "far"}, tmp_path / "r", tta=True,
                      backend="onnxruntime")
    rows = {r["method"]: r for r in result["scenarios"]["far"]}
    assert "TTA (8 flips)" in rows and 0 <= rows["TTA (8 flips)"]["auc"] <= 1
    assert "tta" in (tmp_path / "r" / "cases.csv").read_text().splitlines()[0]
