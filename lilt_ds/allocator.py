"""Host memory allocator settings for training on the CPU.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back to the kernel on ``free``, so a
step that allocates and frees large temporaries page-faults on, and the kernel zeroes, every one of
their pages again at the next step. DeepSpeed's optimizers do exactly that each step (gradient
buckets, the flat fp32 gradient partition, float64 copies of the gradients for the clipping norm):
with ZeRO-2, small/small towers at batch 16 on the 2-core development machine spent 0.39 s of
kernel time per 2.2 s step on 200,000 page faults (benchmarks/throughput.py).

:func:`retain_freed_memory` makes glibc serve large blocks from the heap and keep freed memory for
reuse (``mallopt``: no mmap'd chunks, trim threshold 2 GiB), as jemalloc or tcmalloc would: the
process's resident memory stays at its peak instead of going up and down every step. It applies to
the whole process (and processes it forks, such as DataLoader workers). GPU memory has its own
caching allocator and is not concerned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "LILT_DS_MALLOC"
"""``LILT_DS_MALLOC=system`` keeps the C library's own settings."""

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: give back only what exceeds 2 GiB at the heap's top


def retain_freed_memory() -> bool:
    """Keep freed host memory in the process for reuse (glibc only); True when the settings took.

    A no-op returning False with ``LILT_DS_MALLOC=system`` and on C libraries without ``mallopt``
    (macOS, musl).
    """
    if os.environ.get(ENV, "retain").lower() == "system":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
