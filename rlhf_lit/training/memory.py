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

By default (``RLHF_LIT_MALLOC=auto``) the stages fix it only when gradient checkpointing is on, i.e. when
the run has asked to trade speed for memory: that is where it saves most (the figure above), and the
page faults are dear everywhere. One run after the other (issue #19), one process each: the SmolLM2 reward stage
without checkpointing took 29.9 s a step with the threshold against 22.0 s without (peak 5.24 against
5.51 GiB), SmolLM2 SFT 0.339 against 0.39 sequences/s (4.14 against 4.95 GiB), a tiny PPO step 6-16%
longer. ``release`` fixes it in every run, ``default`` in none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MODES = ("auto", "release", "default")
_applied: list[int] = []


def release_freed_memory(threshold: int = 1024 * 1024, checkpointing: bool = True) -> bool:
    """Serve allocations of ``threshold`` bytes or more with mmap for the rest of the process, so a
    freed tensor's memory returns to the system. Once per process; False where the C library is not
    glibc, where ``RLHF_LIT_MALLOC=default`` leaves malloc alone (e.g. with jemalloc preloaded), or, in
    ``auto`` mode (the default), where the run does not use gradient ``checkpointing``."""
    mode = os.environ.get("RLHF_LIT_MALLOC") or "auto"
    if mode not in MODES:
        raise ValueError(f"RLHF_LIT_MALLOC must be one of {MODES}, got {mode!r}")
    if _applied or mode == "default" or (mode == "auto" and not checkpointing):
        return bool(_applied)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.gnu_get_libc_version and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    if ok:
        _applied.append(threshold)
    return ok
