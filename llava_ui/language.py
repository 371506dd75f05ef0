"""Qwen2 inference forward over paddlenlp's Qwen2 weights: a preallocated KV cache and block-causal attention.

paddlenlp's `Qwen2ForCausalLM` holds the weights (and stays usable as it is); its forward rebuilds an [L, L] mask
and concatenates the whole KV cache on every step, and Paddle's CPU kernels copy strided views element by
element. This forward computes the same function while every tensor a matmul reads is contiguous: K and V live per
kv-head as rows of [kv_heads * capacity, head_dim] buffers written in place with `scatter_`, a prefill attends
block by block over contiguous per-head prefixes (skipping the masked half), and a decode step attends over the
whole buffer with one additive mask.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.incubate.nn.functional import fused_rms_norm

from .parallel import map_shares
from .runtime import release_free_memory

BLOCK = 512  # query rows per prefill attention block: bounds the score matrix and skips most masked entries
HEADROOM = 128  # positions a cache allocates beyond what is asked, so decoding grows it rarely
MLP_ROWS = 1024  # prompt rows per MLP pass: bounds the [rows, intermediate] activations of a long prompt


class KVCache:
    """Keys and values of every layer, [kv_heads * capacity, head_dim] each; positions < length are filled.

    `prefix(n)` shares the buffers read-only: the first write to a shared cache copies them, so a cached prompt
    (llava_ui.caches.PrefixCache) is never changed by the request that reuses it.
    """

    def __init__(self, keys: list, values: list, kv_heads: int, length: int, shared: bool = False):
        self.keys, self.values, self.kv_heads = keys, values, kv_heads
        self.length, self.shared = length, shared
        self.mask = None  # [1, 1, capacity] additive: 0 for filled positions, -inf after (decode attention)

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
        """This cache, or a copy that is not shared and has room for `needed` positions."""
        if needed <= self.capacity and not self.shared:
            return self
        capacity = self.capacity if needed <= self.capacity else _round_up(needed + HEADROOM)

        def copy(buffer):
            if capacity == self.capacity:
                return buffer.clone()
            rows = buffer.reshape([self.kv_heads, self.capacity, -1])
            extra = paddle.zeros([self.kv_heads, capacity - self.capacity, rows.shape[-1]], rows.dtype)
            return paddle.concat([rows, extra], axis=1).reshape([self.kv_heads * capacity, -1])

        return KVCache([copy(k) for k in self.keys], [copy(v) for v in self.values], self.kv_heads, self.length)

    def rows(self, start: int, length: int) -> paddle.Tensor:
        """Buffer row of every (kv head, position) in start..start+length, head-major: the scatter_ index
        (made on the device: no host-to-device copy per step)."""
        heads = paddle.arange(self.kv_heads, dtype="int64").unsqueeze(1) * self.capacity
        return (heads + paddle.arange(start, start + length, dtype="int64").unsqueeze(0)).reshape([-1])

    def decode_mask(self, dtype) -> paddle.Tensor:
        if self.mask is None or self.mask.shape[-1] != self.capacity:
            filled = np.arange(self.capacity) < self.length
            self.mask = paddle.to_tensor(np.where(filled, 0.0, -np.inf)[None, None], dtype=dtype)
        return self.mask


def _round_up(n: int, step: int = 64) -> int:
    return -(-n // step) * step


class RotaryTables:
    """cos/sin of every position, computed once (float64, then rounded) and grown on demand."""

    def __init__(self, head_dim: int, base: float):
        self.inv_freq = 1.0 / (np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
        self.cos = self.sin = None

    def get(self, start: int, length: int, dtype):
        end = start + length
        if self.cos is None or self.cos.shape[0] < end:
            positions = np.arange(max(end, 4096), dtype=np.float32)
            freqs = np.outer(positions, self.inv_freq).astype(np.float32)  # float32 products, as the reference
            angles = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
            self.cos = paddle.to_tensor(np.cos(angles).astype(np.float32), dtype=dtype)
            self.sin = paddle.to_tensor(np.sin(angles).astype(np.float32), dtype=dtype)
        return self.cos[start:end].unsqueeze(1), self.sin[start:end].unsqueeze(1)  # [L, 1, head_dim]


def rms_norm(x, weight, eps: float, residual=None):
    """RMSNorm of x (+ residual, when given); returns (normed, the sum it normed) in one kernel."""
    normed, total = fused_rms_norm(x, weight, None, eps, 1, residual=residual)
    return normed, x if residual is None else total


def softmax(scores):
    """Softmax over the last axis in float32 (a no-op cast costs a full copy in Paddle, so only when needed)."""
    if scores.dtype == paddle.float32:
        return F.softmax(scores, axis=-1)
    return F.softmax(scores, axis=-1, dtype="float32").astype(scores.dtype)


def rotation(head_dim: int, dtype) -> paddle.Tensor:
    """R with x @ R == rotate_half(x) == concat(-x2, x1): one exact matmul instead of slices, a neg and a concat."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return paddle.to_tensor(r, dtype=dtype)


