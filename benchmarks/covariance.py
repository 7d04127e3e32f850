"""Covariance fit + whitening: segsentry's streamed float64 fit vs sklearn ``EmpiricalCovariance`` (paper Table 2).

    python benchmarks/covariance.py                       # D = 1000, 2560, 5000, 10000 (sklearn at 1e4: ~20 min)
    python benchmarks/covariance.py --dims 1000 2560      # quick

Both sides fit the same float32 feature matrix (N patches x D, a low-rank structure plus noise, offset mean):
sklearn ``EmpiricalCovariance().fit`` (covariance + ``pinvh`` precision, the authors' code) on the in-memory
array; segsentry ``fit_gaussian`` (empirical and Ledoit-Wolf) reading it from a ``FeatureStore`` memmap, which
yields the whitening factors the fused head needs. The distances of 200 held-out rows are compared.
Results: ``benchmarks/results/covariance.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _data(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = min(256, d)
    mixing = rng.standard_normal((k, d)).astype(np.float32) / np.sqrt(k)
    x = rng.standard_normal((n, k)).astype(np.float32) @ mixing
    x += 0.1 * rng.standard_normal((n, d)).astype(np.float32) + rng.standard_normal(d).astype(np.float32)
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1000, 2560, 5000, 10000])
    parser.add_argument("--samples", type=int, default=2000, help="N training patches")
    args = parser.parse_args(argv)

    from sklearn.covariance import EmpiricalCovariance

    from segsentry.calib.gaussian import FeatureStore, fit_gaussian, squared_mahalanobis

    rows = []
    for d in args.dims:
        x = _data(args.samples + 200, d)
        train, held = x[: args.samples], x[args.samples:].astype(np.float64)
        with FeatureStore() as store:
            store.append(train)
            timings = {}
            fits = {}
            for estimator in ("empirical", "ledoit-wolf"):
                start = time.perf_counter()
                fits[estimator] = fit_gaussian(store.array(), estimator=estimator)
                timings[estimator] = time.perf_counter() - start
        start = time.perf_counter()
        reference = EmpiricalCovariance().fit(train.astype(np.float64))
        sklearn_s = time.perf_counter() - start
        expected = reference.mahalanobis(held)
        got = squared_mahalanobis(fits["empirical"], held)
        rel = float(np.max(np.abs(got - expected) / np.abs(expected)))
        rows.append({
            "D": d, "N": args.samples,
            "sklearn_empirical_s": round(sklearn_s, 3),
            "segsentry_empirical_s": round(timings["empirical"], 3),
            "segsentry_ledoit_wolf_s": round(timings["ledoit-wolf"], 3),
            "speedup_empirical": round(sklearn_s / timings["empirical"], 1),
            "max_rel_distance_error_vs_sklearn": rel,
            "path": "dual (N x N Gram)" if args.samples <= d else "primal (D x D covariance)",
        })
        print(json.dumps(rows[-1]), flush=True)

    from segsentry.bench import machine_info, package_versions

    machine = machine_info()
    cpu = machine["cpu"]
    result = {
        "benchmark": "covariance", "rows": rows, "machine": machine,
        "versions": package_versions(("numpy", "scikit-learn", "scipy")),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "covariance.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Covariance fit + whitening vs sklearn EmpiricalCovariance ({result['date']})", "",
             f"{cpu}; N = {args.samples} patches; float64; sklearn time includes pinvh (its precision).", "",
             "| D | path | sklearn s | segsentry empirical s | segsentry Ledoit-Wolf s | speed-up | max rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['D']} | {r['path']} | {r['sklearn_empirical_s']:.2f} | {r['segsentry_empirical_s']:.2f} | "
                     f"{r['segsentry_ledoit_wolf_s']:.2f} | {r['speedup_empirical']:.0f}x | "
                     f"{r['max_rel_distance_error_vs_sklearn']:.1e} |")
    (RESULTS / "covariance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
