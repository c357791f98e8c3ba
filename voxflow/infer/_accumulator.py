"""Tiled accumulation of Gaussian-weighted tile predictions with memory bounded by tiles in flight.

The output grid is cut into blocks (the output array's chunks). Each block keeps a weighted sum
``(K, bz, by, bx)`` and a weight sum ``(bz, by, bx)`` only while tiles that touch it are still to
come; once its last tile has been added it is normalised and written to the output (a whole chunk
at a time, so no partial-chunk writes). Partial blocks live in an LRU cache of ``cache_bytes``;
beyond that they are spilled to a scratch Zarr store on disk and read back when the next tile
needs them. Peak memory therefore depends on the cache size and the patch, never on the volume.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TileAccumulator", "order_tiles"]

log = logging.getLogger(__name__)
Box = tuple[tuple[int, int], ...]


def _blocks_of(box: Box, block: Sequence[int]) -> list[tuple[int, ...]]:
    ranges = [range(lo // b, (hi - 1) // b + 1) for (lo, hi), b in zip(box, block)]
    return list(itertools.product(*ranges))


def order_tiles(boxes: Sequence[Box], *, block_zyx: Sequence[int], block_nbytes: int,
                cache_bytes: int) -> list[int]:
    """A tile order whose working set of partial blocks fits in about half of ``cache_bytes``.

    Tiles are visited z-slowest inside (y, x) columns; the columns are as wide as the cache allows,
    so a small volume is one plain raster scan and a large one only spills blocks on column seams.
    """
    if not boxes:
        return []
    lo = np.array([[b[a][0] for a in range(3)] for b in boxes])
    extent = lo.max(0) + 1
    # blocks alive during a z-major sweep of a g x g column: about 3 block layers of (g + 2)^2
    budget_blocks = max(cache_bytes // 2 // max(block_nbytes, 1), 1)
    g = max(int(math.sqrt(budget_blocks / 3)) - 2, 1)
    col = (g * int(block_zyx[1]), g * int(block_zyx[2]))
    if col[0] >= extent[1] and col[1] >= extent[2]:
        keys = [(0, 0, *map(int, row)) for row in lo]
    else:
        keys = [(int(row[1]) // col[0], int(row[2]) // col[1], *map(int, row)) for row in lo]
    return sorted(range(len(boxes)), key=keys.__getitem__)


class TileAccumulator:
    """Accumulate ``sum_t w_t * p_t`` and ``sum_t w_t`` per voxel; write ``sum / weight`` per block.

    Parameters
    ----------
    out : array-like (K, Z, Y, X) supporting ``__setitem__`` (a Zarr array or numpy array); each
        block is written once, as ``out[:, block] = values.astype(out.dtype)``.
    boxes : the volume box ``((z0, z1), (y0, y1), (x0, x1))`` of every tile that will be added
        (each exactly once, in any order) -- used to know when a block is complete.
    block_zyx : block shape; pass the spatial chunk shape of ``out`` for chunk-aligned writes.
    cache_bytes : bytes of partial blocks held in memory before spilling to disk.
    scratch_dir : folder for the spill store (a temporary folder by default; created on first spill).
    """

    def __init__(self, out: Any, boxes: Iterable[Box], *, block_zyx: Sequence[int],
                 cache_bytes: int = 512 * 2**20, scratch_dir: str | Path | None = None):
        self.out = out
        self.n_classes = int(out.shape[0])
        self.shape_zyx = tuple(int(s) for s in out.shape[1:])
        self.block_zyx = tuple(max(1, min(int(b), s)) for b, s in zip(block_zyx, self.shape_zyx))
        self.cache_bytes = int(cache_bytes)
        self._scratch_parent = scratch_dir
        self._remaining: dict[tuple[int, ...], int] = {}
        for box in boxes:
            for key in _blocks_of(box, self.block_zyx):
                self._remaining[key] = self._remaining.get(key, 0) + 1
        self._cache: OrderedDict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cached_bytes = 0
        self._spilled: set[tuple[int, ...]] = set()
        self._spill: tuple[Any, Any] | None = None
        self._spill_dir: Path | None = None
        self.n_spills = 0
        self.peak_cached_bytes = 0

    @property
    def block_nbytes(self) -> int:
        return (self.n_classes + 1) * math.prod(self.block_zyx) * 4

    # ------------------------------------------------------------------ blocks
    def _block_box(self, key: tuple[int, ...]) -> Box:
        return tuple((k * b, min((k + 1) * b, s)) for k, b, s in zip(key, self.block_zyx, self.shape_zyx))

    def _get(self, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        shape = tuple(hi - lo for lo, hi in self._block_box(key))
        if key in self._spilled:
            assert self._spill is not None
            sl = tuple(slice(lo, hi) for lo, hi in self._block_box(key))
            buf = (np.asarray(self._spill[0][(slice(None), *sl)]), np.asarray(self._spill[1][sl]))
            self._spilled.discard(key)
        else:
            buf = (np.zeros((self.n_classes, *shape), np.float32), np.zeros(shape, np.float32))
        self._cache[key] = buf
        self._cached_bytes += buf[0].nbytes + buf[1].nbytes
        self.peak_cached_bytes = max(self.peak_cached_bytes, self._cached_bytes)
        return buf

    def _drop(self, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        buf = self._cache.pop(key)
        self._cached_bytes -= buf[0].nbytes + buf[1].nbytes
        return buf

    def _spill_arrays(self) -> tuple[Any, Any]:
        if self._spill is None:
            import zarr

            self._spill_dir = Path(tempfile.mkdtemp(prefix="voxflow-acc-", dir=self._scratch_parent))
            grp = zarr.open_group(str(self._spill_dir), mode="w", zarr_format=3)
            kw: dict[str, Any] = {"dtype": np.float32, "compressors": None, "fill_value": 0.0}
            self._spill = (
                grp.create_array("sum", shape=(self.n_classes, *self.shape_zyx),
                                 chunks=(self.n_classes, *self.block_zyx), **kw),
                grp.create_array("weight", shape=self.shape_zyx, chunks=self.block_zyx, **kw),
            )
            log.debug("accumulator spills partial blocks to %s", self._spill_dir)
        return self._spill

    def _evict(self) -> None:
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            key, _ = next(iter(self._cache.items()))
            acc, wsum = self._drop(key)
            spill = self._spill_arrays()
            sl = tuple(slice(lo, hi) for lo, hi in self._block_box(key))
            spill[0][(slice(None), *sl)] = acc
            spill[1][sl] = wsum
            self._spilled.add(key)
            self.n_spills += 1

    def _finish(self, key: tuple[int, ...]) -> None:
        acc, wsum = self._drop(key)
        sl = tuple(slice(lo, hi) for lo, hi in self._block_box(key))
        self.out[(slice(None), *sl)] = (acc / wsum).astype(self.out.dtype, copy=False)

    # ------------------------------------------------------------------ public
    def add(self, box: Box, weighted: np.ndarray, weight: np.ndarray) -> None:
        """Add one tile: ``weighted`` (K, dz, dy, dx) = w * p and ``weight`` (dz, dy, dx) = w, both
        covering ``box`` of the volume. Blocks this tile completes are written out."""
        for key in _blocks_of(box, self.block_zyx):
            bbox = self._block_box(key)
            inter = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(box, bbox)]
            in_blk = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, bbox))
            in_tile = tuple(slice(lo - a0, hi - a0) for (lo, hi), (a0, _) in zip(inter, box))
            acc, wsum = self._get(key)
            acc[(slice(None), *in_blk)] += weighted[(slice(None), *in_tile)]
            wsum[in_blk] += weight[in_tile]
            self._remaining[key] -= 1
            if self._remaining[key] == 0:
                self._finish(key)
        self._evict()

    @property
    def complete(self) -> bool:
        return not self._cache and not self._spilled and all(v == 0 for v in self._remaining.values())

    def close(self) -> None:
        """Remove the spill store (if one was created)."""
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
            self._spill = None

    def __enter__(self) -> TileAccumulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
