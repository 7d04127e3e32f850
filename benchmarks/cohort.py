"""Cohort throughput: ``ood-run`` on a folder of cases vs ``nnUNetv2_predict_from_modelfolder`` (its workers).

    python benchmarks/cohort.py                       # preset small: 6 phantoms of varied shapes, ~10-15 min on 2 cores
    python benchmarks/cohort.py --preset fullres      # the 30.8 M-parameter net, long
    python benchmarks/cohort.py --repeats 3 --backends onnxruntime openvino

One random-weight nnU-Net folder (``segsentry.devtools.nnunet_folder``), exported and calibrated once; the same
checkpoint serves both sides. A folder of ``--cases`` chest-CT phantoms of varied shapes and spacings is written
in nnU-Net's raw layout; each pipeline processes the whole folder in a fresh process:

* nnU-Net: ``nnUNetv2_predict_from_modelfolder -i IN -o OUT -m MODEL -f 0 -device cpu --disable_tta`` with its
  default background workers (``-npp 3 -nps 3``) and step size 0.5 (what segsentry matches); mirroring off
  on both sides;
* segsentry: ``segsentry run BUNDLE IN -o OUT --backend B --no-qa --disable-tta`` (segmentation, OOD score, uncertainty map,
  report per case).

Memory is the peak over time of the summed RSS, and of the summed PSS (shared pages counted once, split
between the processes sharing them) of the process and all its descendants, sampled every 50 ms from /proc.
Runs alternate between the pipelines; medians and min-max over ``--repeats``. Masks are compared voxel by
voxel with nnU-Net's. Results: ``benchmarks/results/cohort_<preset>.json`` and ``.md``, with CPU flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segsentry.bench import machine_info, package_versions

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {
    # spec name, [(shape z, y, x), (spacing x, y, z mm)] per case
    "small": ("SMALL_SPEC", [((30, 160, 160), (0.8, 0.8, 2.5)), ((48, 192, 176), (0.75, 0.75, 2.0)),
                             ((40, 224, 224), (0.7, 0.7, 3.0)), ((60, 176, 208), (0.9, 0.9, 1.5)),
                             ((36, 256, 240), (0.7, 0.7, 2.5)), ((52, 208, 192), (0.85, 0.85, 2.0))]),
    "fullres": ("FULLRES_SPEC", [((80, 256, 256), (0.8, 0.8, 2.5)), ((100, 300, 300), (0.75, 0.75, 2.0)),
                                 ((60, 320, 320), (0.7, 0.7, 3.0)), ((120, 256, 288), (0.9, 0.9, 1.5)),
                                 ((70, 384, 384), (0.7, 0.7, 2.5)), ((90, 288, 256), (0.85, 0.85, 2.0))]),
}


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB from smaps_rollup; (0, 0) once it is gone."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def run_tree(cmd: list[str], *, env: dict[str, str] | None = None, interval: float = 0.05) -> dict:
    """Run ``cmd``; wall seconds and the peak summed RSS / PSS (MiB) of its process tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_rss = peak_pss = 0
    peak_procs = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        totals = [_memory_kb(p) for p in pids]
        peak_rss = max(peak_rss, sum(t[0] for t in totals))
        peak_pss = max(peak_pss, sum(t[1] for t in totals))
        peak_procs = max(peak_procs, len(pids))
        time.sleep(interval)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss / 1024, "peak_pss_mb": peak_pss / 1024,
            "max_processes": peak_procs, "returncode": proc.returncode, "stderr_tail": stderr[-2000:]}


