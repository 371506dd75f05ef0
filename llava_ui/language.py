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

BLOCK = 512  # query rows per prefill attention block: bounds the score matrix and skips most masked entries
HEADROOM = 128  # positions a cache allocates beyond what is asked, so decoding grows it rarely


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
        """Buffer row of every (kv head, position) in start..start+length, head-major: the scatter_ index."""
        heads = np.arange(self.kv_heads)[:, None] * self.capacity
        return paddle.to_tensor((heads + np.arange(start, start + length)[None, :]).reshape(-1), dtype="int64")

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

    def forward(self, embeds, cache: KVCache | None, start: int):
        length = embeds.shape[1]
        dtype = embeds.dtype
        if cache is None:
            cache = KVCache.empty(len(self.qwen2.layers), self.kv_heads, self.head_dim,
                                  _round_up(start + length + HEADROOM), dtype)
        cache = cache.writable(start + length)
        rows = cache.rows(start, length)
        cos, sin = self.rotary.get(start, length, dtype)
        masks = _block_masks(start, length, dtype) if length > 1 else None
        if length == 1:
            mask = cache.decode_mask(dtype)
            mask[..., start] = 0.0
        layers = self.qwen2.layers
        rotate = self._rotation(dtype)
        x, residual = rms_norm(embeds[0], layers[0].input_layernorm.weight, self.eps)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias)
            k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias)
            v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias)
            qk = paddle.concat([q, k], axis=-1).reshape([length, self.heads + self.kv_heads, self.head_dim])
            qk = qk * cos + paddle.matmul(qk, rotate) * sin
            if length == 1:
                out = self._decode_attention(qk[0], v, cache, i, rows, mask)
            else:
                out = self._prefill_attention(qk, v, cache, i, rows, start, masks)
            x, residual = rms_norm(F.linear(out, attn.o_proj.weight), layer.post_attention_layernorm.weight,
                                   self.eps, residual)
            mlp = layer.mlp
            gated = F.swiglu(F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight))
            following = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.qwen2.norm
            x, residual = rms_norm(F.linear(gated, mlp.down_proj.weight), following.weight, self.eps, residual)
        cache.length = start + length
        if length > 1:
            cache.mask = None  # rebuilt from the length by the next decode step
        return x.unsqueeze(0), cache  # the last layer's output, through the final norm

    def _rotation(self, dtype):
        if self.rotate is None or self.rotate.dtype != dtype:
            self.rotate = rotation(self.head_dim, dtype)
        return self.rotate

    def _decode_attention(self, qk, v, cache: KVCache, layer: int, rows, mask):
        """One new position: attend over the whole buffer at once; the mask hides positions not yet filled."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        paddle.scatter_(cache.keys[layer], rows, qk[heads:], overwrite=True)
        paddle.scatter_(cache.values[layer], rows, v.reshape([kv_heads, dim]), overwrite=True)
        q = qk[:heads].reshape([kv_heads, heads // kv_heads, dim]) * (dim ** -0.5)
        keys = cache.keys[layer].reshape([kv_heads, -1, dim])
        values = cache.values[layer].reshape([kv_heads, -1, dim])
        scores = paddle.matmul(q, keys, transpose_y=True) + mask
        probs = softmax(scores)
        return paddle.matmul(probs, values).reshape([1, heads * dim])

    def _prefill_attention(self, qk, v, cache: KVCache, layer: int, rows, start: int, masks):
        """Many new positions: per head and block of query rows, attend over the contiguous prefix it may see."""
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        length = qk.shape[0]
        qkv = paddle.concat([qk, v.reshape([length, kv_heads, dim])], axis=1)
        per_head = paddle.transpose(qkv, [1, 0, 2]).contiguous()  # [heads + 2 kv_heads, L, dim]
        q = per_head[:heads] * (dim ** -0.5)
        paddle.scatter_(cache.keys[layer], rows, per_head[heads:heads + kv_heads].reshape([-1, dim]), overwrite=True)
        paddle.scatter_(cache.values[layer], rows, per_head[heads + kv_heads:].reshape([-1, dim]), overwrite=True)
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