class Qwen2Runner:
    """Runs paddlenlp's Qwen2Model weights for inference: forward(embeds [1, L, H], cache, start) → (hidden, cache)."""

    def __init__(self, qwen2, config: dict):
        self.qwen2 = qwen2
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config["hidden_size"] // self.heads
        self.eps = config["rms_norm_eps"]
        self.rotary = RotaryTables(self.head_dim, config.get("rope_theta", 10000.0))
        self.rotate = None
        self.fused_attention = None  # None: fused attention on a GPU, the blockwise CPU path on the CPU

    def forward(self, embeds, cache: KVCache | None, start: int):
        length = embeds.shape[1]
        dtype = embeds.dtype
        if cache is None:
            cache = KVCache.empty(len(self.qwen2.layers), self.kv_heads, self.head_dim,
                                  _round_up(start + length + HEADROOM), dtype)
        cache = cache.writable(start + length)
        rows = cache.rows(start, length)
        # one [L, q+k heads, dim] table per forward: Paddle's CPU multiply broadcasting over the middle axis is ~4x
        # slower than an elementwise one, and the 24 layers share the table
        cos, sin = (paddle.tile(t, [1, self.heads + self.kv_heads, 1]) for t in self.rotary.get(start, length, dtype))
        fused = self.fused_attention if self.fused_attention is not None else not embeds.place.is_cpu_place()
        masks = _block_masks(start, length, dtype) if length > 1 and not fused else None
        if length == 1:
            mask = cache.decode_mask(dtype)
            mask[..., start] = 0.0
        layers = self.qwen2.layers
        rotate = self._rotation(dtype)
        x, residual = rms_norm(embeds[0], layers[0].input_layernorm.weight, self.eps)
        for i, layer in enumerate(layers):
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.qwen2.norm
            attn = layer.self_attn
            qkv = self._rotated(*[F.linear(x, p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)],
                                cos, sin, rotate)
            if length == 1:
                out = self._decode_attention(qkv, cache, i, rows, mask)
            else:
                out = self._prefill_attention(qkv, cache, i, rows, start, masks, fused)
            del qkv
            x, residual = rms_norm(F.linear(out, attn.o_proj.weight), layer.post_attention_layernorm.weight, self.eps,
                                   residual)
            x, residual = rms_norm(_mlp(layer.mlp, x), following.weight, self.eps, residual)
        cache.length = start + length
        if length > 1:
            cache.mask = None  # rebuilt from the length by the next decode step
            release_free_memory()
        return x.unsqueeze(0), cache  # the last layer's output, through the final norm

    def _rotated(self, q, k, v, cos, sin, rotate):
        """[L, heads + 2 kv_heads, dim]: q and k with RoPE applied, then v."""
        length = q.shape[0]
        qk = paddle.concat([q, k], axis=-1).reshape([length, self.heads + self.kv_heads, self.head_dim])
        turned = paddle.matmul(qk, rotate).multiply_(sin)
        qk = qk.multiply_(cos).add_(turned)  # in place: a long prompt keeps fewer copies alive
        return paddle.concat([qk, v.reshape([length, self.kv_heads, self.head_dim])], axis=1)

    def _rotation(self, dtype):
        if self.rotate is None or self.rotate.dtype != dtype:
            self.rotate = rotation(self.head_dim, dtype)
        return self.rotate

    def _decode_attention(self, qkv, cache: KVCache, layer: int, rows, mask):
        """One new position: attend over the whole buffer at once; the mask hides positions not yet filled."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qkv = qkv[0]
        paddle.scatter_(cache.keys[layer], rows, qkv[heads:heads + kv_heads], overwrite=True)
        paddle.scatter_(cache.values[layer], rows, qkv[heads + kv_heads:], overwrite=True)
        q = qkv[:heads].reshape([kv_heads, heads // kv_heads, dim]) * (dim ** -0.5)
        keys = cache.keys[layer].reshape([kv_heads, -1, dim])
        values = cache.values[layer].reshape([kv_heads, -1, dim])
        scores = paddle.matmul(q, keys, transpose_y=True) + mask
        probs = softmax(scores)
        return paddle.matmul(probs, values).reshape([1, heads * dim])

    def _prefill_attention(self, qkv, cache: KVCache, layer: int, rows, start: int, masks, fused: bool):
        """Many new positions: per head and block of query rows, attend over the contiguous prefix it may see
        (CPU), or one fused attention kernel (GPU)."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        length = qkv.shape[0]
        per_head = paddle.transpose(qkv, [1, 0, 2]).contiguous()  # [heads + 2 kv_heads, L, dim]
        paddle.scatter_(cache.keys[layer], rows, per_head[heads:heads + kv_heads].reshape([-1, dim]), overwrite=True)
        paddle.scatter_(cache.values[layer], rows, per_head[heads + kv_heads:].reshape([-1, dim]), overwrite=True)
        if fused:
            return self._fused_attention(qkv, cache, layer, start)
        q = per_head[:heads] * (dim ** -0.5)
        keys = cache.keys[layer].reshape([kv_heads, -1, dim])
        values = cache.values[layer].reshape([kv_heads, -1, dim])
        group = heads // kv_heads

        def attend(share):  # one worker's heads, every query block: [L, len(share) * dim]
            blocks = []
            for (lo, hi), mask in zip(_blocks(length), masks):
                visible = start + hi
                outs = []
                for h in share:
                    kv = h // group
                    scores = paddle.matmul(q[h, lo:hi], keys[kv, :visible], transpose_y=True) + mask
                    outs.append(paddle.matmul(softmax(scores), values[kv, :visible]))
                blocks.append(paddle.concat(outs, axis=-1))
            return paddle.concat(blocks, axis=0) if len(blocks) > 1 else blocks[0]

        parts = map_shares(attend, heads)
        return paddle.concat(parts, axis=-1) if len(parts) > 1 else parts[0]


    def _fused_attention(self, qkv, cache: KVCache, layer: int, start: int):
        """Paddle's scaled_dot_product_attention ([1, L, heads, dim] layout; flash attention for bf16/fp16 on a
        GPU that has it): causal over the new positions, or over the cached prefix + them with an explicit mask."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        length = qkv.shape[0]
        q = qkv[:, :heads].unsqueeze(0)
        if start == 0:
            k, v = qkv[:, heads:heads + kv_heads].unsqueeze(0), qkv[:, heads + kv_heads:].unsqueeze(0)
            mask = None
        else:
            visible = start + length

            def gather(buffer):  # [1, visible, kv_heads, dim]
                return buffer.reshape([kv_heads, -1, dim])[:, :visible].transpose([1, 0, 2]).unsqueeze(0)

            k, v = gather(cache.keys[layer]), gather(cache.values[layer])
            causal = np.arange(visible)[None, :] <= np.arange(start, visible)[:, None]
            mask = paddle.to_tensor(np.where(causal, 0.0, -np.inf)[None, None], dtype=q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0, training=False,
                                             scale=dim ** -0.5)
        return out.reshape([length, heads * dim])


def head_logits(lm_head, hidden):
    """The LM head over [positions, hidden]. One position's logits (each decode step reads the 622 MB head) are
    computed with the vocabulary rows shared among the workers: MKL's own threads read a matrix-vector product
    at ~18 GB/s here, one worker per core at ~33 GB/s. (For the 4-50 MB layer matrices the hand-off costs what
    it gains, so they stay with MKL.)"""
    if hidden.shape[0] != 1 or not lm_head.transpose_y:  # an untied head is stored [hidden, vocab]: as it is
        return lm_head(hidden)
    parts = map_shares(lambda rows: paddle.matmul(hidden, lm_head.weight[rows.start:rows.stop], transpose_y=True),
                       lm_head.weight.shape[0])  # tied: the embedding, [vocab, hidden]
    return paddle.concat(parts, axis=-1) if len(parts) > 1 else parts[0]


def _mlp(mlp, x):
    """SwiGLU MLP, at most MLP_ROWS rows at a time: a long prompt's [L, intermediate] tensors stay small."""
    if x.shape[0] > MLP_ROWS:
        return paddle.concat([_mlp(mlp, x[lo:lo + MLP_ROWS]) for lo in range(0, x.shape[0], MLP_ROWS)], axis=0)
    if x.shape[0] == 1:  # decode: gate and up read side by side, one matrix per core
        gate, up = [y for part in map_shares(lambda share: [F.linear(x, (mlp.gate_proj, mlp.up_proj)[i].weight)
                                                            for i in share], 2) for y in part]
    else:
        gate, up = F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight)
    return F.linear(F.swiglu(gate, up), mlp.down_proj.weight)


def _blocks(length: int):
    return [(lo, min(lo + BLOCK, length)) for lo in range(0, length, BLOCK)]


def _block_masks(start: int, length: int, dtype) -> list:
    """Additive causal mask of each query block over the positions it may see: 0, or -inf above the diagonal."""
    masks = []
    for lo, hi in _blocks(length):
        rows = np.arange(start + lo, start + hi)[:, None]
        cols = np.arange(start + hi)[None, :]
        masks.append(paddle.to_tensor(np.where(cols <= rows, 0.0, -np.inf), dtype=dtype))
    return masks
