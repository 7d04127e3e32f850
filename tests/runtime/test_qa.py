"""The QA page: written for every run unless disabled, self-contained, one section per case."""

from __future__ import annotations

import base64
import re

import SimpleITK as sitk

from segsentry.runtime import run_batch


def test_qa_page_per_batch(ct_pipeline, test_cases, tmp_path):
    files = [f for fs in test_cases["ct"].values() for f in fs]
    bad = tmp_path / "broken_0000.nii.gz"
    bad.write_bytes(b"nope")
    result = run_batch(ct_pipeline.ood_onnx, [*files, bad], tmp_path / "out")
    page = (tmp_path / "out" / "qa.html").read_text()
    assert result.qa_page == tmp_path / "out" / "qa.html"
    for case in test_cases["ct"]:
        assert f"<h2>{case} — " in page
        for view in ("axial", "coronal"):
            for layer in ("image", "mask", "uncertainty"):
                png = tmp_path / "out" / "qa" / f"{case}_{view}_{layer}.png"
                image = sitk.ReadImage(str(png))
                assert image.GetNumberOfComponentsPerPixel() == 3
                assert min(image.GetSize()) >= 64
    assert "broken — <b class=\"ood\">failed</b>" in page
    # self-contained: every image is embedded, nothing is loaded from elsewhere
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 6 * len(test_cases["ct"])
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    base64.b64decode(sources[0].split(",", 1)[1], validate=True)
    assert "<svg" in page and "threshold" in page


def test_qa_can_be_turned_off(ct_pipeline, test_cases, tmp_path):
    files = next(iter(test_cases["ct"].values()))
    result = run_batch(ct_pipeline.ood_onnx, files, tmp_path / "out", qa=False)
    assert result.qa_page is None
    assert not (tmp_path / "out" / "qa.html").exists()
    assert not (tmp_path / "out" / "qa").exists()
