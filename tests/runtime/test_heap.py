"""glibc's mmap threshold fixed at 1 MiB: patch-sized arrays go back to the OS when freed."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the mmap threshold is glibc's")

# 20 arrays of 4 MiB after one of 16 MiB was freed (which raises glibc's dynamic threshold to 16 MiB):
# how much of the 80 MiB stays resident once they are freed again (small arrays still alive between them).
CHILD = """
import json, sys
import numpy as np
from segsentry.runtime.heap import return_freed_memory_promptly
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS')) / 1024
fixed = return_freed_memory_promptly() if sys.argv[1] == 'fix' else None
big = np.ones(1 << 21); del big
before = rss()
parts, pins = [], []
for _ in range(20):  # a small live array after each, so the heap cannot simply shrink from its top
    parts.append(np.ones(1 << 19)); pins.append(np.ones(1 << 13))
del parts
print(json.dumps({'fixed': fixed, 'kept_mb': rss() - before}))
"""


def _child(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_patch_arrays_leave_the_process():
    default, fixed = _child("default"), _child("fix")
    assert fixed["fixed"] is True
    assert fixed["kept_mb"] < 2, fixed  # all 20 were mapped and unmapped
    assert default["kept_mb"] > 40, default  # the contrast: glibc's own threshold kept them on the heap


def test_a_users_own_threshold_is_left_alone():
    assert _child("fix", MALLOC_MMAP_THRESHOLD_="65536")["fixed"] is False
