"""Linear and attention kernels for CPUs with bf16 units: a small C++ library (llava_ui/kernels/onednn_linear.cc)
over the oneDNN inside Paddle's own wheel, called through ctypes.

Each weight is converted once, at load, and held only in that form: reordered into the blocked bf16 layout
oneDNN's matmul reads (a `Bf16Matrix`, its bytes a Paddle uint8 tensor), or rounded to int8 per output channel
(an `Int8Matrix`, --weights int8); a decode step, a batched step and a prefill chunk all multiply by the same
bytes. `DecodeProgram` runs a whole decode step, every layer, as one library call per CPU worker. Paddle's own bf16 route (static programs) keys its cache of converted weights by the
shapes of every input, so a step whose shapes change converts again; this kernel never does.

The library takes raw pointers to buffers allocated here (Paddle tensors the caller keeps alive for the call) and
touches no Paddle state: any thread may call it, and ctypes lets go of the GIL meanwhile, so the engine's CPU
workers run their parts of a layer at once. Inputs go through cpu.dense(), never Tensor.contiguous(): that one
changes a shared tensor in place (docs/limits.md, the heap corruption it caused).

The library is compiled on first use (g++ and the oneDNN headers of the `onednn-devel` package) into the app's
cache, once per CPU kind, Paddle version and source. Where it cannot be built, `available()` is False, the reason is
logged once, and the engine keeps the path without it.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import paddle

from llava_ui.config import app_home
from llava_ui.model.cpu import dense

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "onednn_linear.cc"
HEADERS_PACKAGE = "onednn-devel"  # the headers of the oneDNN release Paddle's wheel ships (3.6)
LIBRARY = "libllava_onednn.so"


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


def _folder(flags: tuple = ()) -> Path:
    # built for this CPU (-march=native): a cache shared with another kind of CPU builds its own
    key = SOURCE.read_bytes() + paddle.__version__.encode() + _cpu_flags().encode() + " ".join(flags).encode()
    return app_home() / "kernels" / f"onednn-{hashlib.sha256(key).hexdigest()[:16]}"


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _build(flags: tuple = ()) -> ctypes.CDLL:
    """Compile the library for this CPU (once per source, Paddle and CPU kind; `flags` are added to the compiler's,
    e.g. ("-mno-avx512vnni",) for the tests that run a code path this CPU would not take) and load it."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on this machine")
    libs = Path(paddle.__file__).parent / "libs"
    if not (libs / "libdnnl.so.3").exists():
        raise RuntimeError(f"this Paddle wheel has no oneDNN library ({libs / 'libdnnl.so.3'})")
    folder = _folder(flags)
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / LIBRARY
    # one build at a time per folder (several processes may start at once: a server and its tests, two workers)
    with open(folder / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library.exists():
            partial = folder / f"build-{os.getpid()}.so"
            command = [compiler, "-O3", "-march=native", *flags, "-fopenmp-simd", "-shared", "-fPIC", "-Wall",
                       f"-I{_headers()}", str(SOURCE), f"-L{libs}", "-l:libdnnl.so.3", f"-Wl,-rpath,{libs}", "-ldl",
                       "-o", str(partial)]
            done = subprocess.run(command, capture_output=True, text=True)
            (folder / "build.log").write_text(" ".join(command) + "\n" + done.stdout + done.stderr)
            if done.returncode != 0:
                raise RuntimeError(f"the compiler failed; its output ends: {(done.stdout + done.stderr)[-800:]}")
            partial.rename(library)  # whole or absent: a build killed midway leaves no library behind
    return _bind(ctypes.CDLL(str(library)))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The library's C signatures (pointers as integers: Paddle's data_ptr())."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    signatures = {
        "llava_last_error": ([], ctypes.c_char_p),
        "llava_bf16_packed_size": ([i64, i64], i64),
        "llava_bf16_pack": ([ptr, i64, i64, ctypes.c_int, ptr], ctypes.c_int),
        "llava_bf16_linear": ([ptr, i64, i64, ptr, ptr, i64, ptr], ctypes.c_int),
        "llava_decode_attention": ([ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, ptr], ctypes.c_int),
        "llava_prefill_attention": ([ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, ptr], ctypes.c_int),
        "llava_decode_attention_rows": ([ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr], ctypes.c_int),
        "llava_int8_pack": ([ptr, i64, i64, ctypes.c_int, ptr, ptr], ctypes.c_int),
        "llava_int8_linear": ([ptr, i64, i64, ptr, ptr, ptr, i64, ptr], ctypes.c_int),
        "llava_decode_step": ([ptr, ptr, i64], ctypes.c_int),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    return lib


