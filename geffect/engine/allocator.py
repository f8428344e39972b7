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

The pages that are still faulted in (the heap grows while a new batch shape reaches a new peak,
and the group-only path's heap grew by ~70 MB in a median step) cost one fault per 4 KiB: torch
backs its large CPU tensors (≥ 2 MiB) with transparent huge pages when ``THP_MEM_ALLOC_ENABLE`` is
set (read at its first large allocation; the kernel must allow ``madvise``), one fault per 2 MiB.
With varying batches in one process, GD's group-only step went from 19 k faults and 2.55 s to
~300 faults and 2.34 s (plain step 2.13–2.22 s, unchanged).
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

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
    huge_pages()
    return _applied


def huge_pages(setting: Path = Path("/sys/kernel/mm/transparent_hugepage/enabled")) -> bool:
    """Ask torch to back its large CPU tensors with transparent huge pages, where the kernel allows
    it (``madvise`` or ``always``) and the user has not set ``THP_MEM_ALLOC_ENABLE``; True if asked.
    Takes effect only if torch has not made a large CPU tensor yet (it reads the variable once)."""
    try:
        mode = setting.read_text()
    except OSError:
        return False
    if "[never]" in mode or "THP_MEM_ALLOC_ENABLE" in os.environ:
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return True
