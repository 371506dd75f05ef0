"""Linear kernels over bf16 weights for CPUs with bf16 units: a Paddle custom C++ operator
(llava_ui/kernels/onednn_linear.cc) over the oneDNN inside Paddle's own wheel.

Each weight is reordered once, at load, into the blocked bf16 layout oneDNN's matmul reads, and held only in that
form (a `Bf16Matrix`); a decode step, a batched step and a prefill chunk all multiply by the same bytes. Paddle's
own bf16 route (static programs) keys its cache of converted weights by the shapes of every input, so a step whose
shapes change converts again; this kernel never does.

The operator is compiled on first use (a C++ compiler and the oneDNN headers from the `onednn-devel` package) into
the app's cache, once per Paddle version and source. Where it cannot be built, `available()` is False, the reason is
logged once, and the engine keeps the path without it.

Engines use it only when asked (LLAVA_UI_BF16_KERNEL=on, `on_by_default()`): full test-suite runs with it as the
default died of a heap corruption at random points, not yet found (docs/limits.md); the tests of the kernels and
of the engine over them ask for it explicitly.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import paddle

from llava_ui.config import app_home

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "onednn_linear.cc"
HEADERS_PACKAGE = "onednn-devel"  # the headers of the oneDNN release Paddle's wheel ships (3.6)


def _headers() -> Path:
    """The folder holding oneapi/dnnl/dnnl.hpp, from the installed onednn-devel package."""
    try:
        files = importlib.metadata.distribution(HEADERS_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the {HEADERS_PACKAGE} package (oneDNN's headers) is not installed") from None
    for file in files:
        if str(file).replace("\\", "/").endswith("oneapi/dnnl/dnnl.hpp"):
            return Path(file.locate()).resolve().parent.parent.parent
    raise RuntimeError(f"the {HEADERS_PACKAGE} package has no oneapi/dnnl/dnnl.hpp")


def _folder() -> Path:
    # built for this CPU (-march=native): a cache shared with another kind of CPU builds its own
    digest = hashlib.sha256(SOURCE.read_bytes() + paddle.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    return app_home() / "kernels" / f"onednn_linear-{digest}"


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _build():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        raise RuntimeError("no C++ compiler (g++) on this machine")
    libs = Path(paddle.__file__).parent / "libs"
    if not (libs / "libdnnl.so.3").exists():
        raise RuntimeError(f"this Paddle wheel has no oneDNN library ({libs / 'libdnnl.so.3'})")
    folder = _folder()
    folder.mkdir(parents=True, exist_ok=True)
    # one build at a time per folder (several processes may start at once: a server and its tests, two workers)
    with open(folder / "lock", "w") as lock, _output_to(folder / "build.log"):
        fcntl.flock(lock, fcntl.LOCK_EX)
        from paddle.utils.cpp_extension import load

        return load(name="llava_onednn_linear", sources=[str(SOURCE)], build_directory=str(folder),
                extra_include_paths=[str(_headers())], extra_cxx_cflags=["-O3", "-fopenmp-simd", "-march=native"],
                    extra_ldflags=[f"-L{libs}", "-l:libdnnl.so.3", f"-Wl,-rpath,{libs}", "-ldl"], verbose=False)


@contextlib.contextmanager
def _output_to(log: Path):
    """This process's stdout and stderr (the file descriptors: the compiler and Paddle's C++ print too) into `log`
    meanwhile; a failure's message carries the log's end."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "w") as target:
            os.dup2(target.fileno(), 1)
            os.dup2(target.fileno(), 2)
            try:
                with contextlib.redirect_stdout(target), contextlib.redirect_stderr(target):  # Python's own
                    yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    except Exception as err:
        tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
        raise RuntimeError(f"{err}; the build's output ends: {tail}") from None
    finally:
        for fd in saved:
            os.close(fd)


_BUILT: list = []  # the compiled operator module (or None), once known
_BUILDING = threading.Lock()