_BUILT: list = []  # the loaded library (or None), once known
_WHY: list = []  # why it could not be built (why_unavailable)
TURNED_OFF = "are turned off (LLAVA_UI_BF16_KERNEL=off)"  # (ends a sentence: "the bf16 kernels ...")
_BUILDING = threading.Lock()


def _library() -> ctypes.CDLL | None:
    """The compiled library, or None (the reason logged once). Built and loaded once per process."""
    if _BUILT:
        return _BUILT[0]
    with _BUILDING:
        if not _BUILT:
            _BUILT.append(_first_build())
    return _BUILT[0]


def _first_build() -> ctypes.CDLL | None:
    if not enabled():
        return None
    try:
        return _build()
    except Exception as err:  # a missing compiler or header, a failed build: run without the kernels
        _WHY.append(f"cannot be built here ({type(err).__name__}: {err})")
        logger.warning("the bf16 kernels could not be built (%s: %s); the CPU computes in fp32",
                       type(err).__name__, err)
        return None


def why_unavailable() -> str:
    """Why the kernels do not run here, as the end of a sentence ("the bf16 kernels ..."); "" where they run."""
    if available():
        return ""
    return _WHY[0] if _WHY else TURNED_OFF


def enabled() -> bool:
    """Whether CPU engines use the kernels where they build: yes, unless LLAVA_UI_BF16_KERNEL=off (a CPU engine then
    computes in fp32)."""
    return os.environ.get("LLAVA_UI_BF16_KERNEL", "").strip().lower() not in ("off", "0", "no")


def available(progress=None) -> bool:
    """Whether the kernels run here; `progress(message)` hears of a first-use build (several seconds)."""
    if progress is not None and not _BUILT and not (_folder() / LIBRARY).exists():
        progress("compiling the bf16 kernels (first use only) ...")
    return _library() is not None


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"bf16 kernel: {_library().llava_last_error().decode(errors='replace')}")


def _pointer(tensor: paddle.Tensor, dtype) -> int:
    """The address of a CPU tensor's first element, checked to hold `dtype` contiguously (the C side reads rows as
    they lie in memory)."""
    if tensor.dtype != dtype or not tensor.place.is_cpu_place() or not tensor.is_contiguous():
        raise ValueError(f"bf16 kernel: a contiguous CPU {dtype} tensor is needed, not {tensor.dtype} "
                         f"{'contiguous' if tensor.is_contiguous() else 'strided'} on {tensor.place}")
    return tensor.data_ptr()


class KernelMatrix:
    """A weight [in, out] (or, `transposed`, a tied head's [out, in]) held once in a kernel's format;
    `matmul(x, bias)` gives x [rows, in] · weight (+ bias) in fp32."""

    def __init__(self, weight: paddle.Tensor, transposed: bool):
        lib = _library()
        if lib is None:
            raise RuntimeError("the bf16 kernels are not available on this machine")
        if len(weight.shape) != 2:
            raise ValueError(f"bf16 kernel: a weight is 2-D, not {list(weight.shape)}")
        self.inputs, self.outputs = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        self.zeros = paddle.zeros([self.outputs], "float32")
        self._pack(lib, dense(weight), transposed)

    @property
    def shape(self) -> list[int]:
        """The weight's logical shape, [in, out]."""
        return [self.inputs, self.outputs]

    def matmul(self, x: paddle.Tensor, bias: paddle.Tensor | None = None) -> paddle.Tensor:
        if len(x.shape) != 2 or x.shape[1] != self.inputs:
            raise ValueError(f"bf16 kernel: rows of {self.inputs} values are needed, not {list(x.shape)}")
        bias = self.zeros if bias is None else bias
        if list(bias.shape) != [self.outputs]:
            raise ValueError(f"bf16 kernel: a bias of {self.outputs} values is needed, not {list(bias.shape)}")
        x = dense(x)
        out = paddle.empty([x.shape[0], self.outputs], "float32")
        _check(self._multiply(_library(), _pointer(x, paddle.float32), x.shape[0], _pointer(bias, paddle.float32),
                              out.data_ptr()))
        return out


