"""Weights packed once for MKL's sgemm (`cblas_sgemm_pack` / `cblas_sgemm_compute`): a batched decode step at the
cost of one row.

A decode step of a few rows is a small matrix product over weights read from memory. MKL's ordinary sgemm costs
far more for a few rows than for one (by all appearances it repacks the weight into its kernel's panel layout on
every call); with the weight packed once (at load, in place of the matrix) every call streams the panels as they
are, and a few rows cost about what one does. What it costs: MKL pads its panels, so the server holds more memory,
and one stream decodes more slowly; an engine uses it only when asked (LLAVA_UI_BATCH_LAYOUT=packed,
llava_ui.model.options). The measurements: docs/performance.md, "Many chats at once".

Packed for the prefill chunk's row count (the pack call's M hint; the layout serves any row count). Rows of one
product do not depend on each other except through the kernel MKL picks for the row count, which rounds
differently for some counts (which ones depends on the CPU and the matrix). `calibrate()` finds those at load, on
the model's own matrices, and such a count is computed as the next count that agrees (zero rows added): every row
of a batched step is then bit for bit what it is alone.
"""
from __future__ import annotations

import ctypes
import functools

import numpy as np
import paddle

from llava_ui.model.cpu import dense, mkl_library

_ROW_MAJOR, _NO_TRANS, _PACKED, _B_MATRIX = 101, 111, 151, 162
PACK_ROWS = 256  # the M the layout is packed for: qwen2.PREFILL_CHUNK
MOST_ROWS = 16  # the row counts calibrate() checks


def available() -> bool:
    """MKL's packed sgemm is there (Paddle's CPU wheels bundle MKL; a build without it keeps the other layouts)."""
    lib = mkl_library()
    return bool(lib) and all(hasattr(lib, name) for name in
                             ("cblas_sgemm_alloc", "cblas_sgemm_pack", "cblas_sgemm_compute", "cblas_sgemm_free"))


@functools.cache
def _library():
    lib = mkl_library()
    lib.cblas_sgemm_alloc.restype = ctypes.c_void_p
    lib.cblas_sgemm_alloc.argtypes = [ctypes.c_int] * 4
    lib.cblas_sgemm_pack.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                                          ctypes.c_void_p]
    lib.cblas_sgemm_compute.argtypes = [ctypes.c_int] * 6 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                                             ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
                                                             ctypes.c_int]
    lib.cblas_sgemm_free.argtypes = [ctypes.c_void_p]
    return lib


class PackedMatrix:
    """A float32 [in, out] CPU weight in MKL's packed layout; `matmul(x)` = x @ weight for x [rows, in]."""

    def __init__(self, weight: paddle.Tensor):
        self.alone_as: dict[int, int] = {}  # row counts run as a larger count that rounds as one row (calibrate)
        if weight.dtype != paddle.float32 or not weight.place.is_cpu_place() or weight.ndim != 2:
            raise ValueError(f"packs float32 CPU matrices, not {weight.dtype} {list(weight.shape)} on {weight.place}")
        self._lib = _library()
        self.shape = [int(n) for n in weight.shape]
        k, n = self.shape
        weight = dense(weight)
        self._buffer = self._lib.cblas_sgemm_alloc(_B_MATRIX, PACK_ROWS, n, k)
        if not self._buffer:
            raise MemoryError(f"MKL could not allocate a packed {k}x{n} matrix")
        self._lib.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _NO_TRANS, PACK_ROWS, n, k, 1.0, weight.data_ptr(), n,
                                   self._buffer)

    def matmul(self, x: paddle.Tensor) -> paddle.Tensor:
        k, n = self.shape
        rows = int(x.shape[0])
        if x.ndim != 2 or int(x.shape[1]) != k:
            raise ValueError(f"[rows, {k}] times a packed {k}x{n} matrix, not {list(x.shape)}")
        if x.dtype != paddle.float32:
            raise ValueError(f"packed matrices multiply float32, not {x.dtype}")
        padded = self.alone_as.get(rows, rows)
        if padded != rows:
            x = paddle.concat([x, paddle.zeros([padded - rows, k], dtype=x.dtype)])
        x = dense(x)
        out = paddle.empty([padded, n], dtype=paddle.float32)
        self._lib.cblas_sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, padded, n, k, x.data_ptr(), k,
                                      self._buffer, n, 0.0, out.data_ptr(), n)
        return out if padded == rows else out[:rows]

    def __del__(self):
        buffer, self._buffer = getattr(self, "_buffer", None), None
        if buffer:
            self._lib.cblas_sgemm_free(buffer)


def calibrate(matrices: list[PackedMatrix], most: int = MOST_ROWS) -> dict[int, int]:
    """Find the row counts (2..most) whose product rounds some row differently from that row alone, on these
    matrices: returns each such count → the next count that agrees with one row (empty: every count agrees), for
    the caller to give its matrices (PackedMatrix.alone_as; zero rows added)."""
    rows = paddle.to_tensor(np.random.default_rng(0).standard_normal((most, max(m.shape[0] for m in matrices)),
                                                                      dtype=np.float32))

    def agrees(count: int) -> bool:
        for matrix in matrices:
            x = rows[:count, :matrix.shape[0]].contiguous()
            together = matrix.matmul(x).numpy()
            if not all(np.array_equal(together[i], matrix.matmul(x[i:i + 1]).numpy()[0]) for i in range(count)):
                return False
        return True

    good = [count for count in range(2, most + 1) if agrees(count)]
    alone_as = {}
    for count in range(2, most + 1):
        if count not in good:
            better = [g for g in good if g > count]
            if better:
                alone_as[count] = better[0]
    return alone_as
