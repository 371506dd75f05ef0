"""Qwen2 inference forward over paddlenlp's Qwen2 weights: tensor-parallel parts, a preallocated KV cache and
block-causal attention.

paddlenlp's `Qwen2ForCausalLM` is built and loaded as usual; its forward rebuilds an [L, L] mask and concatenates
the whole KV cache on every step, and Paddle's CPU kernels copy strided views element by element. This forward
computes the same function while every tensor a matmul reads is contiguous. Once loaded, each layer's weights are
regrouped into one part per CPU worker (whole heads with their q|k|v columns side by side and their o_proj rows;
a slice of the MLP with gate|up side by side and the down_proj rows), so a layer is two hand-offs and both cores
stream weights at once: decoding reads memory at the rate of two readers, not MKL's threaded matrix-vector
product. K and V live per kv-head as rows of [kv_heads * capacity, head_dim] buffers written in place with
`scatter_`; a prefill goes through in chunks, attending block by block over contiguous per-head prefixes
(skipping the masked half); a decode step attends over the whole buffer with one additive mask.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.incubate.nn.functional import fused_rms_norm

from llava_ui.errors import UserError, check_stop
from llava_ui.model.cpu import (concurrent_workers, dense, has_avx512, map_shares, release_free_memory, run_parts,
                                 shares)
from llava_ui.model import packed
from llava_ui.model import kernels
from llava_ui.model.kernels import Bf16Matrix, DecodeProgram, Int8Matrix, KernelMatrix
from llava_ui.model.packed import PackedMatrix

BLOCK = 512  # query rows per prefill attention block: bounds the score matrix and skips most masked entries
HEADROOM = 128  # positions a cache grows by when decoding outgrows it (and at most what a prefill reserves ahead)
PREFILL_CHUNK = 256  # prompt positions per pass through the layers (CPU): bounds a long prompt's activations


class KVCache:
    """Keys and values of every layer, [kv_heads * capacity, head_dim] each; positions < length are filled.

    `prefix(n)` shares the buffers read-only: the first write to a shared cache copies them, so a cached prompt
    (llava_ui.engine.caches.PrefixCache) is never changed by the request that reuses it.
    """

    def __init__(self, keys: list, values: list, kv_heads: int, length: int, shared: bool = False):
        self.keys, self.values, self.kv_heads = keys, values, kv_heads
        self.length, self.shared = length, shared
        self.mask = None  # [1, 1, capacity] additive: 0 for filled positions, -inf after (decode attention)
        self._views = {}  # (layer, first kv head, end) → part_views(), made once per set of buffers

    @classmethod
    def empty(cls, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype) -> "KVCache":
        def zeros():
            return paddle.zeros([kv_heads * capacity, head_dim], dtype)

        return cls([zeros() for _ in range(layers)], [zeros() for _ in range(layers)], kv_heads, 0)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[0] // self.kv_heads

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel()) * t.element_size() for t in self.keys + self.values)

    def prefix(self, positions: int) -> "KVCache":
        return KVCache(self.keys, self.values, self.kv_heads, positions, shared=True)

    def writable(self, needed: int) -> "KVCache":
        """This cache, or a copy that is not shared, with room for `needed` positions (+ HEADROOM when it grows).

        A shared cache (a cached prompt prefix) is copied at the size asked for, its filled positions only: a short
        chat that reuses the first tokens of a long cached prompt gets a short cache (attention reads the whole
        buffer every decode step). An unshared cache grows in place one buffer at a time, so growing never holds
        two whole caches."""
        if needed <= self.capacity and not self.shared:
            return self
        old, keep = self.capacity, self.length  # (the property changes as the buffers are replaced)
        capacity = _round_up(needed) if self.shared else _round_up(needed + HEADROOM)

        def copy(buffer):  # each head's filled rows (contiguous), then zeros up to the new capacity
            pad = paddle.zeros([capacity - keep, buffer.shape[1]], buffer.dtype) if capacity > keep else None
            pieces = []
            for head in range(self.kv_heads):
                pieces.append(buffer[head * old:head * old + keep])
                if pad is not None:
                    pieces.append(pad)
            return paddle.concat(pieces)

        if self.shared:
            return KVCache([copy(k) for k in self.keys], [copy(v) for v in self.values], self.kv_heads, self.length)
        self.keys, self.values = list(self.keys), list(self.values)  # prefix views made earlier keep the old lists
        for buffers in (self.keys, self.values):
            for i, buffer in enumerate(buffers):
                buffers[i] = copy(buffer)
        self.mask, self._views = None, {}
        return self

    def part_views(self, layer: int, kv: range) -> tuple:
        """A part's rows of the layer's K and V buffers (kv heads `kv`), as (keys, key heads, values, value heads):
        [heads * capacity, dim] views of their own (a write through a view lands in the buffer, and no two workers
        ever write through the same tensor object) and [heads, capacity, dim] views of those. Made once per set
        of buffers: a decode step would otherwise make these four views again for every part of every layer."""
        key = layer, kv.start, kv.stop
        if key not in self._views:
            capacity, heads = self.capacity, len(kv)
            rows = slice(kv.start * capacity, kv.stop * capacity)
            keys, values = self.keys[layer][rows], self.values[layer][rows]
            self._views[key] = (keys, keys.reshape([heads, capacity, -1]), values,
                                values.reshape([heads, capacity, -1]))
        return self._views[key]

    def layer_pointers(self) -> tuple[list[int], list[int]]:
        """The addresses of every layer's key and value buffers (kernels.DecodeProgram), made once per set of
        buffers."""
        if "pointers" not in self._views:
            self._views["pointers"] = ([k.data_ptr() for k in self.keys], [v.data_ptr() for v in self.values])
        return self._views["pointers"]

    def rows(self, start: int, length: int, heads: int) -> paddle.Tensor:
        """Row of every (kv head < `heads`, position in start..start+length) in a head-major [heads * capacity,
        dim] buffer (a part's own rows of the cache): the scatter_ index, made on the device (no host-to-device
        copy per step)."""
        heads = paddle.arange(heads, dtype="int64").unsqueeze(1) * self.capacity
        return (heads + paddle.arange(start, start + length, dtype="int64").unsqueeze(0)).reshape([-1])

    def decode_mask(self, dtype) -> paddle.Tensor:
        if self.mask is None or self.mask.shape[-1] != self.capacity:
            filled = np.arange(self.capacity) < self.length
            self.mask = paddle.to_tensor(np.where(filled, 0.0, -np.inf)[None, None], dtype=dtype)
        return self.mask


def check_finite(hidden) -> None:
    """A prompt's hidden states must be finite: in fp16 (a GPU without bf16) this model's activations, trained in
    bf16, can outgrow fp16's range, and the answer would be noise."""
    if not bool(paddle.isfinite(hidden).all()):
        raise UserError(f"the model's activations overflowed {str(hidden.dtype).replace('paddle.', '')} on this "
                        "prompt (it was trained in bf16, whose range fp16 lacks): run with --dtype float32")


