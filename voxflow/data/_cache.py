"""A small, thread-safe LRU cache of decoded Zarr chunks, bounded in bytes.

Patches of consecutive batches often overlap the same chunks (small datasets, foreground
oversampling around the same structures); the cache saves their decompression. A miss reads the
chunk-aligned box around the patch in one Zarr call (the chunks Zarr would decode anyway) and
keeps each chunk; a hit only copies. With a dataset much larger than the cache it costs one extra
copy per patch and saves little.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

__all__ = ["ChunkCache", "read_box_cached"]


class ChunkCache:
    """LRU of numpy chunks keyed by (array key, chunk index), at most ``max_bytes`` in total."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.nbytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._items)


def read_box_cached(array: Any, box: Sequence[slice], cache: ChunkCache, key: Hashable) -> np.ndarray:
    """``array[..., box]`` (in-bounds ``box`` over the last three axes) assembled from cached chunks.

    Chunks are the array's own (inner) chunks over the last three axes; leading axes are read
    whole. On any miss the chunk-aligned box covering ``box`` is read in one call and split.
    """
    lead = tuple(array.shape[:-3])
    shape = tuple(int(s) for s in array.shape[-3:])
    chunk = tuple(int(c) for c in array.chunks[-3:])
    ranges = [range(s.start // c, (s.stop - 1) // c + 1) for s, c in zip(box, chunk, strict=True)]
    blocks = list(itertools.product(*ranges))
    found = {b: cache.get((key, b)) for b in blocks}
    head = (slice(None),) * len(lead)
    if any(v is None for v in found.values()):
        lo = [r.start * c for r, c in zip(ranges, chunk, strict=True)]
        hi = [min(r.stop * c, n) for r, c, n in zip(ranges, chunk, shape, strict=True)]
        union = np.asarray(array[head + tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
        for b in blocks:
            sl = tuple(
                slice(i * c - a, min((i + 1) * c, n) - a) for i, c, a, n in zip(b, chunk, lo, shape, strict=True)
            )
            block = np.ascontiguousarray(union[head + sl])
            found[b] = block
            cache.put((key, b), block)
    out = np.empty(lead + tuple(s.stop - s.start for s in box), dtype=array.dtype)
    for b, data in found.items():
        src, dst = [], []
        for i, c, s in zip(b, chunk, box, strict=True):
            a, e = max(i * c, s.start), min((i + 1) * c, s.stop)
            src.append(slice(a - i * c, e - i * c))
            dst.append(slice(a - s.start, e - s.start))
        out[head + tuple(dst)] = data[head + tuple(src)]  # type: ignore[index]
    return out
