"""Where the model looked: for each generated token, the attention weights of the query that produced it (for the
first token, the prompt's last position) over each image's visual positions, per layer, averaged over heads.

Computed after the answer, off the fast path, by reading prompt + answer once more: one ordinary prefill fills a
KV cache with every position's keys and values, then only the producing queries go through the layers again,
a few rows at a time, their softmax weights taken explicitly. Those rows see exactly the keys and values the
prefill wrote, so each row's weights are the model's own; no [heads, L, L] matrix is ever held.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F

from llava_ui.model.linear import project

ROWS = 64  # producing queries per pass through the layers: bounds the [heads, rows, keys] weights


def attention_rows(model, embeds, prompt_length: int, spans: list[tuple[int, int]]) -> list:
    """embeds [1, prompt_length + n - 1, hidden]: the prompt, then the answer's tokens but the last. `spans`: each
    image's (first, end) visual positions, in prompt order. Returns [token][layer][image] → a list of floats, one
    per visual position of that image (n tokens)."""
    first, length = prompt_length - 1, embeds.shape[1]
    if not spans:
        return [[[] for _ in model.runner.qwen2.layers] for _ in range(first, length)]
    runner = model.runner
    if runner.parts is None:
        runner.pack()
    _, cache = runner.forward(embeds, None, 0)  # the fast path's prefill, for every position's keys and values
    columns = paddle.to_tensor(np.concatenate([np.arange(lo, hi) for lo, hi in spans]), dtype="int64")
    per_layer = []  # per chunk of rows: [layers, rows, visual positions]
    for lo in range(first, length, ROWS):
        hi = min(lo + ROWS, length)
        per_layer.append(_chunk(runner, embeds[0, lo:hi], cache, lo, columns))
    weights = np.concatenate(per_layer, axis=1)
    edges = np.cumsum([0] + [hi - lo for lo, hi in spans])
    return [[[weights[layer, row, edges[k]:edges[k + 1]].tolist() for k in range(len(spans))]
             for layer in range(weights.shape[0])] for row in range(weights.shape[1])]


def _chunk(runner, rows, cache, start: int, columns) -> np.ndarray:
    """Rows at positions start.. through every layer over the cache; their head-mean weights at `columns`
    per layer: [layers, rows, columns]."""
    layers, dim, heads = runner.qwen2.layers, runner.head_dim, runner.heads
    count, keys = rows.shape[0], start + rows.shape[0]
    cos, sin = runner.rotary.get(start, count, rows.dtype)  # [rows, 1, dim]
    # causal: row r (position start + r) sees the keys up to and including its own position
    visible = np.arange(keys)[None, :] <= np.arange(start, keys)[:, None]
    mask = paddle.to_tensor(np.where(visible, 0.0, -np.inf), dtype=rows.dtype)
    weights = {}  # (layer, the part's first kv head) → the part's weights summed over its heads

    def attention(part, x, i):  # (the parts run at once: each writes its own key)
        heads_out, weights[i, part.kv.start] = _attend(part, x, cos, sin, cache, i, keys, mask, dim)
        return project(heads_out, part.o_rows, part.transposed)

    runner.through_layers(rows, attention)
    starts = [part.kv.start for part in runner.parts[0][0]]
    return np.stack([paddle.gather(paddle.add_n([weights[i, start] for start in starts]) / heads, columns,
                                   axis=1).numpy() for i in range(len(layers))])


def _attend(part, x, cos, sin, cache, layer: int, keys: int, mask, dim: int):
    """One part's query heads over the cache: (heads' outputs [rows, q heads * dim], the weights summed over
    the part's heads [rows, keys])."""
    q_heads, kv_heads = part.q_heads, part.kv_heads
    group, count = q_heads // kv_heads, x.shape[0]
    qkv = project(x, part.qkv, part.transposed, part.bias)
    q = qkv[:, :q_heads * dim].reshape([count, q_heads, dim])
    half = dim // 2
    turned = paddle.concat([-q[..., half:], q[..., :half]], axis=-1)
    q = (q * cos + turned * sin) * dim ** -0.5
    capacity = cache.capacity

    def heads(buffers):  # the part's kv heads over the visible keys: [kv heads, keys, dim]
        rows = buffers[layer][part.kv.start * capacity:part.kv.stop * capacity]
        visible = rows.reshape([kv_heads, capacity, dim])[:, :keys]
        return visible if visible.dtype == q.dtype else visible.astype(q.dtype)  # (the bf16 kernels' cache)

    # query heads of one kv head side by side: [kv heads, group * rows, dim], rows ordered (head in group, row)
    q = paddle.transpose(q, [1, 0, 2]).reshape([kv_heads, group * count, dim])
    scores = paddle.matmul(q, heads(cache.keys), transpose_y=True) + paddle.tile(mask, [group, 1]).unsqueeze(0)
    weights = F.softmax(scores.astype("float32"), axis=-1)
    out = paddle.matmul(weights.astype(x.dtype), heads(cache.values))  # [kv heads, group * rows, dim]
    out = paddle.transpose(out.reshape([q_heads, count, dim]), [1, 0, 2]).reshape([count, q_heads * dim])
    return out, weights.reshape([q_heads, count, keys]).sum(axis=0)
