"""The compact Mahalanobis head against the older layout, side by side: bytes and seconds per engine call.

    python benchmarks/head_form.py                 # the shipped demo bundle (2 folds, rank 507, D = 4096)
    python benchmarks/head_form.py --bundle B --rounds 9 --repeats 50

The head alone (``features -> distance``, :func:`segsentry.bench.head_only`) of the bundle as calibrated (the
compact layout: ``basis`` + ``span_scale``) and of the same bundle rewritten into the layout bundles stored
before (``components_t`` beside ``basis``, :func:`segsentry.devtools.head_forms.older_head_form`), each in its
own onnxruntime session on the same random features, timed in alternating rounds (which goes first alternates
too); the distances of the two are compared (rtol 1e-4). Medians of the rounds' medians, min-max over rounds.
Results: ``benchmarks/results/head_form_demo.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from segsentry.bench import head_only, machine_info, package_versions
from segsentry.contract import HEAD_SCOPE
from segsentry.devtools.head_forms import older_head_form
from segsentry.runtime.bundle import load_bundle

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = Path(__file__).resolve().parent.parent / "segsentry" / "models" / "demo_lung.ood.onnx"


def _head_bytes(model: bytes) -> int:
    return sum(i.ByteSize() for i in onnx.load_model_from_string(model).graph.initializer
               if i.name.startswith(HEAD_SCOPE))


def _median_call(session: ort.InferenceSession, feed: dict, repeats: int) -> float:
    session.run(None, feed)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEMO)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "head_form_demo")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle)
    compact = head_only(bundle)
    if compact is None:
        raise SystemExit(f"{args.bundle} has no Mahalanobis head")
    rewritten = older_head_form(onnx.load_model_from_string(bundle.model_bytes)).SerializeToString()
    older = head_only(dataclasses.replace(bundle, model_bytes=rewritten))
    heads = {"compact (basis + span_scale)": compact, "older (components_t beside basis)": older}
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {name: ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
                for name, model in heads.items()}
    names = list(sessions)
    shape = [d if isinstance(d, int) else 1 for d in sessions[names[0]].get_inputs()[0].shape]  # batch: dynamic
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        feed = {"features": rng.normal(size=(batch, *shape[1:])).astype(np.float32)}
        outputs = [s.run(None, feed)[0] for s in sessions.values()]
        np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4)
        per_round: dict[str, list[float]] = {name: [] for name in sessions}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                per_round[name].append(_median_call(sessions[name], feed, args.repeats))
        medians = {name: statistics.median(v) for name, v in per_round.items()}
        rows.append({"batch": batch, "ms_median": {n: 1e3 * m for n, m in medians.items()},
                     "ms_range": {n: [1e3 * min(v), 1e3 * max(v)] for n, v in per_round.items()},
                     "older_over_compact": medians[names[1]] / medians[names[0]]})
    result = {"bundle": str(args.bundle), "folds": bundle.manifest.n_folds, "feature_shape": shape,
              "head_bytes": {name: _head_bytes(model) for name, model in heads.items()},
              "rounds": args.rounds, "repeats": args.repeats, "threads": args.threads, "rows": rows,
              "machine": machine_info(), "versions": package_versions(["segsentry", "numpy", "onnxruntime"]),
              "load_average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Mahalanobis head: compact vs older layout ({Path(args.bundle).name}, {bundle.manifest.n_folds} "
             f"fold(s), features {shape[1:]})", "",
             f"onnxruntime, {args.threads} threads, {args.rounds} alternating rounds x {args.repeats} calls; "
             f"{result['machine']['cpu']}, load average {result['load_average'][0]:.2f}; {result['date']}.", "",
             f"Head initializers: compact {result['head_bytes'][names[0]] / 1e6:.1f} MB, older "
             f"{result['head_bytes'][names[1]] / 1e6:.1f} MB. Distances equal within rtol 1e-4.", "",
             "| batch | " + " | ".join(f"{n} ms (min–max)" for n in names) + " | older / compact |",
             "|---|---|---|---|"]
    for row in rows:
        cells = [f"{row['ms_median'][n]:.3f} ({row['ms_range'][n][0]:.3f}–{row['ms_range'][n][1]:.3f})"
                 for n in names]
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + f" | {row['older_over_compact']:.2f}x |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