OVERFLOW_CHECKED = (paddle.float16,)  # the prefill's output is checked in these dtypes (qwen2.check_finite)


def _round_up(n: int, step: int = 64) -> int:
    return -(-n // step) * step


class RotaryTables:
    """cos/sin of every position, computed (float64, then rounded) for ROTARY_POSITIONS at first and at least
    doubled whenever a position outgrows them: a long decode rebuilds them a few times, not once a token. A
    position's values do not depend on the table's size."""

    def __init__(self, head_dim: int, base: float):
        self.inv_freq = 1.0 / (np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
        self.cos = self.sin = None
        self.builds = 0

    def get(self, start: int, length: int, dtype):
        end = start + length
        if self.cos is None or self.cos.shape[0] < end:
            size = ROTARY_POSITIONS if self.cos is None else 2 * self.cos.shape[0]
            positions = np.arange(max(end, size), dtype=np.float32)
            freqs = np.outer(positions, self.inv_freq).astype(np.float32)  # float32 products, as the reference
            angles = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
            self.cos = paddle.to_tensor(np.cos(angles).astype(np.float32), dtype=dtype)
            self.sin = paddle.to_tensor(np.sin(angles).astype(np.float32), dtype=dtype)
            self.builds += 1
        return self.cos[start:end].unsqueeze(1), self.sin[start:end].unsqueeze(1)  # [L, 1, head_dim]


ROTARY_POSITIONS = 4096  # the tables' first size (a 16-frame video's prompt doubles them twice)


def rms_norm(x, weight, eps: float, residual=None):
    """RMSNorm over the last axis of x (+ residual, when given), x of any rank; returns (normed, the sum it
    normed), in one kernel where Paddle's fused one can run: on a GPU, and on a CPU with AVX-512 (its CPU kernel
    uses AVX-512 unchecked: SIGILL on an AVX2-only CPU). Elsewhere the same function in plain kernels, in
    transformers' order (float32 mean of squares, rsqrt, times the weight)."""
    if FUSED_CPU_NORM or not x.place.is_cpu_place():
        # begin_norm_axis: the fused kernel normalises over every axis from this one on
        normed, total = fused_rms_norm(x, weight, None, eps, x.ndim - 1, residual=residual)
        return normed, x if residual is None else total
    total = x if residual is None else x + residual
    wide = total if total.dtype == paddle.float32 else total.astype("float32")  # a no-op cast would copy
    normed = wide * paddle.rsqrt(paddle.mean(paddle.square(wide), axis=-1, keepdim=True) + eps)
    return weight * (normed if x.dtype == paddle.float32 else normed.astype(x.dtype)), total


FUSED_CPU_NORM = has_avx512()


def softmax(scores, in_place: bool = False):
    """Softmax over the last axis in float32 (a no-op cast costs a full copy in Paddle, so only when needed);
    `in_place` overwrites float32 scores that are not needed afterwards."""
    if scores.dtype == paddle.float32:
        return F.softmax_(scores, axis=-1) if in_place else F.softmax(scores, axis=-1)
    return F.softmax(scores, axis=-1, dtype="float32").astype(scores.dtype)


def rotation(head_dim: int, dtype) -> paddle.Tensor:
    """R with x @ R == rotate_half(x) == concat(-x2, x1): one exact matmul instead of slices, a neg and a concat."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return paddle.to_tensor(r, dtype=dtype)


class _Part:
    """A worker's share of a layer: its weights (attributes named in WEIGHTS) stored [in, out], [out, in] once
    transposed, or packed for MKL (project() multiplies any)."""

    WEIGHTS: tuple = ()
    transposed = False
    packed = False

    def transpose(self) -> None:
        """Every weight to the other layout (each a new contiguous copy)."""
        for name in self.WEIGHTS:
            setattr(self, name, paddle.transpose(getattr(self, name), [1, 0]).contiguous())
        self.transposed = not self.transposed

    def pack_for_mkl(self) -> None:
        """Every [in, out] weight to MKL's packed layout (packed.PackedMatrix; the matrix itself is let go)."""
        for name in self.WEIGHTS:
            setattr(self, name, PackedMatrix(getattr(self, name)))
        self.packed = True

    def pack_for_kernels(self, matrix: type) -> None:
        """Every [in, out] weight to a kernel's format (kernels.Bf16Matrix or Int8Matrix; the fp32 matrix is let
        go)."""
        for name in self.WEIGHTS:
            setattr(self, name, matrix(getattr(self, name)))
        self.packed = True


class AttentionPart(_Part):
    """One worker's share of a layer's attention: kv heads `kv` (and their query heads), with q|k|v weights for
    just those heads side by side ([hidden, (q + 2 kv) heads * dim], one matmul) and the o_proj rows they feed."""

    WEIGHTS = ("qkv", "o_rows")

    def __init__(self, kv: range, group: int, dim: int, attn):
        self.kv, self.q_heads, self.kv_heads = kv, len(kv) * group, len(kv)
        q_cols = slice(kv.start * group * dim, kv.stop * group * dim)
        kv_cols = slice(kv.start * dim, kv.stop * dim)
        self.qkv = paddle.concat([attn.q_proj.weight[:, q_cols], attn.k_proj.weight[:, kv_cols],
                                  attn.v_proj.weight[:, kv_cols]], axis=1)
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        self.bias = None if biases[0] is None else paddle.concat(
            [biases[0][q_cols], biases[1][kv_cols], biases[2][kv_cols]])
        self.o_rows = attn.o_proj.weight[q_cols]  # a view: rows of a matrix are contiguous


class MLPPart(_Part):
    """One worker's share of the SwiGLU intermediate: gate|up columns side by side, and the down_proj rows."""

    WEIGHTS = ("gate_up", "down_rows")

    def __init__(self, cols: range, mlp):
        share = slice(cols.start, cols.stop)
        self.gate_up = paddle.concat([mlp.gate_proj.weight[:, share], mlp.up_proj.weight[:, share]], axis=1)
        self.down_rows = mlp.down_proj.weight[share]


def project(x, weight, transposed: bool, bias=None):
    """x [rows, in] times a part's weight, stored [in, out], (transposed) [out, in] or packed for MKL; + bias.

    The layouts suit different work (MKL on one thread per worker, weights read from memory): one row is a
    matrix-vector product, slightly faster over [in, out]; a few rows (a batched decode step) are a small matrix
    product, which MKL's sgemm computes far more slowly over an [in, out] weight than as an [out, in] weight times
    the rows' transpose (bench/batch_steps.py measures both). Packed for MKL (packed.py), a few rows cost about one
    row; the kernels' matrices (oneDNN's packed bf16, int8) read their weight once whatever the row count."""
    if isinstance(weight, KernelMatrix):
        return weight.matmul(x, bias)
    if isinstance(weight, PackedMatrix):
        out = weight.matmul(x)
        return out if bias is None else out + bias
    if not transposed:
        return F.linear(x, weight, bias)
    if SKINNY_ROWS[0] <= x.shape[0] <= SKINNY_ROWS[1]:
        out = paddle.transpose(paddle.matmul(weight, x, transpose_y=True), [1, 0])
    else:
        out = paddle.matmul(x, weight, transpose_y=True)
    return out if bias is None else out + bias


SKINNY_ROWS = (3, 16)  # row counts computed as weight · xᵀ
WEIGHT_LAYOUTS = ("in-out", "out-in", "packed", "bf16", "int8")
KERNEL_LAYOUTS = {"bf16": Bf16Matrix, "int8": Int8Matrix}  # the layouts the CPU kernels multiply by (kernels.py)


class Qwen2Runner:
    """Runs paddlenlp's Qwen2Model weights for inference: forward(embeds [1, L, H], cache, start) → (hidden, cache).

    `pack()` (called once the weights are loaded) regroups every layer's weights into one part per CPU worker,
    tensor-parallel style: a part holds whole heads and a slice of the MLP, so a layer is two hand-offs (attention,
    MLP), each part's matmuls read contiguous weights, and the sums of the parts' o_proj and down_proj products
    are the layer's outputs. On a GPU (or one thread) there is one part: q|k|v and gate|up fused matmuls.
    """

    def __init__(self, qwen2, config: dict, lm_head=None):
        self.qwen2, self.lm_head = qwen2, lm_head
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config["hidden_size"] // self.heads
        self.eps = config["rms_norm_eps"]
        self.rotary = RotaryTables(self.head_dim, config.get("rope_theta", 10000.0))
        self.rotate = None
        self.fused_attention = None  # None: fused attention on a GPU, the blockwise CPU path on the CPU
        self.parts = None  # per layer: ([AttentionPart], [MLPPart]), made by pack()
        self.head = None  # KERNEL_LAYOUTS: the LM head as one kernel matrix per worker's share of the vocabulary
        self.layout = None  # the weights' layout (WEIGHT_LAYOUTS), once packed
        self.attention_kernel = True  # KERNEL_LAYOUTS: decode attention in one kernel call (False: Paddle ops)
        self.embedding = None  # KERNEL_LAYOUTS, tied head: token lookups (Bf16Embedding, Int8Embedding)
        self.whole_step = True  # KERNEL_LAYOUTS: a decode step as one call per worker (kernels.DecodeProgram)
        self._program = None

    def pack(self, layout: str = "in-out") -> None:
        """Regroup the q/k/v and gate/up weights into the workers' parts (the originals are released: the model
        holds each weight once; paddlenlp's own forward is not usable afterwards). `layout` (WEIGHT_LAYOUTS):
        every part's weights as stored ("in-out"), as [out, in] ("out-in"), packed for MKL's sgemm ("packed",
        CPU float32 only), as oneDNN's packed bf16 ("bf16", CPU with bf16 units: every product of the layers and
        the head reads bf16 weights) or as int8 per output channel ("int8", the same CPUs: half the bytes a decode
        step reads); project() says what each suits. The load calls pack_layer() for each layer
        as soon as its weights are in (build_model), then finish_pack()."""
        for i in range(len(self.qwen2.layers)):
            self.pack_layer(i, layout)
        self.finish_pack(layout)

    def pack_layer(self, i: int, layout: str) -> None:
        """Layer i's weights into its parts, in `layout` (see pack); its fp32 matrices are let go at once, so a
        load that packs each layer as it arrives never holds the whole language model in fp32."""
        if layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"weight layout {layout!r}: one of {', '.join(WEIGHT_LAYOUTS)}")
        if self.parts is None:
            self.parts = [None] * len(self.qwen2.layers)
        layer = self.qwen2.layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        attention = [AttentionPart(kv, self.heads // self.kv_heads, self.head_dim, attn) for kv in shares(self.kv_heads)]
        feed = [MLPPart(cols, mlp) for cols in shares(mlp.gate_proj.weight.shape[1])]
        owners = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
        if layout != "in-out":
            for part in attention + feed:
                if layout == "out-in":
                    part.transpose()
                else:
                    part.pack_for_kernels(KERNEL_LAYOUTS[layout]) if layout in KERNEL_LAYOUTS else part.pack_for_mkl()
            owners += [attn.o_proj, mlp.down_proj]  # the parts now hold their rows as copies
        for owner in owners:
            owner._parameters["weight"] = None
            if owner._parameters.get("bias") is not None:
                owner._parameters["bias"] = None
        self.parts[i] = (attention, feed)
        release_free_memory()  # this layer's fp32 pages go back before the next layer's are taken

    def finish_pack(self, layout: str) -> None:
        """After the last pack_layer: the kernels' head (KERNEL_LAYOUTS), MKL's row-count calibration ("packed")."""
        if any(part is None for part in self.parts or [None]):
            raise ValueError("finish_pack before every layer was packed")
        if layout in KERNEL_LAYOUTS:
            self.head = self._kernel_head(KERNEL_LAYOUTS[layout])
        self.layout = layout
        if layout == "packed":  # measured on one layer's matrices, held by every packed matrix of the model
            attention, feed = self.parts[0]
            alone_as = packed.calibrate([getattr(part, name) for part in (attention[0], feed[0])
                                         for name in part.WEIGHTS])
            for attention, feed in self.parts:
                for part in attention + feed:
                    for name in part.WEIGHTS:
                        getattr(part, name).alone_as = alone_as
        release_free_memory()

    def _kernel_head(self, matrix: type) -> list:
        """The LM head's shares of the vocabulary (one per worker) as kernel matrices; its fp32 matrix is let go. A
        tied head is the embedding [vocab, hidden]: token lookups read a bf16 copy of it from then on, or with
        int8 weights the head's own int8 rows (self.embedding)."""
        head = self.lm_head
        weight = head.weight
        if head.transpose_y:
            matrices = [matrix(weight[share.start:share.stop], transposed=True) for share in shares(weight.shape[0])]
            self.embedding = Int8Embedding(matrices) if matrix is Int8Matrix else Bf16Embedding(weight)
            self.qwen2.embed_tokens._parameters["weight"] = None
        else:
            matrices = [matrix(weight[:, share.start:share.stop].contiguous()) for share in shares(weight.shape[1])]
        head._parameters["weight"] = None
        return matrices

    def forward(self, embeds, cache: KVCache | None, start: int, should_stop=None):
        if self.parts is None:
            self.pack()
        length = embeds.shape[1]
        cache = self.reserve(cache, start + length, embeds.dtype)
        fused = self._fused(embeds)
        # a long prompt goes through in chunks (each attends to the cache the earlier ones filled): the same
        # arithmetic, with activations bounded by the chunk instead of the prompt
        chunk = self.chunk(embeds)
        outs = [self._layers(embeds[0, lo:lo + chunk], cache, start + lo, fused, should_stop)
                for lo in range(0, length, chunk)]
        if length > 1:
            cache.mask = None  # rebuilt from the length by the next decode step
        hidden = outs[0] if len(outs) == 1 else paddle.concat(outs, axis=0)
        if length > 1 and hidden.dtype in OVERFLOW_CHECKED:
            check_finite(hidden)
        return hidden.unsqueeze(0), cache  # the last layer's output, through the final norm

    def decode_batch(self, embeds, caches: list, positions: list[int], head=None):
        """One decode step of several sequences at once: embeds [B, hidden], row b at positions[b] over caches[b]
        (each its own length). Every weight matmul takes the B rows together (a step reads each weight once,
        whatever B); RoPE, the cache write and attention run per row. Returns (hidden [B, hidden], caches), or
        with `head` (the final hidden states → logits) (logits [B, vocab], caches): where the whole step runs as
        one call per worker (decode_program), the head's shares are part of it."""
        caches = [self.reserve(cache, position + 1, embeds.dtype) for cache, position in zip(caches, positions)]
        if head is not None and self.decode_program(caches) is not None:
            return self._decode_step(embeds, caches, positions), caches
        steps = [_Step(self, cache, position, 1, embeds.dtype, False) for cache, position in zip(caches, positions)]
        # every row's RoPE at once: each row's tables stacked ([B, q + 2 kv heads, dim] per part shape)
        tables = {key: tuple(paddle.concat([step.shapes[key][t] for step in steps]) for t in (0, 1))
                  for key in steps[0].shapes} if len(steps) > 1 else None
        # the kernel's RoPE rows, one per sequence ([B, dim] each)
        rope = tuple(paddle.stack([step.rope_row[t] for step in steps]) for t in (0, 1)) if steps[0].kernel else None

        def attention(part, x, i):
            qkv = project(x, part.qkv, part.transposed, part.bias)
            if tables is None:
                heads = steps[0].attend(part, qkv, i)
            elif steps[0].kernel:  # every row over its own cache, in one kernel call
                caches = [step.cache.part_views(i, part.kv)[0::2] + (step.cache.capacity, step.start) for step in steps]
                heads = kernels.decode_attention_rows(qkv, *rope, caches, part.q_heads, part.kv_heads)
            else:
                turned = _rotate(qkv, part, *tables[part.q_heads, part.kv_heads], steps[0].rotate, steps[0].dim)
                heads = paddle.concat([step._decode(part, turned[b], i) for b, step in enumerate(steps)])
            return project(heads, part.o_rows, part.transposed)

        x = self.through_layers(embeds, attention)
        for cache, position in zip(caches, positions):
            cache.length = position + 1
        return (x if head is None else head(x)), caches

    def decode_program(self, caches: list) -> DecodeProgram | None:
        """The whole decode step as one call per worker, where it runs: weights held for the kernels, the attention
        kernel on, bf16 caches, as many workers running at once as the parts were made for. Made on first use."""
        if self.layout not in KERNEL_LAYOUTS or not (self.whole_step and self.attention_kernel):
            return None
        if any(cache.keys[0].dtype != paddle.bfloat16 or not cache.keys[0].place.is_cpu_place() for cache in caches):
            return None
        if concurrent_workers() != len(self.parts[0][0]):
            return None
        if self._program is None:
            self._program = DecodeProgram(self.qwen2.layers, self.parts, self.qwen2.norm.weight, self.eps,
                                          self.head_dim, self.head)
        return self._program

    def _decode_step(self, embeds, caches: list, positions: list[int]):
        """embeds [rows, hidden] through decode_program(): returns the logits [rows, vocab]."""
        tables = [self.rotary.get(position, 1, "float32") for position in positions]  # [1, 1, dim] each
        cos, sin = (paddle.concat([table[t].reshape([1, self.head_dim]) for table in tables]) for t in (0, 1))
        logits = self._program.run(embeds, caches, positions, cos, sin)
        for cache, position in zip(caches, positions):
            cache.length = position + 1
        return logits

    def reserve(self, cache: KVCache | None, positions: int, dtype=None) -> KVCache:
        """`cache` (None: a new one), writable and with room for `positions` positions: a caller that knows how
        many it will decode asks for them up front (generate.prefill), as the cache is zero-filled memory."""
        if cache is None:
            dtype = "bfloat16" if self.kv_bf16 else (dtype or self.qwen2.norm.weight.dtype)
            return KVCache.empty(len(self.qwen2.layers), self.kv_heads, self.head_dim, _round_up(positions), dtype)
        return cache.writable(positions)

    @property
    def kv_bf16(self) -> bool:
        """Whether new KV caches hold bf16 (the bf16 kernels' attention reads them: half the bytes a long-context
        step reads), else the activations' dtype."""
        return self.layout in KERNEL_LAYOUTS and self.attention_kernel and self.qwen2.norm.weight.place.is_cpu_place()

    def chunk(self, embeds) -> int:
        """Prompt positions per pass: PREFILL_CHUNK on the CPU; a GPU's fused attention takes the prompt whole."""
        return embeds.shape[1] if self._fused(embeds) else PREFILL_CHUNK

    def _fused(self, embeds) -> bool:
        return self.fused_attention if self.fused_attention is not None else not embeds.place.is_cpu_place()

    def _layers(self, embeds, cache: KVCache, start: int, fused: bool, should_stop=None):
        """embeds [L, hidden] at positions start.. through every layer, filling the cache; returns [L, hidden]."""
        step = _Step(self, cache, start, embeds.shape[0], embeds.dtype, fused)
        x = self.through_layers(embeds, step.attention, should_stop)
        cache.length = start + embeds.shape[0]
        return x

    def through_layers(self, embeds, attention, should_stop=None):
        """The layer loop: embeds [rows, hidden] through every layer and the final norm. `attention(part, x, i)` is
        a part's attention output of layer i ([rows, hidden]; its o_proj product: the layer's is the sum over
        parts), the MLP the parts' own (_mlp); a stop asked for lands between two layers."""
        layers = self.qwen2.layers
        x, residual = rms_norm(embeds, layers[0].input_layernorm.weight, self.eps)
        for i, (layer, (parts, feed)) in enumerate(zip(layers, self.parts)):
            check_stop(should_stop)  # a long chunk is seconds of work on a CPU: a stop lands within a layer
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.qwen2.norm
            outs = run_parts(lambda part: attention(part, x, i), parts)
            x, residual = rms_norm(_total(outs), layer.post_attention_layernorm.weight, self.eps, residual)
            outs = run_parts(lambda part: _mlp(part, x), feed)
            x, residual = rms_norm(_total(outs), following.weight, self.eps, residual)
        return x

    def _rotation(self, dtype):
        if self.rotate is None or self.rotate.dtype != dtype:
            self.rotate = rotation(self.head_dim, dtype)
        return self.rotate


class _Step:
    """What one forward's attention parts share: the cache, RoPE tables, masks."""

    def __init__(self, runner: Qwen2Runner, cache: KVCache, start: int, length: int, dtype, fused: bool):
        dim = runner.head_dim
        fused = fused and length > 1  # a decode step attends over the whole buffer (_decode), on a GPU too
        self.dim, self.cache, self.start, self.length, self.fused = dim, cache, start, length, fused
        self.rotate = runner._rotation(dtype)
        cos, sin = runner.rotary.get(start, length, dtype)  # [L, 1, dim]
        # a decode position over bf16-kernel weights: RoPE, the cache write and attention in one kernel call
        # (a bf16 cache is read by the kernels alone)
        kernel = runner.layout in KERNEL_LAYOUTS and cache.keys[0].place.is_cpu_place() and (
            runner.attention_kernel or cache.keys[0].dtype == paddle.bfloat16)
        self.kernel = kernel and length == 1
        self.flash = kernel and length > 1 and not fused  # a prefill chunk's attention in one kernel call
        if self.kernel:
            self.rope_row = tuple(table.reshape([dim]).contiguous() for table in (cos, sin))
            self.shapes = {}
            return
        # per part shape, tiled once per forward (Paddle's CPU multiply broadcasting over the middle axis is much
        # slower than an elementwise one); q's heads carry the attention scale 1/sqrt(dim), v's heads get cos 1 and
        # sin 0: one rotation gives scaled q, k and v exactly as they go into attention (the fused kernel scales q
        # itself: Paddle rules its flash kernel out whenever a scale is passed)
        scale = 1.0 if fused else dim ** -0.5
        self.shapes = {}  # (q heads, kv heads) of a part → its cos and sin tables and its cache rows
        for part in runner.parts[0][0]:
            key = part.q_heads, part.kv_heads
            if key not in self.shapes:
                self.shapes[key] = tuple(paddle.concat([
                    paddle.tile(table * scale, [1, part.q_heads, 1]), paddle.tile(table, [1, part.kv_heads, 1]),
                    paddle.full([length, part.kv_heads, dim], fill, dtype)], axis=1) for table, fill in ((cos, 1), (sin, 0))
                ) + (cache.rows(start, length, part.kv_heads),)
        self.masks = _block_masks(start, length, dtype) if length > 1 and not fused and not self.flash else None
        self.prefix_mask = _prefix_mask(start, length, cache.capacity, dtype) if fused and start > 0 else None
        if length == 1:
            mask = cache.decode_mask(dtype)
            mask[..., start] = 0.0
            # tiled to each part's score shape [kv heads, group, capacity]: Paddle's CPU add broadcasting over the
            # leading axes took ~240 us a call at 2,880 positions against ~20 us for an elementwise one (and it runs
            # for every part of every layer)
            self.decode_masks = {key: paddle.tile(mask, [key[1], key[0] // key[1], 1]) for key in self.shapes}

    def attention(self, part: AttentionPart, x, layer: int):
        """This part's heads over x [L, hidden]: q|k|v, RoPE, the cache write, attention; returns its o_proj
        product [L, hidden] (the layer's attention output is the sum over parts)."""
        qkv = project(x, part.qkv, part.transposed, part.bias)
        return project(self.attend(part, qkv, layer), part.o_rows, part.transposed)

    def attend(self, part: AttentionPart, qkv, layer: int):
        """From the part's q|k|v [L, (q + 2 kv) heads * dim]: RoPE, the cache write, attention; returns the
        heads' outputs [L, q heads * dim] (before o_proj)."""
        if self.kernel:
            keys, _, values, _ = self.cache.part_views(layer, part.kv)
            return kernels.decode_attention(qkv, *self.rope_row, keys, values, part.q_heads, part.kv_heads,
                                            self.cache.capacity, self.start)
        qkv = self._rotated(part, qkv)
        if self.length == 1:
            return self._decode(part, qkv[0], layer)
        return self._prefill(part, qkv, layer)

    def _rotated(self, part: AttentionPart, qkv):
        """[L, (q + 2 kv) heads * dim] → [L, q + 2 kv heads, dim] with RoPE (q also scaled)."""
        cos, sin, _ = self.shapes[part.q_heads, part.kv_heads]
        return _rotate(qkv, part, cos, sin, self.rotate, self.dim)

    def _store(self, part: AttentionPart, qkv, layer: int):
        """Write the new keys and values into the cache; returns (per head [q + 2 kv heads, L, dim], the part's
        key heads [kv heads, capacity, dim], its value heads)."""
        q_heads, kv_heads, dim = part.q_heads, part.kv_heads, self.dim
        per_head = paddle.transpose(qkv, [1, 0, 2]).contiguous()
        rows = self.shapes[q_heads, kv_heads][2]
        keys, key_heads, values, value_heads = self.cache.part_views(layer, part.kv)
        paddle.scatter_(keys, rows, per_head[q_heads:q_heads + kv_heads].reshape([-1, dim]), overwrite=True)
        paddle.scatter_(values, rows, per_head[q_heads + kv_heads:].reshape([-1, dim]), overwrite=True)
        return per_head, key_heads, value_heads

    def _decode(self, part: AttentionPart, qkv, layer: int):
        """One new position (qkv [q + 2 kv heads, dim]): attend over the whole buffer at once; the mask hides
        positions not yet filled."""
        q_heads, kv_heads, dim = part.q_heads, part.kv_heads, self.dim
        keys, key_heads, values, value_heads = self.cache.part_views(layer, part.kv)
        rows = self.shapes[part.q_heads, kv_heads][2]
        q, k, v = paddle.split(qkv, [q_heads, kv_heads, kv_heads])
        paddle.scatter_(keys, rows, k, overwrite=True)
        paddle.scatter_(values, rows, v, overwrite=True)
        scores = paddle.matmul(q.reshape([kv_heads, q_heads // kv_heads, dim]), key_heads, transpose_y=True)
        scores = scores.add_(self.decode_masks[q_heads, kv_heads])
        return paddle.matmul(softmax(scores, in_place=True), value_heads).reshape([1, q_heads * dim])

    def _prefill(self, part: AttentionPart, qkv, layer: int):
        """Many new positions: per head and block of query rows, attend over the contiguous prefix it may see
        (CPU), one flash-style kernel call over the bf16 cache (bf16 kernels), or one fused attention kernel
        (GPU)."""
        q_heads, kv_heads = part.q_heads, part.kv_heads
        if self.flash:  # the kernel writes the chunk's keys and values into the cache itself
            keys, _, values, _ = self.cache.part_views(layer, part.kv)
            return kernels.prefill_attention(paddle.transpose(qkv, [1, 0, 2]).contiguous(), keys, values, kv_heads,
                                             self.cache.capacity, self.start)
        per_head, keys, values = self._store(part, qkv, layer)
        if self.fused:
            return self._fused(part, qkv, keys, values)
        q = per_head[:q_heads]
        group = q_heads // kv_heads
        blocks = []
        for (lo, hi), mask in zip(_blocks(self.length), self.masks):
            visible = self.start + hi
            outs = []
            for h in range(q_heads):
                scores = paddle.matmul(q[h, lo:hi], keys[h // group, :visible], transpose_y=True).add_(mask)
                outs.append(paddle.matmul(softmax(scores, in_place=True), values[h // group, :visible]))
            blocks.append(paddle.concat(outs, axis=-1))
        return paddle.concat(blocks, axis=0) if len(blocks) > 1 else blocks[0]

    def _fused(self, part: AttentionPart, qkv, keys, values):
        """Paddle's scaled_dot_product_attention ([1, L, heads, dim] layout), given no scale (q arrives unscaled)
        so that Paddle may pick its flash kernel (bf16 / fp16, compute capability 8.0+) or its memory-efficient one
        (5.0+): causal over the new positions, or over the cached prefix + them with the step's prefix_mask.

        Neither kernel holds a [heads, L, L] score matrix. At 11,680 new positions (16 video frames) a layer's q, k,
        v and output are 11,680 x 1,024 x 2 bytes = 24 MB each in bf16 / fp16; the prefix mask of a later turn is
        [new positions, keys] in the model dtype (at most 11,680^2 x 2 bytes = 273 MB, once per step). The plain
        path Paddle falls back to otherwise (a scale given, or a mask whose key length is not a multiple of 8)
        holds the scores and their softmax, 16 x 11,680^2 x 2 bytes = 4.4 GB each."""
        q_heads, kv_heads, dim, length = part.q_heads, part.kv_heads, self.dim, self.length
        q = qkv[:, :q_heads].unsqueeze(0)
        mask = self.prefix_mask
        if mask is None:
            k, v = qkv[:, q_heads:q_heads + kv_heads].unsqueeze(0), qkv[:, q_heads + kv_heads:].unsqueeze(0)
        else:
            def gather(heads):  # [1, keys, kv_heads, dim]: the mask hides the padding past the visible positions
                return heads[:, :mask.shape[-1]].transpose([1, 0, 2]).unsqueeze(0)

            k, v = gather(keys), gather(values)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, training=False)
        return out.reshape([length, q_heads * dim])


def _rotate(qkv, part: AttentionPart, cos, sin, rotate, dim: int):
    """RoPE of [rows, (q + 2 kv) heads * dim] with its rows' tables [rows, q + 2 kv heads, dim] → [rows, q + 2 kv
    heads, dim]."""
    qkv = qkv.reshape([qkv.shape[0], part.q_heads + 2 * part.kv_heads, dim])
    turned = paddle.matmul(qkv, rotate).multiply_(sin)
    return qkv.multiply_(cos).add_(turned)  # in place: a long prompt keeps fewer copies alive


class Bf16Embedding:
    """Token embeddings looked up in a bf16 table [vocab, hidden] and handed on in fp32 (the activations' dtype):
    the tied head's weights held once more at half the bytes, where the fp32 table would be held only for lookups."""

    def __init__(self, weight: paddle.Tensor):
        self.table = weight.astype("bfloat16")
        self.shape = list(weight.shape)

    def __call__(self, ids: paddle.Tensor) -> paddle.Tensor:
        return F.embedding(ids, self.table).astype("float32")


class Int8Embedding:
    """Token embeddings looked up in a tied head's int8 rows (its shares of the vocabulary, Int8Matrix), each row
    times its scale, handed on in fp32: the inputs read the same int8 weights the head's products use."""

    def __init__(self, shares: list):
        self.shares, self.starts = shares, np.cumsum([0] + [m.outputs for m in shares])
        self.shape = [int(self.starts[-1]), shares[0].inputs]

    def __call__(self, ids: paddle.Tensor) -> paddle.Tensor:
        wanted = ids.reshape([-1]).numpy()
        share_of = np.searchsorted(self.starts, wanted, side="right") - 1
        pieces, order = [], []
        for share, (matrix, start) in enumerate(zip(self.shares, self.starts)):
            at = np.nonzero(share_of == share)[0]
            if at.size:
                rows = paddle.to_tensor(wanted[at] - start)
                pieces.append(paddle.gather(matrix.values, rows).astype("float32")
                              * paddle.gather(matrix.scales, rows).unsqueeze(1))
                order.append(at)
        out = pieces[0] if len(pieces) == 1 else paddle.gather(
            paddle.concat(pieces), paddle.to_tensor(np.argsort(np.concatenate(order))))
        return out.reshape(list(ids.shape) + [self.shape[1]])


def _total(parts: list):
    return parts[0] if len(parts) == 1 else paddle.add_n(parts)


def head_logits(lm_head, hidden, bf16_head: list | None = None):
    """The LM head over [positions, hidden]. A decode step's logits (one position, or one per sequence of a batched
    step: each step reads the whole head, the largest matrix) are computed with the vocabulary rows shared among
    the workers: MKL does not thread a matrix-vector product well, one worker per core reads memory faster (as
    the layers' parts do); the tied head is stored [vocab, hidden]. A few rows (a batched step) go through in
    blocks of HEAD_BLOCK vocabulary rows on the CPU, each block · hiddenᵀ, which MKL computes faster than one
    product per worker (bench/batch_steps.py)."""
    if bf16_head is not None:  # (Qwen2Runner.head) oneDNN's bf16 matmul takes any row count at one weight read
        hidden = dense(hidden)  # once, here: `hidden[:, -1]` is strided, and every share reads it
        parts = run_parts(lambda matrix: matrix.matmul(hidden), bf16_head)
        return paddle.concat(parts, axis=-1) if len(parts) > 1 else parts[0]
    rows = hidden.shape[0]
    if rows > SKINNY_ROWS[1] or not lm_head.transpose_y:  # untied: stored [hidden, vocab], as it is
        return lm_head(hidden)
    weight = lm_head.weight  # tied: the embedding, [vocab, hidden]
    if rows == 1 or not hidden.place.is_cpu_place():
        parts = map_shares(lambda share: project(hidden, weight[share.start:share.stop], True), weight.shape[0])
        return paddle.concat(parts, axis=-1) if len(parts) > 1 else parts[0]

    def blocks(share):  # [share, rows]
        return paddle.concat([paddle.matmul(weight[lo:min(lo + HEAD_BLOCK, share.stop)], hidden, transpose_y=True)
                              for lo in range(share.start, share.stop, HEAD_BLOCK)])

    return paddle.transpose(paddle.concat(map_shares(blocks, weight.shape[0])), [1, 0])


HEAD_BLOCK = 1024  # vocabulary rows per product when the head takes a few rows


def _mlp(part: MLPPart, x):
    """A part's share of the SwiGLU MLP: its down_proj product [L, hidden] (the MLP's output is the sum over
    parts)."""
    return project(F.swiglu(project(x, part.gate_up, part.transposed)), part.down_rows, part.transposed)


def _blocks(length: int):
    return [(lo, min(lo + BLOCK, length)) for lo in range(0, length, BLOCK)]


def _prefix_mask(start: int, length: int, capacity: int, dtype) -> paddle.Tensor:
    """[1, 1, length, keys] additive mask of positions start.. over the cache (0 where visible, -inf after), made
    on the device in the model dtype; keys is the visible count rounded up to a multiple of 8 (Paddle's
    memory-efficient kernel takes no other mask length) and at most the cache's capacity."""
    keys = min(_round_up(start + length, 8), capacity)
    rows = paddle.arange(start, start + length, dtype="int64").unsqueeze(1)
    visible = paddle.arange(keys, dtype="int64").unsqueeze(0) <= rows
    mask = paddle.where(visible, paddle.zeros([1], dtype), paddle.full([1], float("-inf"), dtype))
    return mask.reshape([1, 1, length, keys])


def _block_masks(start: int, length: int, dtype) -> list:
    """Additive causal mask of each query block over the positions it may see: 0, or -inf above the diagonal."""
    masks = []
    for lo, hi in _blocks(length):
        rows = np.arange(start + lo, start + hi)[:, None]
        cols = np.arange(start + hi)[None, :]
        masks.append(paddle.to_tensor(np.where(cols <= rows, 0.0, -np.inf), dtype=dtype))
    return masks
