"""CPU math setup: how many threads Paddle's kernels use, and which code path its bundled MKL takes.

Paddle runs CPU math on one thread unless told otherwise, and the MKL it ships (2019.5) picks a slow generic
code path on AMD processors; MKL_DEBUG_CPU_TYPE=5 (read by that MKL at its first call) selects the AVX2 kernels
there (sgemm several times faster). Neither changes a result beyond float rounding order.

Split independent work (attention heads) over the CPU cores with Python threads.

Paddle's CPU elementwise kernels (softmax, masks, concat) run on one thread, and its batched matmuls with a
small inner dimension scale poorly over MKL's threads. Attention heads are independent, so each worker thread
takes a share of them with MKL limited to one thread for that worker (no oversubscription); Paddle kernels
release the GIL, so the shares really run at once. Elsewhere MKL keeps every core for the big matmuls.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import paddle


def grad_off() -> None:
    """Run in every thread that computes (the engine's compute thread, the share workers): Paddle keeps grad
    mode per thread, and the product never trains."""
    paddle.set_grad_enabled(False)



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


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="ignore")
    except OSError:  # not Linux
        return ""


def is_amd() -> bool:
    return "AuthenticAMD" in _cpuinfo()


def _flags(cpuinfo: str | None = None) -> list[str]:
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    return next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])


def has_avx512(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the given /proc/cpuinfo text) runs AVX-512 instructions. Some of Paddle's CPU kernels
    use them without checking (its fused RMSNorm dies with SIGILL on an AMD EPYC of the Zen 3 generation), so
    callers pick a plain kernel where this is False (and where it is unknown: no /proc/cpuinfo)."""
    return "avx512f" in _flags(cpuinfo)


def bf16_units(cpuinfo: str | None = None) -> str | None:
    """"AMX" or "AVX-512 BF16" when this CPU (or the given /proc/cpuinfo text) has bf16 matrix units, else None."""
    flags = _flags(cpuinfo)
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return None


def configure_cpu() -> int:
    """Use every allowed core for Paddle's CPU kernels and the share workers; returns the thread count. Once per
    process is enough (the load calls it; shares() does on first use otherwise)."""
    global _configured
    _configured = True

    if is_amd():
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
    os.environ.setdefault("KMP_BLOCKTIME", "1")  # idle MKL threads sleep after 1 ms: cores go to the head workers
    # MKL's own memory manager keeps every gemm's packing buffers;
    # without it they are ordinary malloc blocks, reused and handed back like the rest (same speed here)
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
    one_malloc_arena()
    threads = cpu_threads()
    paddle.set_flags({"FLAGS_paddle_num_threads": threads})
    paddle.base.core.set_num_threads(threads)
    use_threads(threads)
    return threads


def dense(tensor):
    """`tensor` if its elements lie contiguously, else a contiguous copy; `tensor` itself is never changed.

    Paddle's Tensor.contiguous() makes a strided tensor contiguous IN PLACE (it swaps the tensor's storage, with
    the GIL let go): two CPU workers doing it at once to one shared tensor (the head's shares of the same hidden
    row, `hidden[:, -1]`, which Paddle keeps strided) freed each other's storage, and long runs died of heap
    corruption. Code that workers run gets its inputs through this instead."""
    return tensor if tensor.is_contiguous() else tensor.clone()


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
    memory instead of touching pages in an arena per thread (a lower peak for long prompts)."""
    if _glibc():
        _libc.mallopt(M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Hand memory freed by a finished phase (vision, a prefill chunk) back to the OS: glibc keeps freed blocks
    resident in its heap otherwise, and the next phase's blocks land on other pages of it."""
    if _glibc():
        _libc.malloc_trim(0)


def drop_pages(tensor) -> int:
    """Give the pages wholly inside a CPU tensor's buffer back to the OS (Linux madvise MADV_DONTNEED): the
    buffer stays allocated at the same address and reads as zeros from then on. For weights only oneDNN's own
    bf16 copies are read from (llava_ui.model.bf16). Returns the bytes released (0 where there is no madvise)."""
    if not _glibc():
        return 0
    start = tensor.data_ptr()
    end = start + tensor._numel() * tensor.element_size()
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    if last <= first:
        return 0
    if _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) != 0:
        return 0
    return last - first


_libc = None
M_ARENA_MAX = -8  # glibc's mallopt parameter number
MADV_DONTNEED = 4
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

_pool: ThreadPoolExecutor | None = None
_workers = 1
_configured = False
_lock = threading.Lock()


def mkl_library():
    global _mkl_library
    if _mkl_library is None:
        path = Path(paddle.__file__).parent / "libs" / "libmklml_intel.so"
        _mkl_library = ctypes.CDLL(str(path)) if path.exists() else False
    return _mkl_library


def _mkl_threads_here(count: int) -> int:
    """MKL threads for calls made from this thread (0: the global setting); returns the previous value."""
    return mkl_library().MKL_Set_Num_Threads_Local(count) if mkl_library() else 0


def _setup_worker() -> None:
    """A share worker: MKL on one thread for its calls, and grad mode off (it is per thread in Paddle)."""
    _mkl_threads_here(1)
    grad_off()


def use_threads(count: int) -> None:
    """Called once the CPU thread count is known (configure_cpu); 1 turns the splitting off."""
    global _pool, _workers
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _workers = max(1, count)
        _pool = ThreadPoolExecutor(_workers - 1, thread_name_prefix="llava-share",
                                   initializer=_setup_worker) if _workers > 1 else None


def shares(count: int) -> list[range]:
    """`count` items (heads, rows) cut into one contiguous range per worker."""
    if not _configured:  # the workers follow the CPU setup, whoever asks first
        configure_cpu()
    parts = min(_workers, count)
    bounds = [count * i // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def concurrent_workers() -> int:
    """How many parts run_parts runs at once: the calling thread and the pool's workers."""
    return _workers if _pool is not None else 1


def map_shares(fn, count: int) -> list:
    """fn(range) for each worker's share of `count` items, all at once; results in order."""
    return run_parts(fn, shares(count))


def run_parts(fn, parts: list) -> list:
    """fn(part) for every part at once: the calling thread takes the first (with MKL on one thread meanwhile), the
    workers the others; results in order. A single part runs here with every MKL thread."""
    if _pool is None or len(parts) == 1:
        return [fn(part) for part in parts]
    others = [_pool.submit(fn, part) for part in parts[1:]]
    previous = _mkl_threads_here(1)
    try:
        first = fn(parts[0])
    finally:
        _mkl_threads_here(previous)
        # every part has ended before this returns or raises: a worker still running would read and write
        # tensors (a KV cache, a kernel's output) that the caller lets go of once this returns
        wait(others)
    return [first] + [future.result() for future in others]


_mkl_library = None
