"""CPU math setup: how many threads Paddle's kernels use, and which code path its bundled MKL takes.

Paddle runs CPU math on one thread unless told otherwise, and the MKL it ships (2019.5) picks a slow generic
code path on AMD processors; MKL_DEBUG_CPU_TYPE=5 (read by that MKL at its first call) selects the AVX2 kernels
there, about 2.5× faster sgemm. Neither changes a result beyond float rounding order.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from .parallel import use_threads


def cpu_threads() -> int:
    """LLAVA_UI_THREADS, else every core this process may run on (importing paddle sets OMP_NUM_THREADS=1
    itself, so that variable says nothing about the user's wish)."""
    value = os.environ.get("LLAVA_UI_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def is_amd() -> bool:
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:
        return False


def configure_cpu() -> int:
    """Use every allowed core for Paddle's CPU kernels; returns the thread count."""
    import paddle

    if is_amd():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    os.environ.setdefault("KMP_BLOCKTIME", "1")  # idle MKL threads sleep after 1 ms: cores go to the head workers
    # MKL's own memory manager keeps every gemm's packing buffers (~45 MB after the first image and prompt);
    # without it they are ordinary malloc blocks, reused and handed back like the rest (same speed here)
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    one_malloc_arena()
    threads = cpu_threads()
    paddle.set_flags({"FLAGS_paddle_num_threads": threads})
    paddle.base.core.set_num_threads(threads)
    use_threads(threads)
    return threads


def _glibc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _libc = False
    return _libc


def one_malloc_arena() -> None:
    """Let glibc serve every thread from one heap: the workers' short-lived blocks then reuse each other's freed
    memory instead of touching pages in an arena per thread (~25 MB less at the peak of a long prompt)."""
    if _glibc():
        _libc.mallopt(M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Hand memory freed by a finished phase (vision, a prefill chunk) back to the OS: glibc keeps freed blocks
    resident in its heap otherwise, and the next phase's blocks land on other pages of it."""
    if _glibc():
        _libc.malloc_trim(0)


_libc = None
M_ARENA_MAX = -8  # glibc's mallopt parameter number
