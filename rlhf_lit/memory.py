"""Host-memory settings of a training process. Standard library only.

PyTorch's CPU tensors come from the C library's malloc. glibc serves a large allocation with mmap (its
pages go back to the system on free) only above a threshold that starts at 128 KiB and, after the first
large free, rises to up to 32 MiB: from then on every activation, gradient and temporary below 32 MiB
lives in the heap, and freed heap memory stays in the process. Measured on the SmolLM2-135M reward stage
(batch 8, gradient checkpointing, one CPU process): peak RSS 3.79 GiB with the default, 2.62 GiB with the
threshold fixed at 128 KiB, 2.64 GiB at 1 MiB (issue #18). 1 MiB is the default: each mmap'd tensor
costs page faults when it is touched (tiny-model SFT spent 6.0 s of system time over 83 steps at 1 MiB
against 2.9 s for the bare loop; SmolLM2 SFT ran at 33 tokens/s against 35 with glibc's default), and a
higher threshold leaves the many small tensors of a tiny model in the heap. Fixing it turns off the rise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_applied: list[int] = []


def release_freed_memory(threshold: int = 1024 * 1024) -> bool:
    """Serve allocations of ``threshold`` bytes or more with mmap for the rest of the process, so a
    freed tensor's memory returns to the system. Once per process; False where the C library is not
    glibc, or where ``RLHF_LIT_MALLOC=default`` leaves malloc alone (e.g. with jemalloc preloaded)."""
    if _applied or os.environ.get("RLHF_LIT_MALLOC") == "default":
        return bool(_applied)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.gnu_get_libc_version and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    if ok:
        _applied.append(threshold)
    return ok
