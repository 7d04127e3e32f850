"""``ood-serve`` with the demo model against a real Orthanc: latency per series and 20 series back to back.

    python benchmarks/dicom_node.py                  # 3 latency series + 20 back to back, a few minutes on 2 cores
    python benchmarks/dicom_node.py --burst 5        # quicker

Orthanc and the node run in a private network namespace (``segsentry.dicom.pacs``; root, Debian ``orthanc``).
Series are phantom chest CTs (``segsentry.phantoms``, in-distribution and dataset-shift cohorts alternating)
written as multi-slice DICOM series. Latency: from the C-STORE answer for a series' last instance to the
moment both its SEG and its SR are listed by Orthanc's REST API (polled every 50 ms), minus the series
timeout (the wait that tells the node the series is complete). Burst: every series sent back to back, then
the time until all are answered, and a check that Orthanc holds exactly one SEG and one SR per series.
Results go to ``benchmarks/results/dicom/node.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import pydicom

from segsentry.bench import machine_info, package_versions
from segsentry.demo import demo_bundle_path
from segsentry.dicom.pacs import NetNamespace, Orthanc, ServeProcess
from segsentry.dicom.series import SeriesInfo, series_files, write_series
from segsentry.phantoms import make_chest_ct

RESULTS = Path(__file__).resolve().parent / "results" / "dicom"


def _write(root: Path, i: int) -> tuple[list[Path], str, str]:
    cohort = "id" if i % 2 == 0 else "dataset-shift"
    image, _ = make_chest_ct(seed=5000 + i, cohort=cohort).to_sitk()
    write_series(image, root / f"s{i:02d}", SeriesInfo(manufacturer="phantom", model_name=cohort,
                                                        kernel="B30f" if cohort == "id" else "B70f"))
    files = series_files(root / f"s{i:02d}")
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return files, str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def _counts(pacs: Orthanc, studies: set[str]) -> dict[str, tuple[int, int]]:
    """study -> (number of SEG instances, number of SR instances) in Orthanc, for the given studies."""
    counts = {s: [0, 0] for s in studies}
    study_uid = {}
    for series in pacs.get("/series?expand"):
        modality = series["MainDicomTags"].get("Modality")
        if modality not in ("SEG", "SR"):
            continue
        parent = series["ParentStudy"]
        if parent not in study_uid:
            study_uid[parent] = pacs.get(f"/studies/{parent}")["MainDicomTags"]["StudyInstanceUID"]
        if study_uid[parent] in counts:
            counts[study_uid[parent]][modality == "SR"] += len(series["Instances"])
    return {k: (v[0], v[1]) for k, v in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=int, default=3, help="series sent one at a time")
    parser.add_argument("--burst", type=int, default=20, help="series sent back to back")
    parser.add_argument("--series-timeout", type=float, default=2.0)
    args = parser.parse_args()
    bundle = demo_bundle_path()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        sets = [_write(root / "series", i) for i in range(args.latency + args.burst)]
        write_s = time.perf_counter() - t0
        ns = NetNamespace()
        pacs = node = None
        try:
            pacs = Orthanc(ns, root / "orthanc")
            node = ServeProcess(pacs, bundle, root / "work", series_timeout=args.series_timeout)
            latencies = []
            for files, study, series in sets[: args.latency]:
                node.send(files)
                sent = time.perf_counter()
                while _counts(pacs, {study})[study] != (1, 1):
                    time.sleep(0.05)
                latencies.append(time.perf_counter() - sent - args.series_timeout)
            burst = sets[args.latency:]
            start = time.perf_counter()
            for files, _, _ in burst:
                node.send(files)
            sent_all = time.perf_counter() - start
            studies = {study for _, study, _ in burst}
            while any(c != (1, 1) for c in _counts(pacs, studies).values()):
                if time.perf_counter() - start > 1800:
                    break
                time.sleep(0.2)
            burst_s = time.perf_counter() - start
            counts = _counts(pacs, studies)
            states = [node.state(series) for _, _, series in burst]
            log_lines = [line for line in node.log_path.read_text().splitlines() if " answered: " in line]
        finally:
            if node is not None:
                node.stop()
            if pacs is not None:
                pacs.stop()
            ns.close()
    instances = [len(files) for files, _, _ in sets]
    result = {
        "bundle": bundle.name,
        "series_timeout_s": args.series_timeout,
        "instances_per_series": {"min": min(instances), "max": max(instances), "total": sum(instances)},
        "latency_s_excluding_timeout": [round(v, 3) for v in latencies],
        "latency_median_s": round(statistics.median(latencies), 3) if latencies else None,
        "burst_series": len(burst),
        "burst_send_s": round(sent_all, 2),
        "burst_all_answered_s": round(burst_s, 2),
        "burst_exactly_one_seg_and_sr": sum(c == (1, 1) for c in counts.values()),
        "burst_states": {s: states.count(s) for s in sorted(set(states), key=str)},
        "answered_log_lines": len(log_lines),
        "series_write_s": round(write_s, 2),
        "load_average_1min": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
        "machine": machine_info(),
        "packages": package_versions(["onnxruntime", "pydicom", "highdicom", "pynetdicom"]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "node.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# ood-serve with the demo model against Orthanc (CPU)",
        "",
        f"Bundle `{bundle.name}`, phantom CT series of {min(instances)}-{max(instances)} slices "
        f"({sum(instances)} instances in all), series timeout {args.series_timeout:g} s (not counted below).",
        "",
        f"- Last instance sent → SEG + SR listed by Orthanc, one series at a time: "
        + ", ".join(f"{v:.2f} s" for v in latencies) + f" (median {result['latency_median_s']} s; target 30 s).",
        f"- {len(burst)} series back to back: sent in {sent_all:.1f} s, all answered after {burst_s:.1f} s; "
        f"{result['burst_exactly_one_seg_and_sr']}/{len(burst)} studies hold exactly one SEG and one SR; "
        f"queue states {result['burst_states']}.",
        f"- Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, shared with other jobs while "
        f"measured (1-minute load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end).",
        "",
    ]
    (RESULTS / "node.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
