"""The QA page of an ``ood-run`` batch: one self-contained HTML file, PNGs beside it (numpy + SimpleITK only).

Per case: an axial and a coronal slice through the most uncertain region (the voxel maximum of the
uncertainty map, else the most distant patch), shown three ways (image, mask overlay, uncertainty map), and
a strip placing the case's normalised uncertainty U among the training cases' values and the threshold.
Slices are drawn in image index space (numpy z, y, x): axial = one z slice, coronal = one y row with z
pointing up, stretched to the physical aspect ratio.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry._atomic import atomic_path, write_text_atomic
from segsentry.manifest import Calibration
from segsentry.runtime.report import CaseReport

MASK_RGB = np.array([255, 40, 40], dtype=np.float32)


@dataclass(frozen=True)
class CaseView:
    case_id: str
    pngs: dict[str, str]  # view name -> PNG file name (in the qa folder)
    uncertainty: float | None
    threshold: float | None
    ood: bool | None
    score: float | None
    focus_zyx: tuple[int, int, int]


def _window(image: np.ndarray, modality: str) -> np.ndarray:
    """Grey levels in [0, 1]: CT lung/soft-tissue window [-1000, 400] HU, else 0.5-99.5 percentiles."""
    if modality.upper() == "CT":
        lo, hi = -1000.0, 400.0
    else:
        lo, hi = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def _hot(values: np.ndarray) -> np.ndarray:
    """'hot' colormap (black -> red -> yellow -> white) of values in [0, 1] to RGB float in [0, 255]."""
    v = np.clip(values, 0, 1)[..., None]
    r = np.clip(3 * v, 0, 1)
    g = np.clip(3 * v - 1, 0, 1)
    b = np.clip(3 * v - 2, 0, 1)
    return np.concatenate([r, g, b], axis=-1) * 255


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None] * 255, 3, axis=-1)


def _stretch(plane: np.ndarray, row_spacing: float, col_spacing: float) -> np.ndarray:
    """Repeat rows so the picture has the physical aspect ratio (nearest neighbour, no smoothing)."""
    factor = row_spacing / col_spacing
    if abs(factor - 1) < 0.05:
        return plane
    rows = max(1, int(round(plane.shape[0] * factor)))
    index = np.minimum((np.arange(rows) / factor).astype(int), plane.shape[0] - 1)
    return plane[index]


def _upscale(rgb: np.ndarray, min_size: int = 256) -> np.ndarray:
    factor = max(1, int(np.ceil(min_size / max(rgb.shape[:2]))))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else rgb


def _write_png(rgb: np.ndarray, target: Path) -> None:
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8)), isVector=True)
    with atomic_path(target) as tmp:
        sitk.WriteImage(image, str(tmp))


def focus_point(mask: np.ndarray, top_patch_centre: Sequence[int] | None) -> tuple[int, ...]:
    """The voxel to centre the slices on: the most distant patch's centre, else the mask's, else the middle."""
    if top_patch_centre is not None:
        return tuple(int(i) for i in top_patch_centre)
    if mask.any():
        return tuple(int(np.median(i)) for i in np.nonzero(mask))
    return tuple(s // 2 for s in mask.shape)


def render_case(
    case_id: str,
    image: np.ndarray,
    mask: np.ndarray,
    uncertainty: np.ndarray | None,
    *,
    spacing_zyx: Sequence[float],
    modality: str,
    qa_dir: Path,
    report: CaseReport,
    distance_range: tuple[float, float] | None,
) -> CaseView:
    """Write ``CASE_{axial,coronal}_{image,mask,uncertainty}.png`` into ``qa_dir``; arrays are (z, y, x).

    ``distance_range`` maps voxel distances to colours like the subject score is normalised: the training
    cases' (min, 2·max) raw scores span black to white, so hot voxels are outside the training range.
    """
    z, y, x = _report_focus(report, mask)
    grey = _window(image, modality)
    lo, hi = distance_range if distance_range else (0.0, float(uncertainty.max()) if uncertainty is not None else 1.0)
    pngs: dict[str, str] = {}
    planes = {
        "axial": (lambda a: a[z], spacing_zyx[1], spacing_zyx[2]),
        "coronal": (lambda a: a[:, y, :][::-1], spacing_zyx[0], spacing_zyx[2]),
    }
    for view, (cut, row_sp, col_sp) in planes.items():
        base = _grey_rgb(cut(grey))
        overlay = base.copy()
        m = cut(mask) > 0
        overlay[m] = 0.55 * overlay[m] + 0.45 * MASK_RGB
        layers = {"image": base, "mask": overlay}
        if uncertainty is not None:
            heat = _hot((cut(uncertainty) - lo) / max(hi - lo, 1e-12))
            layers["uncertainty"] = 0.35 * base + 0.65 * heat
        for name, rgb in layers.items():
            file = f"{case_id}_{view}_{name}.png"
            _write_png(_upscale(_stretch(rgb, row_sp, col_sp)), qa_dir / file)
            pngs[f"{view}_{name}"] = file
    return CaseView(case_id=case_id, pngs=pngs, uncertainty=report.uncertainty,
                    threshold=report.threshold, ood=report.ood, score=report.score,
                    focus_zyx=(int(z), int(y), int(x)))


def _report_focus(report: CaseReport, mask: np.ndarray | None) -> tuple[int, ...]:
    """The slices' voxel: the most distant patch's centre (``mask`` is only read without top patches)."""
    top = report.top_patches
    centre = [(lo + hi) // 2 for lo, hi in top[0].box_zyx] if top else None
    return focus_point(mask if mask is not None else np.zeros((1, 1, 1), bool), centre)


def existing_view(report: CaseReport, qa_dir: Path) -> CaseView | None:
    """The view :func:`render_case` made for ``report`` in an earlier run, if all its PNGs are still in ``qa_dir``
    (``ood-run --resume``); None when one is missing."""
    names = ("image", "mask", "uncertainty") if report.uncertainty_map_units else ("image", "mask")
    pngs = {f"{view}_{name}": f"{report.case}_{view}_{name}.png" for view in ("axial", "coronal") for name in names}
    if not all((qa_dir / file).is_file() for file in pngs.values()):
        return None
    mask = None if report.top_patches else sitk.GetArrayFromImage(sitk.ReadImage(report.outputs["mask"]))
    z, y, x = _report_focus(report, mask)
    return CaseView(case_id=report.case, pngs=pngs, uncertainty=report.uncertainty, threshold=report.threshold,
                    ood=report.ood, score=report.score, focus_zyx=(int(z), int(y), int(x)))


def _strip_svg(view: CaseView, calibration: Calibration | None) -> str:
    """Training U values (grey ticks), threshold (dashed), this case (coloured marker) on a 0..1 axis."""
    if calibration is None or view.uncertainty is None:
        return "<p>bundle not calibrated: no OOD score</p>"
    width, height, pad = 420, 54, 12

    def x(u: float) -> float:
        return pad + (width - 2 * pad) * min(max(u, 0.0), 1.0)

    ticks = "".join(f'<line x1="{x(u):.1f}" y1="18" x2="{x(u):.1f}" y2="34" stroke="#999" />'
                    for u in calibration.train_uncertainties)
    colour = "#d22" if view.ood else "#2a2"
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" role="img">'
        f'<line x1="{pad}" y1="26" x2="{width - pad}" y2="26" stroke="#444" />{ticks}'
        f'<line x1="{x(calibration.threshold):.1f}" y1="8" x2="{x(calibration.threshold):.1f}" y2="44" '
        f'stroke="#000" stroke-dasharray="3,2" />'
        f'<circle cx="{x(view.uncertainty):.1f}" cy="26" r="6" fill="{colour}" />'
        f'<text x="{pad}" y="52" font-size="10">0</text><text x="{width - pad - 6}" y="52" font-size="10">1</text>'
        f'<text x="{x(calibration.threshold) + 3:.1f}" y="12" font-size="10">threshold '
        f'{calibration.threshold:.3f}</text></svg>'
    )


def _img(qa_dir: Path, file: str, alt: str) -> str:
    data = base64.b64encode((qa_dir / file).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{html.escape(file)}" />'


def write_qa_page(
    views: Sequence[CaseView], failed: dict[str, str], *, qa_dir: Path, page: Path, calibration: Calibration | None,
    bundle_name: str, backend: str,
) -> Path:
    """Write the batch's HTML page (images embedded, so the file stands alone; the PNGs stay beside it)."""
    rows = []
    for v in views:
        if v.ood is None:
            verdict = "<b>not scored</b>"
        else:
            verdict = '<b class="ood">OOD</b>' if v.ood else '<b class="ok">in distribution</b>'
        figures = "".join(
            '<div class="grid">' + "".join(
                f"<figure>{_img(qa_dir, v.pngs[key], key)}<figcaption>{key.replace('_', ' ')}</figcaption></figure>"
                for key in (f"{view}_image", f"{view}_mask", f"{view}_uncertainty") if key in v.pngs
            ) + "</div>"
            for view in ("axial", "coronal")
        )
        u = "–" if v.uncertainty is None else f"{v.uncertainty:.3f}"
        rows.append(
            f'<section><h2>{html.escape(v.case_id)} — {verdict}</h2>'
            f"<p>U = {u} (threshold {'–' if v.threshold is None else f'{v.threshold:.3f}'}); raw score "
            f"{'–' if v.score is None else f'{v.score:.4g}'}; slices through voxel (z, y, x) = {v.focus_zyx}, "
            f"the centre of the most distant patch.</p>{_strip_svg(v, calibration)}{figures}</section>"
        )
    for case_id, error in failed.items():
        rows.append(f"<section><h2>{html.escape(case_id)} — <b class=\"ood\">failed</b></h2>"
                    f"<p>{html.escape(error)}</p></section>")
    legend = ("Mask in red. Uncertainty: voxel map of aggregated squared Mahalanobis distances in 'hot' colours, "
              "black at the lowest training score and white at twice the highest (the range U is normalised "
              "with). Strip: grey ticks are the training cases' U, the dashed "
              "line the 95 % TPR threshold, the dot this case (red = flagged).")
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>segsentry QA — {html.escape(bundle_name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
section {{ border-top: 1px solid #ccc; padding: 8px 0 16px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 8px; margin-top: 6px; }}
figure {{ margin: 0; }} figcaption {{ font-size: 12px; color: #555; text-align: center; }}
img {{ height: 200px; image-rendering: pixelated; background: #000; }}
.ood {{ color: #c00; }} .ok {{ color: #080; }}
</style></head><body>
<h1>segsentry QA</h1>
<p>Bundle <code>{html.escape(bundle_name)}</code>, backend {html.escape(backend)}; {len(views)} case(s) scored,
{len(failed)} failed. {html.escape(legend)}</p>
{''.join(rows)}
</body></html>
"""
    write_text_atomic(page, doc)
    return page