class Bf16Matrix(KernelMatrix):
    """A weight as oneDNN's packed bf16: products of bf16 values (the rows rounded to bf16) summed in fp32."""

    def __init__(self, weight: paddle.Tensor, transposed: bool = False):
        super().__init__(weight, transposed)

    def _pack(self, lib, weight, transposed: bool) -> None:
        size = lib.llava_bf16_packed_size(self.inputs, self.outputs)
        if size <= 0:
            _check(-1)
        self.packed = paddle.empty([size], "uint8")
        _check(lib.llava_bf16_pack(_pointer(weight, paddle.float32), self.inputs, self.outputs, int(transposed),
                                   self.packed.data_ptr()))

    @property
    def nbytes(self) -> int:
        return int(self.packed.shape[0])

    def _multiply(self, lib, x: int, rows: int, bias: int, out: int) -> int:
        return lib.llava_bf16_linear(x, rows, self.inputs, self.packed.data_ptr(), bias, self.outputs, out)


class Int8Matrix(KernelMatrix):
    """A weight as int8 with one fp32 scale per output (weight-only int8, per channel: each output's largest
    magnitude maps to 127): half the bytes of bf16. A few rows (a decode step) are rounded to int16, each with its
    own scale, and multiplied exactly by the int8 values (an AVX-512 VNNI kernel reading each weight once for all
    rows); more (a prefill chunk) by oneDNN with the rows and weights in bf16."""

    def __init__(self, weight: paddle.Tensor, transposed: bool = False):
        super().__init__(weight, transposed)

    def _pack(self, lib, weight, transposed: bool) -> None:
        self.values = paddle.empty([self.outputs, self.inputs], "int8")
        self.scales = paddle.empty([self.outputs], "float32")
        _check(lib.llava_int8_pack(_pointer(weight, paddle.float32), self.inputs, self.outputs, int(transposed),
                                   self.values.data_ptr(), self.scales.data_ptr()))

    @property
    def nbytes(self) -> int:
        return self.inputs * self.outputs + 4 * self.outputs

    def dequantized(self) -> paddle.Tensor:
        """The weight the products use, [in, out] fp32 (tests and the embedding lookups of a tied head)."""
        return (self.values.astype("float32") * self.scales.unsqueeze(1)).transpose([1, 0])

    def _multiply(self, lib, x: int, rows: int, bias: int, out: int) -> int:
        return lib.llava_int8_linear(x, rows, self.inputs, self.values.data_ptr(), self.scales.data_ptr(), bias,
                                     self.outputs, out)


def _cache_pointers(keys: paddle.Tensor, values: paddle.Tensor, kv_heads: int, capacity: int, dim: int):
    for rows in (keys, values):
        if list(rows.shape) != [kv_heads * capacity, dim]:
            raise ValueError(f"bf16 kernel: cache rows [{kv_heads * capacity}, {dim}] are needed, not "
                             f"{list(rows.shape)}")
    return _pointer(keys, paddle.bfloat16), _pointer(values, paddle.bfloat16)


def decode_attention(qkv: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, keys: paddle.Tensor,
                     values: paddle.Tensor, q_heads: int, kv_heads: int, capacity: int, position: int) -> paddle.Tensor:
    """One decode position of a worker's heads (onednn_linear.cc, llava_decode_attention): RoPE, the cache write at
    `position` (keys and values [kv_heads * capacity, dim] bf16, written in place) and attention over positions
    0..position; qkv [1, (q + 2 kv heads) * dim] → [1, q heads * dim]."""
    dim = cos.shape[-1]
    if qkv.size != (q_heads + 2 * kv_heads) * dim or cos.size != dim or sin.size != dim:
        raise ValueError("bf16 kernel: qkv and the RoPE rows do not match the heads")
    qkv, cos, sin = dense(qkv), dense(cos), dense(sin)
    k, v = _cache_pointers(keys, values, kv_heads, capacity, dim)
    out = paddle.empty([1, q_heads * dim], "float32")
    _check(_library().llava_decode_attention(
        _pointer(qkv, paddle.float32), _pointer(cos, paddle.float32), _pointer(sin, paddle.float32), dim, k, v,
        q_heads, kv_heads, capacity, position, out.data_ptr()))
    return out


