"""Split independent work (attention heads) over the CPU cores with Python threads.

Paddle's CPU elementwise kernels (softmax, masks, concat) run on one thread, and its batched matmuls with a
small inner dimension scale poorly over MKL's threads. Attention heads are independent, so each worker thread
takes a share of them with MKL limited to one thread for that worker (no oversubscription); Paddle kernels
release the GIL, so the shares really run at once. Elsewhere MKL keeps every core for the big matmuls.
"""
from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .compute import grad_off

_pool: ThreadPoolExecutor | None = None
_workers = 1
_lock = threading.Lock()


def _mkl():
    global _mkl_library
    if _mkl_library is None:
        import paddle

        path = Path(paddle.__file__).parent / "libs" / "libmklml_intel.so"
        _mkl_library = ctypes.CDLL(str(path)) if path.exists() else False
    return _mkl_library


def _mkl_threads_here(count: int) -> int:
    """MKL threads for calls made from this thread (0: the global setting); returns the previous value."""
    return _mkl().MKL_Set_Num_Threads_Local(count) if _mkl() else 0


def _setup_worker() -> None:
    """A share worker: MKL on one thread for its calls, and grad mode off (it is per thread in Paddle)."""
    _mkl_threads_here(1)
    grad_off()


def use_threads(count: int) -> None:
    """Called once the CPU thread count is known (runtime.configure_cpu); 1 turns the splitting off."""
    global _pool, _workers
    with _lock:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _workers = max(1, count)
        _pool = ThreadPoolExecutor(_workers - 1, thread_name_prefix="llava-share",
                                   initializer=_setup_worker) if _workers > 1 else None


def shares(count: int) -> list[range]:
    """`count` items (heads, rows) cut into one contiguous range per worker."""
    parts = min(_workers, count)
    bounds = [count * i // parts for i in range(parts + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


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
    return [first] + [future.result() for future in others]


_mkl_library = None
