"""The KV cache: every layer's keys and values in buffers preallocated per cache and grown in steps."""
from __future__ import annotations

import numpy as np
import paddle

HEADROOM = 128  # positions a cache grows by when decoding outgrows it (and at most what a prefill reserves ahead)


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
        capacity = round_up(needed) if self.shared else round_up(needed + HEADROOM)

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


def round_up(n: int, step: int = 64) -> int:
    return -(-n // step) * step