def decode_attention_rows(qkv: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, caches: list,
                          q_heads: int, kv_heads: int) -> paddle.Tensor:
    """decode_attention for the rows of a batched decode step in one call: qkv [rows, (q + 2 kv heads) * dim],
    cos and sin [rows, dim], caches one (keys, values, capacity, position) per row (each its own cache) →
    [rows, q heads * dim]."""
    rows, dim = len(caches), cos.shape[-1]
    if list(qkv.shape) != [rows, (q_heads + 2 * kv_heads) * dim] or list(cos.shape) != [rows, dim] or list(
            sin.shape) != [rows, dim]:
        raise ValueError("bf16 kernel: qkv and the RoPE rows do not match the heads and rows")
    qkv, cos, sin = dense(qkv), dense(cos), dense(sin)
    pointers = [_cache_pointers(keys, values, kv_heads, capacity, dim) for keys, values, capacity, _ in caches]
    addresses = ctypes.c_void_p * rows
    numbers = ctypes.c_int64 * rows
    out = paddle.empty([rows, q_heads * dim], "float32")
    _check(_library().llava_decode_attention_rows(
        _pointer(qkv, paddle.float32), _pointer(cos, paddle.float32), _pointer(sin, paddle.float32), dim, rows,
        addresses(*(k for k, _ in pointers)), addresses(*(v for _, v in pointers)),
        numbers(*(c[2] for c in caches)), numbers(*(c[3] for c in caches)), q_heads, kv_heads, out.data_ptr()))
    return out


def prefill_attention(heads: paddle.Tensor, keys: paddle.Tensor, values: paddle.Tensor, kv_heads: int,
                      capacity: int, start: int) -> paddle.Tensor:
    """Causal attention of a prefill chunk (onednn_linear.cc, llava_prefill_attention): heads [q + 2 kv heads,
    rows, dim] (q with RoPE and scaled, k with RoPE, v) at positions start..; their k and v are written into the
    bf16 cache (keys, values [kv heads * capacity, dim]), then q attends over its positions 0..start+rows-1 →
    [rows, q heads * dim]; blocked, bf16 products, fp32 softmax."""
    count, rows, dim = heads.shape
    q_heads = count - 2 * kv_heads
    k, v = _cache_pointers(keys, values, kv_heads, capacity, dim)
    heads = dense(heads)
    out = paddle.empty([rows, q_heads * dim], "float32")
    _check(_library().llava_prefill_attention(_pointer(heads, paddle.float32), q_heads, kv_heads, rows, dim, k, v,
                                              capacity, start, out.data_ptr()))
    return out


