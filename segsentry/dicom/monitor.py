"""Drift watch: one JSON line per scored case in a monitoring log, and its summary for ``segsentry monitor``.

A line records the time (UTC, ISO 8601), the case, U, the flag, the threshold, the false-alarm rate α the
bundle was calibrated for, and for DICOM inputs the scanner: Manufacturer, ManufacturerModelName,
ConvolutionKernel, SliceThickness (read with SimpleITK, so writing the log needs no DICOM extra).

On in-distribution data a calibrated bundle flags a case with probability at most α; the flags of n cases
are then at most Binomial(n, α). :func:`binomial_sf` is that exact upper tail (sum of the probability mass
function in log space with ``math.lgamma``; no scipy), and a window whose tail probability is below the
significance level says the flag rate is significantly above α: the input has drifted (or the scanner has).
Rendering lives in :mod:`segsentry.dicom.monitor_html`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import SimpleITK as sitk

from segsentry.errors import InputError
from segsentry.manifest import Calibration
from segsentry.runtime.batch import WrittenCase

log = logging.getLogger(__name__)

SCANNER_TAGS = {  # monitoring key -> DICOM tag (group|element), as SimpleITK/GDCM names them
    "modality": "0008|0060",
    "manufacturer": "0008|0070",
    "model": "0008|1090",
    "kernel": "0018|1210",
    "slice_thickness": "0018|0050",
}
PAPER_RULE_ALPHA = 0.05  # the paper's 95 % TPR boundary keeps 5 % of the training cases above the threshold


@dataclass(frozen=True)
class MonitorEntry:
    """One line of the monitoring log. ``key`` identifies the case for de-duplication (``ood-serve``: the
    SeriesInstanceUID), ``scanner`` is empty for non-DICOM inputs."""

    time: str
    case: str
    key: str
    uncertainty: float | None
    ood: bool | None
    threshold: float | None
    alpha: float | None
    source: str = "ood-run"
    scanner: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


def calibrated_alpha(calibration: Calibration | None) -> float | None:
    """The false-alarm rate a bundle's threshold was set for: the conformal α, or 5 % for the paper's rule."""
    if calibration is None:
        return None
    return calibration.alpha if calibration.alpha is not None else PAPER_RULE_ALPHA


def scanner_metadata(series_folder: Path) -> dict[str, str]:
    """Scanner description from the first file of a DICOM series (empty values are left out)."""
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_folder))
    if not names:
        return {}
    reader = sitk.ImageFileReader()
    reader.SetFileName(names[0])
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    found = {}
    for key, tag in SCANNER_TAGS.items():
        if reader.HasMetaDataKey(tag):
            value = reader.GetMetaData(tag).strip()
            if value:
                found[key] = value
    return found


def append_entry(path: Path, entry: MonitorEntry) -> None:
    """Append one line with a single ``write`` on an ``O_APPEND`` descriptor (whole lines, even with several
    writers), then fsync, so a crash never leaves half a line behind a later one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (entry.to_json() + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class MonitorLog:
    """A :data:`segsentry.runtime.batch.CaseHook` appending each scored case to ``path``; ``key_of`` names the
    case for de-duplication (default: the case id), ``source`` the program."""

    def __init__(self, path: str | Path, *, source: str = "ood-run", key: str | None = None) -> None:
        self.path = Path(path)
        self.source = source
        self.key = key

    def __call__(self, written: WrittenCase) -> dict[str, Path]:
        report = written.report
        source = written.case.files[0]
        entry = MonitorEntry(
            time=datetime.now(timezone.utc).isoformat(timespec="seconds"), case=written.case.case_id,
            key=self.key or written.case.case_id, uncertainty=report.uncertainty, ood=report.ood,
            threshold=report.threshold, alpha=calibrated_alpha(written.manifest.calibration), source=self.source,
            scanner=scanner_metadata(source) if source.is_dir() else {})
        append_entry(self.path, entry)
        return {}


def read_log(path: str | Path) -> tuple[list[MonitorEntry], int]:
    """The log's entries in file order, the last one kept for a repeated ``key`` (a series answered again
    after a restart), and the number of unreadable lines skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"cannot read the monitoring log {path}: {exc.strerror or exc}") from exc
    entries: dict[str, MonitorEntry] = {}
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            entry = MonitorEntry(**raw)
        except (json.JSONDecodeError, TypeError):
            skipped += 1
            continue
        entries.pop(entry.key, None)  # re-insert: the order is that of the last answer
        entries[entry.key] = entry
    return list(entries.values()), skipped


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly (summed in log space)."""
    if not 0 <= p <= 1 or n < 0:
        raise ValueError(f"binomial tail needs 0 <= p <= 1 and n >= 0, got p={p}, n={n}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * math.log(p)
            + (n - j) * math.log1p(-p) for j in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


@dataclass(frozen=True)
class WindowPoint:
    """The flag rate over the ``n`` scored cases up to and including case ``index`` (0-based)."""

    index: int
    time: str
    n: int
    flags: int
    rate: float
    p_value: float
    alarm: bool


@dataclass(frozen=True)
class GroupSummary:
    """U of the cases of one scanner/protocol (``name`` = manufacturer / model / kernel / slice thickness)."""

    name: str
    n: int
    flags: int
    u_mean: float
    u_median: float
    u_min: float
    u_max: float
    p_value: float
    uncertainties: list[float]


@dataclass(frozen=True)
class DriftSummary:
    n_cases: int
    n_scored: int
    flags: int
    alpha: float
    window: int
    significance: float
    p_value: float  # all scored cases together
    alarm: bool
    rolling: list[WindowPoint]
    groups: list[GroupSummary]
    skipped_lines: int = 0

    @property
    def rate(self) -> float:
        return self.flags / self.n_scored if self.n_scored else 0.0


def group_name(scanner: dict[str, str]) -> str:
    if not scanner:
        return "not DICOM"
    parts = [scanner.get(k, "?") for k in ("manufacturer", "model", "kernel")]
    thickness = scanner.get("slice_thickness")
    return " / ".join([*parts, f"{thickness} mm" if thickness else "?"])


def summarise(entries: list[MonitorEntry], *, alpha: float | None = None, window: int = 50,
              significance: float = 0.01, skipped_lines: int = 0) -> DriftSummary:
    """Rolling flag rate (last ``window`` scored cases) and its binomial test against α, and U per scanner.

    α defaults to the one recorded in the log (the most recent line's). Unscored cases (uncalibrated bundle)
    count in ``n_cases`` only.
    """
    if window < 1:
        raise InputError(f"the window must hold at least one case, got {window}")
    if not 0 < significance < 1:
        raise InputError(f"the significance level must lie in (0, 1), got {significance}")
    scored = [e for e in entries if e.ood is not None and e.uncertainty is not None]
    if alpha is None:
        recorded = [e.alpha for e in scored if e.alpha is not None]
        if not recorded:
            raise InputError("the log records no calibrated alpha (uncalibrated bundle?); pass --alpha")
        alpha = recorded[-1]
    if not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}")
    rolling = []
    for i, entry in enumerate(scored):
        recent = scored[max(0, i + 1 - window): i + 1]
        k = sum(bool(e.ood) for e in recent)
        p = binomial_sf(k, len(recent), alpha)
        rolling.append(WindowPoint(index=i, time=entry.time, n=len(recent), flags=k, rate=k / len(recent),
                                   p_value=p, alarm=p < significance))
    flags = sum(bool(e.ood) for e in scored)
    total_p = binomial_sf(flags, len(scored), alpha) if scored else 1.0
    by_group: dict[str, list[MonitorEntry]] = defaultdict(list)
    for entry in scored:
        by_group[group_name(entry.scanner)].append(entry)
    groups = []
    for name, members in sorted(by_group.items()):
        us = [float(e.uncertainty) for e in members]
        k = sum(bool(e.ood) for e in members)
        groups.append(GroupSummary(name=name, n=len(us), flags=k, u_mean=statistics.fmean(us),
                                   u_median=statistics.median(us), u_min=min(us), u_max=max(us),
                                   p_value=binomial_sf(k, len(us), alpha), uncertainties=us))
    return DriftSummary(n_cases=len(entries), n_scored=len(scored), flags=flags, alpha=alpha, window=window,
                        significance=significance, p_value=total_p, alarm=total_p < significance,
                        rolling=rolling, groups=groups, skipped_lines=skipped_lines)
