"""Give freed arrays back to the operating system promptly (glibc's malloc only).

glibc serves an allocation above its mmap threshold with its own mapping, unmapped when freed, and below it from
the heap, which keeps freed memory. The threshold starts at 128 KiB but rises to the size of every mapped block
freed (up to 32 MiB), so after the first patch's outputs are freed the patch-sized arrays of a sliding window
(a few MB each: logits, flips, their sums) come from the heap and stay resident. A fixed threshold of 1 MiB
keeps them mapped: on the fullres net's small CT (mirrored, OpenVINO, Zen 5) the process peaked at 1098 instead
of 1157 MB, the same seconds. Setting the threshold also turns glibc's adjustment off. Process-wide and once;
left alone where the user set ``MALLOC_MMAP_THRESHOLD_`` or where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def return_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process; True where it was set (once per process)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl and others have no such symbol
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    log.debug("glibc mmap threshold %s at %d bytes", "fixed" if done else "not set", MMAP_THRESHOLD_BYTES)
    return done
