"""Attention of the language model's layer loop: RoPE, the cache write and softmax attention of one worker's heads,
for a prefill chunk (block by block over the contiguous per-head prefix, a flash-style kernel over the bf16 cache, or
Paddle's fused kernel on a GPU) or a decode position (one kernel call, or the whole buffer under one mask)."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F

from llava_ui.model import kernels
from llava_ui.model.kv_cache import KVCache, round_up
from llava_ui.model.linear import KERNEL_LAYOUTS, AttentionPart, project

BLOCK = 512  # query rows per prefill attention block: bounds the score matrix and skips most masked entries


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


class AttentionStep:
    """What one forward's attention parts share: the cache, RoPE tables, masks."""

    def __init__(self, runner, cache: KVCache, start: int, length: int, dtype, fused: bool):
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
            # leading axes is many times slower than an elementwise one (and it runs for every part of every layer)
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
        return rotate(qkv, part, cos, sin, self.rotate, self.dim)

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


def rotate(qkv, part: AttentionPart, cos, sin, rotate, dim: int):
    """RoPE of [rows, (q + 2 kv) heads * dim] with its rows' tables [rows, q + 2 kv heads, dim] → [rows, q + 2 kv
    heads, dim]."""
    qkv = qkv.reshape([qkv.shape[0], part.q_heads + 2 * part.kv_heads, dim])
    turned = paddle.matmul(qkv, rotate).multiply_(sin)
    return qkv.multiply_(cos).add_(turned)  # in place: a long prompt keeps fewer copies alive


def _blocks(length: int):
    return [(lo, min(lo + BLOCK, length)) for lo in range(0, length, BLOCK)]


def _prefix_mask(start: int, length: int, capacity: int, dtype) -> paddle.Tensor:
    """[1, 1, length, keys] additive mask of positions start.. over the cache (0 where visible, -inf after), made
    on the device in the model dtype; keys is the visible count rounded up to a multiple of 8 (Paddle's
    memory-efficient kernel takes no other mask length) and at most the cache's capacity."""
    keys = min(round_up(start + length, 8), capacity)
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
