"""A real two-node Ray cluster (``ray start --head`` plus ``ray start --address``) on 127.0.0.1, driven by the
``ood-run --ray HOST:PORT`` command line; its outputs must equal a serial run's.

The cluster lives in its own network and PID namespaces (``unshare --net --pid``): only ``lo`` exists there, so
every Ray socket is on loopback whatever Ray binds, and when the script ends the kernel stops every process the
cluster started (``ray stop`` would stop every Ray process on the host).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from test_ray_driver import assert_same_outputs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray (segsentry[distributed]) is not installed"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) for an isolated cluster"),
]


def _namespaces_work() -> bool:
    done = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return done.returncode == 0


def test_two_nodes_on_loopback_equal_the_serial_run(ct_pipeline, tmp_path):
    if not _namespaces_work():
        pytest.skip("unshare --net --pid is not permitted here (needs root or user namespaces)")
    from segsentry.runtime import run_batch

    inputs = tmp_path / "in"
    inputs.mkdir()
    for files in ct_pipeline.cases.values():
        for f in files:
            shutil.copy(f, inputs / f.name)
    out = tmp_path / "ray"
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp = tempfile.mkdtemp(prefix="ssray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    script = textwrap.dedent(f"""
        set -e
        ip link set lo up
        export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$({sys.executable} -c "import secrets; print(secrets.token_hex(32))")
        # the head: one CPU (read and write tasks); the second node: two CPUs (the two engines)
        {ray_bin} start --head --node-ip-address 127.0.0.1 --port 6379 --num-cpus 1 --include-dashboard=false \\
            --disable-usage-stats --temp-dir {temp} > {tmp_path}/head.log 2>&1
        {ray_bin} start --address 127.0.0.1:6379 --node-ip-address 127.0.0.1 --num-cpus 2 --disable-usage-stats \\
            > {tmp_path}/node.log 2>&1
        {sys.executable} -c "import ray; ray.init(address='127.0.0.1:6379', logging_level='ERROR'); \\
            print('NODES', sum(n['Alive'] for n in ray.nodes()))"
        {sys.executable} -m segsentry.cli run {ct_pipeline.ood_onnx} {inputs} -o {out} --backend onnxruntime \\
            --ray 127.0.0.1:6379 --ray-workers 2 --threads 1 --no-qa --json > {tmp_path}/run.json \\
            || echo "EXIT $?"
    """)
    try:
        done = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
                              capture_output=True, text=True, timeout=480,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    logs = done.stdout + done.stderr + "".join((tmp_path / f).read_text() for f in ("head.log", "node.log")
                                               if (tmp_path / f).is_file())
    assert done.returncode == 0, logs
    assert "NODES 2" in done.stdout, logs
    assert "EXIT" not in done.stdout or "EXIT 3" in done.stdout, logs  # 0 or 3 (a case flagged): no failure
    serial_no_qa = tmp_path / "serial_no_qa"
    run_batch(ct_pipeline.ood_onnx, [inputs], serial_no_qa, backend="onnxruntime", threads=1, qa=False)
    assert_same_outputs(serial_no_qa, out)
