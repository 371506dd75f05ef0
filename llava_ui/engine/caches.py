"""Bounded caches: visual features by image content, and KV caches of prompt prefixes."""
from __future__ import annotations

import threading
from collections import OrderedDict


def tensor_bytes(tensor) -> int:
    return int(tensor.numel()) * tensor.element_size()


class FeatureCache:
    """LRU of packed image rows keyed by (content digest, view, packing), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key, rows) -> None:
        size = tensor_bytes(rows)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = rows
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= tensor_bytes(old)

    def __len__(self):
        return len(self._items)


class PrefixCache:
    """KV caches (llava_ui.model.kv_cache.KVCache) of earlier prompts (+ their answers), found again by the longest
    shared prefix of prompt items.

    An item is a token id or an image key; an image is one item spanning its visual tokens, so a match never ends
    inside an image. Entries are read-only: a match is sliced, never extended in place.
    """

    def __init__(self, max_bytes: int, max_entries: int = 4):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: list[tuple[list, list[int], object]] = []  # (items, item_sizes, kv)
        self._lock = threading.Lock()

    def store(self, items: list, sizes: list[int], kv) -> None:
        size = kv.nbytes
        if size > self.max_bytes or self.max_entries == 0:
            return
        with self._lock:
            self._entries = [e for e in self._entries if e[0] != items]
            self._entries.append((items, sizes, kv, size))
            while len(self._entries) > self.max_entries or sum(e[3] for e in self._entries) > self.max_bytes:
                self._entries.pop(0)

    def match(self, items: list) -> tuple[int, int, object]:
        """(items matched, positions matched, kv sliced to them); leaves at least one item to compute."""
        best = (0, 0, None)
        with self._lock:
            entries = list(self._entries)
        for cached_items, sizes, kv, _ in entries:
            n = 0
            limit = min(len(cached_items), len(items) - 1)
            while n < limit and cached_items[n] == items[n]:
                n += 1
            positions = sum(sizes[:n])
            if positions > best[1]:
                best = (n, positions, kv)
        n, positions, kv = best
        if kv is None:
            return 0, 0, None
        return n, positions, kv.prefix(positions)  # shared read-only: the first write copies it

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(entry[3] for entry in self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self):
        return len(self._entries)