def _operator():
    """The compiled operator module, or None (the reason logged once). Built once per process: two threads that
    ask first at once would each load the library and redirect the process's output."""
    if _BUILT:
        return _BUILT[0]
    with _BUILDING:
        if not _BUILT:
            _BUILT.append(_first_build())
    return _BUILT[0]


def _first_build():
    if os.environ.get("LLAVA_UI_BF16_KERNEL", "") == "off":
        return None
    try:
        return _build()
    except Exception as err:  # a missing compiler or header, a failed build: run without the kernel
        logger.warning("the bf16 linear kernel could not be built (%s: %s); the language model keeps its "
                       "slower bf16 path", type(err).__name__, err)
        return None


def on_by_default() -> bool:
    """Whether bf16 engines use the kernels unless told otherwise (LLAVA_UI_BF16_KERNEL=on)."""
    return os.environ.get("LLAVA_UI_BF16_KERNEL", "").strip().lower() in ("on", "1", "yes")


def available(progress=None) -> bool:
    """Whether the kernel runs here; `progress(message)` hears of a first-use build (tens of seconds)."""
    if progress is not None and not _BUILT and not any(_folder().glob("**/*.so")):
        progress("compiling the bf16 linear kernel (first use only) ...")
    return _operator() is not None


class Bf16Matrix:
    """A weight [in, out] (or, `transposed`, a tied head's [out, in]) held once, as oneDNN's packed bf16;
    `matmul(x, bias)` gives x [rows, in] · weight (+ bias) in fp32, products of bf16 values summed in fp32."""

    def __init__(self, weight: paddle.Tensor, transposed: bool = False):
        operator = _operator()
        if operator is None:
            raise RuntimeError("the bf16 linear kernel is not available on this machine")
        self.inputs, self.outputs = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        self.packed = operator.bf16_pack(weight, transposed)
        self.zeros = paddle.zeros([self.outputs], "float32")
        self._linear = operator.bf16_linear

    @property
    def shape(self) -> list[int]:
        """The weight's logical shape, [in, out]."""
        return [self.inputs, self.outputs]

    @property
    def nbytes(self) -> int:
        return int(self.packed.shape[0])

    def matmul(self, x: paddle.Tensor, bias: paddle.Tensor | None = None) -> paddle.Tensor:
        if not x.is_contiguous():  # the kernel reads rows of memory as they lie
            x = x.contiguous()
        return self._linear(x, self.packed, self.zeros if bias is None else bias, self.outputs)


def decode_attention(qkv: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, keys: paddle.Tensor,
                     values: paddle.Tensor, q_heads: int, kv_heads: int, capacity: int, position: int) -> paddle.Tensor:
    """One decode position of a worker's heads (onednn_linear.cc, DecodeAttention): RoPE, the cache write at
    `position` (keys and values [kv_heads * capacity, dim] bf16, written in place) and attention over positions
    0..position; qkv [1, (q + 2 kv heads) * dim] → [1, q heads * dim]."""
    if not qkv.is_contiguous():
        qkv = qkv.contiguous()
    return _operator().decode_attention(qkv, cos, sin, keys, values, q_heads, kv_heads, capacity, position)


def prefill_attention(heads: paddle.Tensor, keys: paddle.Tensor, values: paddle.Tensor, kv_heads: int,
                      capacity: int, start: int) -> paddle.Tensor:
    """Causal attention of a prefill chunk (onednn_linear.cc, PrefillAttention): heads [q + 2 kv heads, rows, dim]
    (q with RoPE and scaled, k with RoPE, v) at positions start..; their k and v are written into the bf16 cache
    (keys, values [kv heads * capacity, dim]), then q attends over its positions 0..start+rows-1 → [rows, q heads *
    dim]; blocked, bf16 products, fp32 softmax."""
    return _operator().prefill_attention(heads, keys, values, kv_heads, capacity, start)