def _write_cases(folder: Path, cases: list, seed: int) -> list[str]:
    import SimpleITK as sitk

    from segsentry.phantoms import make_chest_ct

    folder.mkdir(parents=True)
    ids = []
    for i, (shape, spacing) in enumerate(cases):
        image, _ = make_chest_ct(seed=seed + i, cohort="id", shape=shape, spacing_xyz=spacing).to_sitk()
        case = f"case{i:02d}"
        sitk.WriteImage(image, str(folder / f"{case}_0000.nii.gz"))
        ids.append(case)
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"])
    parser.add_argument("--seed", type=int, default=500)
    parser.add_argument("--contended", action="store_true", help="label the timings as measured on a busy machine")
    args = parser.parse_args(argv)

    import SimpleITK as sitk

    from segsentry.calib import calibrate
    from segsentry.devtools import nnunet_folder
    from segsentry.export import export_nnunet

    spec_name, cases = PRESETS[args.preset]
    spec = getattr(nnunet_folder, spec_name)
    bindir = Path(sys.executable).parent
    nnunet_cli = shutil.which("nnUNetv2_predict_from_modelfolder", path=str(bindir)) or \
        shutil.which("nnUNetv2_predict_from_modelfolder")
    if nnunet_cli is None:
        raise SystemExit("nnUNetv2_predict_from_modelfolder is not installed (pip install nnunetv2==2.8.1)")
    with tempfile.TemporaryDirectory(prefix="segsentry-cohort-") as tmp:
        work = Path(tmp)
        model_dir = nnunet_folder.make_model_folder(work / "results", spec)
        train = work / "train"
        _write_cases(train, cases[:2], seed=args.seed + 100)  # calibration only needs a working bundle
        bundle = calibrate(export_nnunet(model_dir, work / "m.features.onnx").path, [train], work / "m.ood.onnx",
                           threshold_rule="paper", score_folds=1).path
        inputs = work / "imagesTs"
        ids = _write_cases(inputs, cases, seed=args.seed)
        env = {**os.environ, "nnUNet_raw": str(work), "nnUNet_preprocessed": str(work), "nnUNet_results": str(work)}
        pipelines = {"nnunet": lambda out: [nnunet_cli, "-i", str(inputs), "-o", str(out), "-m", str(model_dir),
                                            "-f", "0", "-device", "cpu", "--disable_tta"]}
        for b in args.backends:
            pipelines[f"ood-run {b}"] = (lambda b: lambda out: [sys.executable, "-m", "segsentry.cli", "run",
                                                               str(bundle), str(inputs), "-o", str(out),
                                                               "--backend", b, "--no-qa", "--disable-tta"])(b)
        runs: dict[str, list[dict]] = {k: [] for k in pipelines}
        for r in range(args.repeats):
            for name, command in pipelines.items():
                out = work / f"out_{name.replace(' ', '_')}_{r}"
                result = run_tree(command(out), env=env)
                if result["returncode"] not in (0, 3):  # ood-run exits 3 when a case is flagged
                    raise RuntimeError(f"{name} failed ({result['returncode']}):\n{result['stderr_tail']}")
                runs[name].append({**result, "out": out})
        agreement = {}
        ref = {c: sitk.GetArrayFromImage(sitk.ReadImage(str(runs["nnunet"][0]["out"] / f"{c}.nii.gz"))) for c in ids}
        for name in pipelines:
            if name == "nnunet":
                continue
            diff = total = 0
            for c in ids:
                ours = sitk.GetArrayFromImage(sitk.ReadImage(str(runs[name][0]["out"] / f"{c}.nii.gz")))
                diff += int((ours != ref[c]).sum())
                total += ours.size
            agreement[name] = {"fraction": 1 - diff / total, "mismatched_voxels": diff, "voxels": total}
        patches = [json.loads((runs[f"ood-run {args.backends[0]}"][0]["out"] / f"{c}.json").read_text())["n_patches"]
                   for c in ids]

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    summary = {name: {"seconds_median": med(name, "seconds"),
                      "seconds_range": [min(r["seconds"] for r in v), max(r["seconds"] for r in v)],
                      "cases_per_minute": 60 * len(ids) / med(name, "seconds"),
                      "peak_rss_mb_median": med(name, "peak_rss_mb"), "peak_pss_mb_median": med(name, "peak_pss_mb"),
                      "max_processes": max(r["max_processes"] for r in v)}
               for name, v in runs.items()}
    base = summary["nnunet"]
    for name, s in summary.items():
        s["throughput_vs_nnunet"] = s["cases_per_minute"] / base["cases_per_minute"]
        s["pss_vs_nnunet"] = s["peak_pss_mb_median"] / base["peak_pss_mb_median"]
        s["rss_vs_nnunet"] = s["peak_rss_mb_median"] / base["peak_rss_mb_median"]
    result = {
        "benchmark": "cohort", "preset": args.preset, "contended": args.contended,
        "model": {"spec": spec.name, "patch_size": list(spec.patch_size), "features": list(spec.features)},
        "cases": [{"case": c, "shape_zyx": list(s), "spacing_xyz_mm": list(sp), "n_patches": n}
                  for c, (s, sp), n in zip(ids, cases, patches)],
        "repeats": args.repeats, "summary": summary,
        "runs": {k: [{kk: vv for kk, vv in r.items() if kk not in ("out", "stderr_tail")} for r in v]
                 for k, v in runs.items()},
        "mask_agreement_vs_nnunet": agreement, "machine": machine_info(),
        "versions": package_versions(["segsentry", "numpy", "onnxruntime", "openvino", "torch", "nnunetv2"]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "notes": "Random-weight nnU-Net folder, synthetic chest-CT phantoms. nnU-Net with its default workers "
                 "(-npp 3 -nps 3), --disable_tta, step 0.5, CPU. Each run is a fresh process tree; its time "
                 "includes start-up and model loading.",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"cohort_{args.preset}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    flags = ", ".join(k for k, v in result["machine"]["cpu_flags"].items() if v) or "unknown"
    md = [f"# Cohort throughput, preset `{args.preset}` ({result['date']})", "",
          f"{result['machine']['cpu']}, {result['machine']['cores']} cores, flags: {flags}."
          + (" **Contended**: other jobs shared the cores; rerun on a quiet machine for the ratios." if args.contended
             else ""),
          f"{len(ids)} cases ({', '.join('x'.join(map(str, s)) for s, _ in cases)}; {sum(patches)} patches), "
          f"{spec.name} (patch {list(spec.patch_size)}); {args.repeats} run(s) each, alternating, medians.", "",
          "| pipeline | s (min-max) | cases/min | vs nnU-Net | peak PSS MB (tree) | vs nnU-Net | peak RSS MB | processes | masks vs nnU-Net |",
          "|---|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        agree = agreement.get(name)
        md.append(f"| {name} | {s['seconds_median']:.1f} ({s['seconds_range'][0]:.1f}-{s['seconds_range'][1]:.1f}) | "
                  f"{s['cases_per_minute']:.2f} | {s['throughput_vs_nnunet']:.2f}x | {s['peak_pss_mb_median']:.0f} | "
                  f"{s['pss_vs_nnunet']:.2f}x | {s['peak_rss_mb_median']:.0f} | {s['max_processes']} | "
                  + (f"{agree['fraction']:.6f} ({agree['mismatched_voxels']} voxels)" if agree else "–") + " |")
    (RESULTS / f"cohort_{args.preset}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
