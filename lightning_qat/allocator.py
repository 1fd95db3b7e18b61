"""glibc's allocator told to keep freed memory for reuse: applied by the app at start-up
and by `QuantizationAwareTraining` when ``fit`` sets up on the CPU (``keep_freed_memory``).

glibc hands out blocks above its mmap threshold (NIN's activations at batch 128 are 80 MB)
as fresh mmaps and returns them on free; every training step then zero-fills new pages
for each large tensor, a cost that grows with the number of tensors, not the arithmetic,
and QAT has more of them (fake-quantized copies, masks). ``M_MMAP_MAX = 0`` and a huge
``M_TRIM_THRESHOLD`` keep the heap's pages instead (the environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` do the same; ``bench/qat_overhead.py``
times both settings). The price is resident memory: glibc keeps what it freed, so peaks
are larger (the bench's peak-memory tables, README "Training-step overhead"). The setting
is process-wide and stays for the process's life.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_ENVIRONMENT = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse in this process (``mallopt``:
    ``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = 2 GiB - 1); True where it applied, False
    where it does not apply: not glibc, or the user already chose with the environment
    variables ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` (theirs win)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
