"""glibc malloc settings for the profiled training loop on CPU.

By default glibc gives freed memory back to the kernel (it trims the heap top and unmaps large
blocks), and the next allocation of that size touches fresh pages: one page fault per 4 KiB. A
plain training step frees and reallocates its activations in the same order every step, so the
heap settles and steps stop faulting. A profiled step keeps the module cotangents until the inner
products are taken, which breaks that pattern: on SmolLM2-135M (NPO+GD, 4+4 samples) the profiled
step faulted in 0.5–1.5 GB of fresh pages every step (backward and optimizer step), ~0.3–0.9 s of
a 2.6 s step (``benchmarks/overhead.py`` prints the ratio with and without these settings).

:func:`keep_freed_memory` makes freed memory stay in the process for reuse: large blocks come from
the heap instead of fresh ``mmap`` s (``M_MMAP_MAX = 0``) and the heap is never trimmed
(``M_TRIM_THRESHOLD = -1``, which glibc documents as "disables trimming completely"; its largest
positive value, 2 GiB, still let glibc hand back the top of the heap whenever more than 2 GiB was
free there, as between diagnose's candidates: a 135M model's optimizer state, gradients and
snapshot are 2.2 GB, faulted in afresh for every candidate). Resident memory then stays at the
peak already reached,
which is what peak-memory figures report anyway. The same is done from the shell with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1``. Elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1   # mallopt parameter numbers, <malloc.h>
M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process; True if glibc accepted them."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):   # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
    return _applied
