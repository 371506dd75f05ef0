"""Qwen2 inference forward over paddlenlp's Qwen2 weights: the language model's one layer loop.

paddlenlp's `Qwen2ForCausalLM` is built and loaded as usual; its forward rebuilds an [L, L] mask and concatenates
the whole KV cache on every step, and Paddle's CPU kernels copy strided views element by element. This forward
computes the same function while every tensor a matmul reads is contiguous. Once loaded, each layer's weights are
regrouped into one part per CPU worker (linear.py: whole heads with their q|k|v columns side by side and their
o_proj rows; a slice of the MLP with gate|up side by side and the down_proj rows) in the form the options chose
(fp32, or bf16 / int8 for the CPU kernels), so a layer is two hand-offs and both cores stream weights at once.
`through_layers` is the one loop over the layers: prefill chunks (attention.py, over the KV cache of kv_cache.py)
and batched decode steps go through it; where the CPU kernels hold the weights, a decode step runs as the same loop
compiled in the kernels' library, one call per worker (kernels.DecodeProgram).
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
from llava_ui.model.attention import AttentionStep, RotaryTables, rotate, rotation
from llava_ui.model.kernels import DecodeProgram, Int8Matrix
from llava_ui.model.kv_cache import KVCache, round_up
from llava_ui.model.linear import KERNEL_LAYOUTS, SKINNY_ROWS, WEIGHT_LAYOUTS, AttentionPart, MLPPart, mlp, project

PREFILL_CHUNK = 256  # prompt positions per pass through the layers (CPU): bounds a long prompt's activations


def check_finite(hidden) -> None:
    """A prompt's hidden states must be finite: in fp16 (a GPU without bf16) this model's activations, trained in
    bf16, can outgrow fp16's range, and the answer would be noise."""
    if not bool(paddle.isfinite(hidden).all()):
        raise UserError(f"the model's activations overflowed {str(hidden.dtype).replace('paddle.', '')} on this "
                        "prompt (it was trained in bf16, whose range fp16 lacks): run with --dtype float32")


OVERFLOW_CHECKED = (paddle.float16,)  # the prefill's output is checked in these dtypes (qwen2.check_finite)


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
        steps = [AttentionStep(self, cache, position, 1, embeds.dtype, False) for cache, position in zip(caches, positions)]
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
                turned = rotate(qkv, part, *tables[part.q_heads, part.kv_heads], steps[0].rotate, steps[0].dim)
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
        many it will decode asks for them up front (steps.prefill), as the cache is zero-filled memory."""
        if cache is None:
            dtype = "bfloat16" if self.kv_bf16 else (dtype or self.qwen2.norm.weight.dtype)
            return KVCache.empty(len(self.qwen2.layers), self.kv_heads, self.head_dim, round_up(positions), dtype)
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
        step = AttentionStep(self, cache, start, embeds.shape[0], embeds.dtype, fused)
        x = self.through_layers(embeds, step.attention, should_stop)
        cache.length = start + embeds.shape[0]
        return x

    def through_layers(self, embeds, attention, should_stop=None):
        """The layer loop: embeds [rows, hidden] through every layer and the final norm. `attention(part, x, i)` is
        a part's attention output of layer i ([rows, hidden]; its o_proj product: the layer's is the sum over
        parts), the MLP the parts' own (linear.mlp); a stop asked for lands between two layers."""
        layers = self.qwen2.layers
        x, residual = rms_norm(embeds, layers[0].input_layernorm.weight, self.eps)
        for i, (layer, (parts, feed)) in enumerate(zip(layers, self.parts)):
            check_stop(should_stop)  # a long chunk is seconds of work on a CPU: a stop lands within a layer
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.qwen2.norm
            outs = run_parts(lambda part: attention(part, x, i), parts)
            x, residual = rms_norm(_total(outs), layer.post_attention_layernorm.weight, self.eps, residual)
            outs = run_parts(lambda part: mlp(part, x), feed)
            x, residual = rms_norm(_total(outs), following.weight, self.eps, residual)
        return x

    def _rotation(self, dtype):
        if self.rotate is None or self.rotate.dtype != dtype:
            self.rotate = rotation(self.head_dim, dtype)
        return self.rotate


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


