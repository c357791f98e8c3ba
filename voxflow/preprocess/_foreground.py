"""Foreground index: a bounded, seeded sample of voxel coordinates per label class.

Each voxel gets a pseudo-random key from a hash of its linear index and the seed; a class's
sample is the ``max_per_class`` voxels with the smallest keys. That is a uniform sample without
replacement that does not depend on the chunking or the scheduler, and it reduces block by block:
each block keeps its ``max_per_class`` smallest keys per class, merges keep the smallest again.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

__all__ = ["foreground_index", "foreground_index_eager"]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised SplitMix64 finaliser (uint64 -> well-mixed uint64)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def _block_candidates(
    block: np.ndarray, offset: Sequence[int], shape: Sequence[int], seed: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows (N, 5) uint64 [key, class, z, y, x], present values) of one block."""
    present = np.unique(block)
    rows = []
    seed_mix = _splitmix64(np.asarray([seed], dtype=np.uint64))[0]
    for v in present:
        if v == 0:
            continue
        local = np.nonzero(block == v)
        glob = [loc.astype(np.uint64) + np.uint64(o) for loc, o in zip(local, offset, strict=True)]
        linear = (glob[0] * np.uint64(shape[1]) + glob[1]) * np.uint64(shape[2]) + glob[2]
        keys = _splitmix64(linear ^ seed_mix)
        if keys.size > k:
            keep = np.argpartition(keys, k - 1)[:k]
            keys, glob = keys[keep], [g[keep] for g in glob]
        rows.append(np.stack([keys, np.full(keys.shape, v, dtype=np.uint64), *glob], axis=1))
    out = np.concatenate(rows) if rows else np.empty((0, 5), dtype=np.uint64)
    return out, present.astype(np.int64)


def _merge(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([p[0] for p in parts])
    present = np.unique(np.concatenate([p[1] for p in parts]))
    kept = []
    for v in np.unique(rows[:, 1]):
        sel = rows[rows[:, 1] == v]
        if len(sel) > k:
            sel = sel[np.argpartition(sel[:, 0], k - 1)[:k]]
        kept.append(sel)
    out = np.concatenate(kept) if kept else np.empty((0, 5), dtype=np.uint64)
    return out, present


def _finalize(part: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, list[int]]:
    rows, present = part
    order = np.lexsort((rows[:, 0], rows[:, 1]))
    index = rows[order][:, 1:].astype(np.int32)
    return index.reshape(-1, 4), [int(v) for v in present]


def foreground_index(label: da.Array, *, max_per_class: int = 10_000, seed: int = 0, fan_in: int = 8) -> Delayed:
    """Lazy ``(index, classes_present)`` of a (Z, Y, X) label map.

    ``index`` is an (N, 4) int32 array of rows ``(class_value, z, y, x)``: for every nonzero class,
    at most ``max_per_class`` voxels drawn uniformly without replacement (seeded, independent of
    chunking), sorted by class. ``classes_present`` lists every label value found (0 included).
    """
    shape = label.shape
    offsets = [np.cumsum((0, *c[:-1])) for c in label.chunks]
    blocks = label.to_delayed()
    parts = []
    for idx in itertools.product(*(range(n) for n in label.numblocks)):
        off = tuple(int(offsets[a][i]) for a, i in enumerate(idx))
        parts.append(dask.delayed(_block_candidates, pure=True)(blocks[idx], off, shape, seed, max_per_class))
    while len(parts) > 1:
        parts = [
            dask.delayed(_merge, pure=True)(parts[i : i + fan_in], max_per_class) for i in range(0, len(parts), fan_in)
        ]
    return dask.delayed(_finalize, pure=True)(parts[0])


def foreground_index_eager(
    label: np.ndarray, *, max_per_class: int = 10_000, seed: int = 0
) -> tuple[np.ndarray, list[int]]:
    """The same result from a numpy label map in one piece (reference for tests)."""
    cand = _block_candidates(np.asarray(label), (0, 0, 0), label.shape, seed, max_per_class)
    return _finalize(_merge([cand], max_per_class))
