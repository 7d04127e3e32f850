"""``ood-run --resume``: which cases an earlier run into the same folder already completed.

A case is complete when its ``CASE.json`` reads back as a report of the same case, from the same input files
and the same model weights (sha256), and every output it names exists (with the QA page on: its PNGs too).
Outputs are written atomically and ``CASE.json`` after the images, so a report that exists describes images
that were written whole. Anything else (missing, unreadable, another model, other inputs) means: run it again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from segsentry.runtime.io import CaseInput
from segsentry.runtime.qa import CaseView, existing_view
from segsentry.runtime.report import CaseReport

log = logging.getLogger(__name__)


def find_complete(case: CaseInput, output_dir: Path, *, weights_sha256: str,
                  qa: bool) -> tuple[CaseReport, CaseView | None] | None:
    """The report (and, with ``qa``, the QA view) an earlier run wrote for ``case``, or None if it must run."""
    path = output_dir / f"{case.case_id}.json"
    if case.error or not path.is_file():
        return None
    try:
        report = CaseReport.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("case %s: %s is unreadable (%s); running it again", case.case_id, path.name, exc)
        return None
    why = _incomplete(report, case, weights_sha256)
    if why is None and qa:
        view = existing_view(report, output_dir / "qa")
        why = None if view is not None else "its QA images are missing"
    else:
        view = None
    if why is not None:
        log.info("case %s: %s; running it again", case.case_id, why)
        return None
    return report, view


def _incomplete(report: CaseReport, case: CaseInput, weights_sha256: str) -> str | None:
    if report.case != case.case_id:
        return f"its report names case {report.case!r}"
    if report.model_sha256 != weights_sha256:
        return "its report is from another model"
    if report.inputs != [str(f) for f in case.files]:
        return "its report is from other input files"
    if "mask" not in report.outputs or (report.uncertainty_map_units and "uncertainty_map" not in report.outputs):
        return "its report names no mask or uncertainty map"
    missing = [name for name, file in report.outputs.items() if not Path(file).is_file()]
    return f"its {', '.join(missing)} file(s) are missing" if missing else None
