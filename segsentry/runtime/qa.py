"""The QA page of an ``ood-run`` batch: one self-contained HTML file, PNGs beside it (numpy + SimpleITK only).

Per case: an axial and a coronal slice through the most distant patch (else the mask's centre), shown three
ways (image, mask overlay, uncertainty map with its colour bar), the most distant patch outlined in cyan, and
a strip placing the case's normalised uncertainty U among the training cases' values and the threshold.

Slices are drawn in the radiological convention from the direction matrix, not in array order: the volume is
first resampled without interpolation to LPS axes (``sitk.DICOMOrient``: index x grows to the patient's
left, y to posterior, z to superior; an oblique direction goes to its nearest axes), then
- axial, seen from the feet: patient left on the image's right, anterior up;
- coronal, seen from the front: patient left on the image's right, superior up;
with the orientation letters drawn on every view and the pixels stretched to the physical aspect ratio.
Grey levels use a window per modality: CT (the bundle normalises HU) [-1000, 400] HU, anything else (MR) the
0.5-99.5 percentiles of the nonzero voxels.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry._atomic import atomic_path, write_text_atomic
from segsentry.manifest import Calibration, Manifest
from segsentry.runtime.report import CaseReport

MASK_RGB = np.array([255, 40, 40], dtype=np.float32)
OUTLINE_RGB = np.array([0, 230, 255], dtype=np.float32)
LETTER_RGB = np.array([255, 230, 0], dtype=np.float32)
LAYERS = ("image", "mask", "uncertainty", "disagreement")  # the pictures per view, in page order
CT_WINDOW = (-1000.0, 400.0)  # HU: lung and mediastinum in one picture
VIEWS = ("axial", "coronal")
# (top, bottom, left, right) letters of each view in the radiological convention
LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L")}
_GLYPHS = {  # 5 x 7 bitmaps of the orientation letters
    "A": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "P": ["11110", "10001", "10001", "11110", "10000", "10000", "10000"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "S": ["01111", "10000", "10000", "01110", "00001", "00001", "11110"],
    "I": ["11111", "00100", "00100", "00100", "00100", "00100", "11111"],
}


@dataclass(frozen=True)
class CaseView:
    case_id: str
    pngs: dict[str, str]  # view name -> PNG file name (in the qa folder)
    uncertainty: float | None
    threshold: float | None
    ood: bool | None
    score: float | None
    focus_zyx: tuple[int, int, int]
    window: str = ""  # how the grey levels were set
    colour_range: tuple[float, float] | None = None  # voxel distances at the colour bar's bottom and top
    fold_agreement: float | None = None  # fold ensembles: mean pairwise Dice between the folds' masks


@dataclass(frozen=True)
class Plane:
    """One view, ready to draw: rows top to bottom and columns left to right as the viewer sees them.

    ``box`` is the most distant patch's ``(row0, row1, col0, col1)`` (inclusive) in this plane, ``letters``
    the (top, bottom, left, right) orientation letters.
    """

    view: str
    grey: np.ndarray  # (rows, cols) in [0, 1]
    mask: np.ndarray  # (rows, cols) integer labels
    uncertainty: np.ndarray | None  # (rows, cols) voxel distances
    row_spacing: float
    col_spacing: float
    box: tuple[int, int, int, int] | None
    letters: tuple[str, str, str, str]
    disagreement: np.ndarray | None = None  # (rows, cols) fraction of folds disagreeing with the ensemble


def modality_of(manifest: Manifest) -> str:
    """"CT" when the bundle normalises channel 0 as CT (Hounsfield units) or names it CT, else its name (MR...)."""
    schemes = manifest.preprocessing.normalization_schemes
    name = manifest.channels.get("0", "")
    return "CT" if (schemes and schemes[0] == "CTNormalization") or name.upper() == "CT" else name


def window(image: np.ndarray, modality: str) -> tuple[np.ndarray, str]:
    """Grey levels in [0, 1] and a description: CT [-1000, 400] HU; else the 0.5-99.5 percentiles of the
    nonzero voxels (MR: the background would pull the window down)."""
    if modality.upper() == "CT":
        lo, hi = CT_WINDOW
        label = f"CT window [{lo:g}, {hi:g}] HU"
    else:
        body = image[image != 0]
        lo, hi = (float(v) for v in np.percentile(body if body.size else image, [0.5, 99.5]))
        label = f"{modality or 'image'} window: 0.5-99.5 percentiles of the nonzero voxels [{lo:.4g}, {hi:.4g}]"
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1), label


def _geometry_image(array: np.ndarray, geometry: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(geometry.GetSpacing())
    image.SetOrigin(geometry.GetOrigin())
    image.SetDirection(geometry.GetDirection())
    return image


def to_lps(array_zyx: np.ndarray, geometry: sitk.Image) -> tuple[np.ndarray, sitk.Image]:
    """``array_zyx`` (on ``geometry``'s grid) permuted/flipped so numpy (z, y, x) grow to S, P, L; and the
    oriented image (its geometry maps physical points to the new indices)."""
    oriented = sitk.DICOMOrient(_geometry_image(array_zyx, geometry), "LPS")
    return sitk.GetArrayFromImage(oriented), oriented


def _to_oriented_index(zyx: Sequence[float], geometry: sitk.Image, oriented: sitk.Image) -> np.ndarray:
    point = geometry.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]])
    return np.array(oriented.TransformPhysicalPointToContinuousIndex(point)[::-1])


def radiological_planes(
    image: np.ndarray, mask: np.ndarray, uncertainty: np.ndarray | None, *, geometry: sitk.Image,
    focus_zyx: Sequence[int], box_zyx: Sequence[Sequence[int]] | None, modality: str,
    disagreement: np.ndarray | None = None,
) -> tuple[dict[str, Plane], str, tuple[int, int, int]]:
    """The axial and coronal planes through ``focus_zyx`` (input numpy index) in the radiological convention;
    ``box_zyx`` (``[start, stop)`` per input axis) is outlined. Also the window description and the focus in
    LPS-oriented index space."""
    grey, label = window(image, modality)
    g, oriented = to_lps(grey.astype(np.float32), geometry)
    m, _ = to_lps(mask, geometry)
    u = to_lps(uncertainty.astype(np.float32), geometry)[0] if uncertainty is not None else None
    d = to_lps(disagreement.astype(np.float32), geometry)[0] if disagreement is not None else None
    shape = np.array(g.shape)
    focus = np.clip(np.round(_to_oriented_index(focus_zyx, geometry, oriented)).astype(int), 0, shape - 1)
    box = None
    if box_zyx is not None:
        corners = [_to_oriented_index([(lo - 0.5) if pick else (hi - 0.5) for (lo, hi), pick in zip(box_zyx, bits)],
                                      geometry, oriented)
                   for bits in np.ndindex(2, 2, 2)]
        corners = np.array(corners)
        lo = np.clip(np.ceil(corners.min(axis=0) - 1e-6), 0, shape - 1).astype(int)
        hi = np.clip(np.floor(corners.max(axis=0) + 1e-6), 0, shape - 1).astype(int)
        box = (lo, hi)
    sz, sy, sx = oriented.GetSpacing()[::-1]
    z, y, x = (int(v) for v in focus)
    n_z = g.shape[0]
    planes = {
        "axial": Plane("axial", g[z], m[z], None if u is None else u[z], sy, sx,
                       None if box is None else (box[0][1], box[1][1], box[0][2], box[1][2]), LETTERS["axial"],
                       None if d is None else d[z]),
        "coronal": Plane("coronal", g[:, y, :][::-1], m[:, y, :][::-1], None if u is None else u[:, y, :][::-1],
                         sz, sx, None if box is None else (n_z - 1 - box[1][0], n_z - 1 - box[0][0], box[0][2],
                                                            box[1][2]), LETTERS["coronal"],
                         None if d is None else d[:, y, :][::-1]),
    }
    return planes, label, (z, y, x)


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


def _outline(rgb: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    if box is None:
        return rgb
    r0, r1, c0, c1 = box
    out = rgb.copy()
    out[r0, c0:c1 + 1] = out[r1, c0:c1 + 1] = OUTLINE_RGB
    out[r0:r1 + 1, c0] = out[r0:r1 + 1, c1] = OUTLINE_RGB
    return out


def _letter(rgb: np.ndarray, char: str, row: int, col: int, scale: int) -> None:
    glyph = np.array([[c == "1" for c in line] for line in _GLYPHS[char]]).repeat(scale, 0).repeat(scale, 1)
    h, w = glyph.shape
    row = int(np.clip(row, 0, rgb.shape[0] - h))
    col = int(np.clip(col, 0, rgb.shape[1] - w))
    rgb[row:row + h, col:col + w][glyph] = LETTER_RGB


def _letters(rgb: np.ndarray, letters: tuple[str, str, str, str]) -> np.ndarray:
    out = rgb.copy()
    scale = max(1, min(out.shape[:2]) // 100)
    h, w, m = 7 * scale, 5 * scale, 2 * scale
    top, bottom, left, right = letters
    rows, cols = out.shape[:2]
    _letter(out, top, m, (cols - w) // 2, scale)
    _letter(out, bottom, rows - h - m, (cols - w) // 2, scale)
    _letter(out, left, (rows - h) // 2, m, scale)
    _letter(out, right, (rows - h) // 2, cols - w - m, scale)
    return out


def _colour_bar(rgb: np.ndarray) -> np.ndarray:
    """The uncertainty picture with the colour scale on its right: black (bottom) to white (top)."""
    rows = rgb.shape[0]
    width = max(8, rows // 16)
    ramp = _hot(np.linspace(1, 0, rows))[:, None, :].repeat(width, axis=1)
    gap = np.full((rows, max(2, width // 3), 3), 255.0)
    return np.concatenate([rgb, gap, ramp], axis=1)


def picture(plane: Plane, layer: str, colour_range: tuple[float, float]) -> np.ndarray:
    """The RGB picture (uint8-ready floats) of one layer ("image", "mask", "uncertainty", "disagreement") of
    ``plane``: outline, physical aspect, upscaled, orientation letters, and a colour bar for the two maps (the
    disagreement's spans 0 to 1: no fold to every fold disagreeing with the ensemble)."""
    base = _grey_rgb(plane.grey)
    if layer == "image":
        rgb = base
    elif layer == "mask":
        rgb = base.copy()
        m = plane.mask > 0
        rgb[m] = 0.55 * rgb[m] + 0.45 * MASK_RGB
    elif layer == "uncertainty" and plane.uncertainty is not None:
        lo, hi = colour_range
        rgb = 0.35 * base + 0.65 * _hot((plane.uncertainty - lo) / max(hi - lo, 1e-12))
    elif layer == "disagreement" and plane.disagreement is not None:
        rgb = 0.35 * base + 0.65 * _hot(plane.disagreement)
    else:
        raise ValueError(f"no layer {layer!r} in this plane")
    rgb = _letters(_upscale(_stretch(_outline(rgb, plane.box), plane.row_spacing, plane.col_spacing)), plane.letters)
    return _colour_bar(rgb) if layer in ("uncertainty", "disagreement") else rgb


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
    geometry: sitk.Image,
    modality: str,
    qa_dir: Path,
    report: CaseReport,
    distance_range: tuple[float, float] | None,
    disagreement: np.ndarray | None = None,
) -> CaseView:
    """Write ``CASE_{axial,coronal}_{image,mask,uncertainty[,disagreement]}.png`` into ``qa_dir``; arrays are
    (z, y, x) on ``geometry``'s grid (its spacing, origin and direction place them in the patient);
    ``disagreement`` is a fold ensemble's map (fraction of folds disagreeing with the ensemble).

    ``distance_range`` maps voxel distances to colours like the subject score is normalised: the training
    cases' (min, 2·max) raw scores span black to white, so hot voxels are outside the training range.
    """
    top = report.top_patches
    centre = [(lo + hi) // 2 for lo, hi in top[0].box_zyx] if top else None
    focus = focus_point(mask, centre)
    planes, label, _ = radiological_planes(image, mask, uncertainty, geometry=geometry, focus_zyx=focus,
                                           box_zyx=top[0].box_zyx if top else None, modality=modality,
                                           disagreement=disagreement)
    lo, hi = distance_range if distance_range else (0.0, float(uncertainty.max()) if uncertainty is not None else 1.0)
    pngs: dict[str, str] = {}
    for view, plane in planes.items():
        for layer in LAYERS:
            if layer in ("uncertainty", "disagreement") and getattr(plane, layer) is None:  # no such map here
                continue
            file = f"{case_id}_{view}_{layer}.png"
            _write_png(picture(plane, layer, (lo, hi)), qa_dir / file)
            pngs[f"{view}_{layer}"] = file
    view = CaseView(case_id=case_id, pngs=pngs, uncertainty=report.uncertainty,
                    threshold=report.threshold, ood=report.ood, score=report.score,
                    focus_zyx=tuple(int(v) for v in focus), window=label,
                    colour_range=(float(lo), float(hi)) if uncertainty is not None else None,
                    fold_agreement=report.fold_agreement)
    write_text_atomic(_view_record(qa_dir, case_id), json.dumps(asdict(view)))  # read back by --resume
    return view


def _view_record(qa_dir: Path, case_id: str) -> Path:
    return qa_dir / f"{case_id}_view.json"


def existing_view(report: CaseReport, qa_dir: Path) -> CaseView | None:
    """The view :func:`render_case` made for ``report`` in an earlier run (``ood-run --resume``), read back from
    the record it wrote beside the PNGs; None when the record or one of its PNGs is missing or belongs to
    another result."""
    try:
        record = json.loads(_view_record(qa_dir, report.case).read_text())
        view = CaseView(**{**record, "focus_zyx": tuple(record["focus_zyx"]),
                           "colour_range": tuple(record["colour_range"]) if record["colour_range"] else None})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if (view.uncertainty, view.threshold, view.ood, view.score) != (
            report.uncertainty, report.threshold, report.ood, report.score):
        return None
    if not all((qa_dir / file).is_file() for file in view.pngs.values()):
        return None
    return view


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
                for key in (f"{view}_{layer}" for layer in LAYERS) if key in v.pngs
            ) + "</div>"
            for view in ("axial", "coronal")
        )
        u = "–" if v.uncertainty is None else f"{v.uncertainty:.3f}"
        rows.append(
            f'<section><h2>{html.escape(v.case_id)} — {verdict}</h2>'
            f"<p>U = {u} (threshold {'–' if v.threshold is None else f'{v.threshold:.3f}'}); raw score "
            f"{'–' if v.score is None else f'{v.score:.4g}'}; slices through voxel (z, y, x) = {v.focus_zyx}, "
            f"the centre of the most distant patch (outlined in cyan). {html.escape(v.window)}."
            + (f" Colour bar: {v.colour_range[0]:.4g} (black) to {v.colour_range[1]:.4g} (white)."
               if v.colour_range else "")
            + (f" Fold agreement (mean pairwise Dice of the folds' masks) {v.fold_agreement:.3f}; the disagreement "
               "map shows the fraction of folds disagreeing with the ensemble (black 0, white 1)."
               if v.fold_agreement is not None else "")
            + f"</p>{_strip_svg(v, calibration)}{figures}</section>"
        )
    for case_id, error in failed.items():
        rows.append(f"<section><h2>{html.escape(case_id)} — <b class=\"ood\">failed</b></h2>"
                    f"<p>{html.escape(error)}</p></section>")
    legend = ("Radiological convention: patient left on the image's right, anterior (axial) or superior "
              "(coronal) up, orientation letters on every view. Mask in red. Uncertainty: voxel map of aggregated squared Mahalanobis distances in 'hot' colours, "
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