class _Linear(ctypes.Structure):  # LlavaLinear (onednn_linear.cc)
    _fields_ = [("kind", ctypes.c_int64), ("data", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("k", ctypes.c_int64), ("n", ctypes.c_int64)]


class _LayerPart(ctypes.Structure):  # LlavaLayerPart
    _fields_ = [("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear), ("down", _Linear)]


class _DecodeModel(ctypes.Structure):  # LlavaDecodeModel
    _fields_ = [(name, ctypes.c_int64) for name in ("layers", "hidden", "dim", "q_heads", "kv_heads", "kv_start",
                                                     "columns")] + [
        ("eps", ctypes.c_float), ("parts", ctypes.POINTER(_LayerPart)), ("input_norms", ctypes.c_void_p),
        ("post_norms", ctypes.c_void_p), ("final_norm", ctypes.c_void_p), ("head", _Linear),
        ("head_start", ctypes.c_int64)]


class _DecodeStep(ctypes.Structure):  # LlavaDecodeStep
    _fields_ = [("rows", ctypes.c_int64), ("workers", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("embeds", "cos", "sin", "positions", "capacities", "keys", "values",
                                             "exchange", "logits")] + [
        (name, ctypes.c_int64) for name in ("vocab", "arrived", "generation", "failed")]


def _linear(matrix: KernelMatrix, bias: paddle.Tensor | None = None) -> _Linear:
    bias = matrix.zeros if bias is None else bias
    if isinstance(matrix, Int8Matrix):
        return _Linear(1, matrix.values.data_ptr(), matrix.scales.data_ptr(), _pointer(bias, paddle.float32),
                       matrix.inputs, matrix.outputs)
    return _Linear(0, matrix.packed.data_ptr(), None, _pointer(bias, paddle.float32), matrix.inputs, matrix.outputs)


class DecodeProgram:
    """A whole decode step of the language model (every layer, the final norm, the LM head) for a few rows, as one
    call of the library per CPU worker (llava_decode_step): the workers run their parts of each layer at once and
    meet twice a layer in C, then each computes its share of the vocabulary, so a step costs no Python per layer.
    Built once from the packed parts and head shares (Qwen2Runner); it reads the weights, norms and caches in place
    (the model keeps them alive)."""

    def __init__(self, layers: list, parts: list, final_norm: paddle.Tensor, eps: float, dim: int, head: list):
        hidden = int(final_norm.shape[0])
        self.workers, self.layers, self.hidden, self.dim = len(parts[0][0]), len(layers), hidden, dim
        if any(len(attention) != self.workers or len(feed) != self.workers for attention, feed in parts):
            raise ValueError("decode program: every layer needs one attention and one MLP part per worker")
        if len(head) != self.workers or any(share.inputs != hidden for share in head):
            raise ValueError("decode program: the LM head needs one share of the vocabulary per worker")
        self.vocab = sum(share.outputs for share in head)
        starts = [sum(share.outputs for share in head[:w]) for w in range(self.workers)]
        norms = [layer.input_layernorm.weight for layer in layers], [layer.post_attention_layernorm.weight
                                                                     for layer in layers]
        self._norms = [(ctypes.c_void_p * self.layers)(*[_pointer(w, paddle.float32) for w in weights])
                       for weights in norms]
        self._final = final_norm
        self._parts, self.models = [], []
        for w in range(self.workers):
            array = (_LayerPart * self.layers)(*[
                _LayerPart(_linear(attention[w].qkv, attention[w].bias), _linear(attention[w].o_rows),
                           _linear(feed[w].gate_up), _linear(feed[w].down_rows)) for attention, feed in parts])
            attention = parts[0][0][w]
            self._parts.append(array)
            self.models.append(_DecodeModel(self.layers, hidden, dim, attention.q_heads, attention.kv_heads,
                                            attention.kv.start, feed_columns(parts[0][1][w]), eps, array,
                                            ctypes.cast(self._norms[0], ctypes.c_void_p),
                                            ctypes.cast(self._norms[1], ctypes.c_void_p),
                                            _pointer(final_norm, paddle.float32), _linear(head[w]), starts[w]))

    def run(self, embeds: paddle.Tensor, caches: list, positions: list[int], cos: paddle.Tensor,
            sin: paddle.Tensor) -> paddle.Tensor:
        """embeds [rows, hidden] (fp32), row r at positions[r] over caches[r] (bf16, written at that position),
        cos and sin [rows, dim] → the logits [rows, vocab] (fp32)."""
        from llava_ui.model.cpu import concurrent_workers, run_parts

        rows = len(caches)
        if list(embeds.shape) != [rows, self.hidden] or list(cos.shape) != [rows, self.dim] or list(
                sin.shape) != [rows, self.dim]:
            raise ValueError("decode program: embeds and RoPE rows do not match the rows")
        if concurrent_workers() != self.workers:  # every worker must run at once: they wait for each other
            raise RuntimeError(f"decode program: built for {self.workers} workers, {concurrent_workers()} run")
        embeds, cos, sin = dense(embeds), dense(cos), dense(sin)
        keys, values = [], []
        for cache, position in zip(caches, positions):
            if not 0 <= position < cache.capacity or cache.keys[0].dtype != paddle.bfloat16:
                raise ValueError("decode program: a bf16 cache with room for the position is needed")
            k, v = cache.layer_pointers()
            keys += k
            values += v
        exchange = paddle.empty([2 * self.workers * rows * self.hidden], "float32")
        logits = paddle.empty([rows, self.vocab], "float32")
        numbers, addresses = ctypes.c_int64 * rows, ctypes.c_void_p * (rows * self.layers)
        positions_c, capacities_c = numbers(*positions), numbers(*[cache.capacity for cache in caches])
        keys_c, values_c = addresses(*keys), addresses(*values)
        step = _DecodeStep(rows, self.workers, _pointer(embeds, paddle.float32), _pointer(cos, paddle.float32),
                           _pointer(sin, paddle.float32), ctypes.addressof(positions_c),
                           ctypes.addressof(capacities_c), ctypes.addressof(keys_c), ctypes.addressof(values_c),
                           exchange.data_ptr(), logits.data_ptr(), self.vocab, 0, 0, 0)
        lib = _library()

        def worker(w: int):  # the reason is read in the thread that failed (llava_last_error is per thread)
            status = lib.llava_decode_step(ctypes.byref(self.models[w]), ctypes.byref(step), w)
            return None if status == 0 else lib.llava_last_error().decode(errors="replace")

        errors = [error for error in run_parts(worker, list(range(self.workers))) if error]
        if errors:  # the first worker's own reason, not "another worker failed"
            raise RuntimeError(f"decode program: {sorted(errors, key=lambda e: e == 'another worker failed')[0]}")
        return logits


def feed_columns(part) -> int:
    """The MLP columns of a part: its gate|up matrix has two outputs per column."""
    return part.gate_up.outputs // 2
