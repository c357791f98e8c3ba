"""Tiled accumulation of Gaussian-weighted tile predictions with memory bounded by tiles in flight.

The output grid is cut into blocks (the output array's chunks). Each block keeps one float32 buffer
``(K + 1, bz, by, bx)`` -- the weighted sum of the K channels and, last, the weight sum -- only
while tiles that touch it are still to come; once its last tile has been added it is normalised
and written to the output (a whole chunk at a time, so no partial-chunk writes). Partial blocks
live in an LRU cache of ``cache_bytes``; beyond that they are spilled to a scratch file on disk
(one fixed-size slot per spilled block, reused once the block is read back) and read back when
the next tile needs them. Peak memory therefore depends on the cache size and the patch, never on
the volume: the per-tile and per-block bookkeeping are small numpy arrays, not Python objects.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_CACHE_BYTES", "TileAccumulator", "order_tiles"]

#: Default memory for partial blocks. Spills go to a slot file with positional I/O and cost little
#: (512 M voxels, 1x1x1-conv net: 452 s with a 32 MB cache, 473 s with 256 MB), so the default is
#: modest: peak RSS is then nearly the same for any volume.
DEFAULT_CACHE_BYTES = 128 * 2**20

log = logging.getLogger(__name__)
Box = tuple[tuple[int, int], ...]
Key = tuple[int, int, int]


def _box_array(boxes: Iterable[Box] | np.ndarray) -> np.ndarray:
    """Boxes as an (n, 3, 2) int64 array of ``(lo, hi)`` per axis."""
    arr = np.asarray(boxes if isinstance(boxes, np.ndarray) else list(boxes), dtype=np.int64)
    return arr.reshape(-1, 3, 2)


def order_tiles(
    boxes: Iterable[Box] | np.ndarray, *, block_zyx: Sequence[int], block_nbytes: int, cache_bytes: int
) -> np.ndarray:
    """A tile order (indices into ``boxes``) whose working set of partial blocks fits in about half
    of ``cache_bytes``.

    Tiles are visited z-slowest inside (y, x) columns; the columns are as wide as the cache allows,
    so a small volume is one plain raster scan and a large one only spills blocks on column seams.
    """
    b = _box_array(boxes)
    if not len(b):
        return np.zeros(0, np.int64)
    lo = b[:, :, 0]
    extent = lo.max(0) + 1
    # blocks alive during a z-major sweep of a g x g column: about 3 block layers of (g + 2)^2
    budget_blocks = max(cache_bytes // 2 // max(block_nbytes, 1), 1)
    g = max(int(math.sqrt(budget_blocks / 3)) - 2, 1)
    col = (g * int(block_zyx[1]), g * int(block_zyx[2]))
    if col[0] >= extent[1] and col[1] >= extent[2]:
        return np.lexsort((lo[:, 2], lo[:, 1], lo[:, 0]))
    return np.lexsort((lo[:, 2], lo[:, 1], lo[:, 0], lo[:, 2] // col[1], lo[:, 1] // col[0]))


class _SlotFile:
    """Fixed-size slots in one scratch file (positional reads and writes, no page mapping, so spilled
    data never counts towards the process's resident memory)."""

    def __init__(self, slot_bytes: int, parent: str | Path | None):
        fd, name = tempfile.mkstemp(prefix="voxflow-acc-", suffix=".spill", dir=parent)
        self.fd, self.slot_bytes = fd, int(slot_bytes)
        self.path: Path | None = Path(name)  # kept only where an open file cannot be unlinked
        try:  # unlinked while open: the file disappears even if the process is killed
            self.path.unlink()
            self.path = None
        except OSError:
            pass
        self._free: list[int] = []
        self.n_slots = 0

    def write(self, buf: np.ndarray) -> int:
        slot = self._free.pop() if self._free else self.n_slots
        self.n_slots = max(self.n_slots, slot + 1)
        view = np.ascontiguousarray(buf).data.cast("B")
        offset, done = slot * self.slot_bytes, 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        return slot

    def read(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        buf = np.empty(shape, np.float32)
        view = buf.data.cast("B")
        offset, done = slot * self.slot_bytes, 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(f"accumulator spill file ended early (slot {slot}, {done}/{len(view)} bytes)")
            done += n
        self._free.append(slot)
        return buf

    def close(self) -> None:
        os.close(self.fd)
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class TileAccumulator:
    """Accumulate ``sum_t w_t * p_t`` and ``sum_t w_t`` per voxel; write ``sum / weight`` per block.

    Parameters
    ----------
    out : array-like (K, Z, Y, X) supporting ``__setitem__`` (a Zarr array or numpy array); each
        block is written once, as ``out[:, block] = values.astype(out.dtype)``.
    boxes : the volume box ``((z0, z1), (y0, y1), (x0, x1))`` of every tile that will be added
        (each exactly once, in any order), or an (n, 3, 2) array of them -- used to know when a
        block is complete.
    block_zyx : block shape; pass the spatial chunk shape of ``out`` for chunk-aligned writes.
    cache_bytes : bytes of partial blocks held in memory before spilling to disk.
    scratch_dir : folder for the spill file (the system temporary folder by default; created on
        first spill, removed by :meth:`close`).
    """

    def __init__(
        self,
        out: Any,
        boxes: Iterable[Box] | np.ndarray,
        *,
        block_zyx: Sequence[int],
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        scratch_dir: str | Path | None = None,
    ):
        self.out = out
        self.n_classes = int(out.shape[0])
        self.shape_zyx = tuple(int(s) for s in out.shape[1:])
        self.block_zyx = tuple(max(1, min(int(b), s)) for b, s in zip(block_zyx, self.shape_zyx))
        self.cache_bytes = int(cache_bytes)
        self._scratch_parent = scratch_dir
        self._remaining = self._count_tiles_per_block(_box_array(boxes))
        self._cache: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._spilled: dict[Key, int] = {}
        self._spill: _SlotFile | None = None
        self.n_spills = 0
        self.peak_cached_bytes = 0

    def _count_tiles_per_block(self, boxes: np.ndarray) -> np.ndarray:
        """How many tiles touch each block, via a 3-D difference array (vectorised over tiles)."""
        blk = np.asarray(self.block_zyx, np.int64)
        grid = tuple(-(-s // b) for s, b in zip(self.shape_zyx, self.block_zyx))
        diff = np.zeros(tuple(g + 1 for g in grid), np.int64)
        if len(boxes):
            if (
                (boxes[:, :, 0] < 0).any()
                or (boxes[:, :, 1] > np.asarray(self.shape_zyx)).any()
                or (boxes[:, :, 1] <= boxes[:, :, 0]).any()
            ):
                raise ValueError(f"tile boxes must be non-empty and lie inside the volume {self.shape_zyx}.")
            lo = boxes[:, :, 0] // blk
            hi = (boxes[:, :, 1] - 1) // blk + 1
            for corner in range(8):
                pick = [(corner >> a) & 1 for a in range(3)]
                idx = tuple(np.where(pick[a], hi[:, a], lo[:, a]) for a in range(3))
                np.add.at(diff, idx, (-1) ** sum(pick))
        return np.cumsum(np.cumsum(np.cumsum(diff, 0), 1), 2)[: grid[0], : grid[1], : grid[2]].astype(np.int32)

    @property
    def block_nbytes(self) -> int:
        return (self.n_classes + 1) * math.prod(self.block_zyx) * 4

    # ------------------------------------------------------------------ blocks
    def _block_box(self, key: Key) -> Box:
        return tuple((k * b, min((k + 1) * b, s)) for k, b, s in zip(key, self.block_zyx, self.shape_zyx))

    def _get(self, key: Key) -> np.ndarray:
        buf = self._cache.get(key)
        if buf is not None:
            self._cache.move_to_end(key)
            return buf
        shape = (self.n_classes + 1, *(hi - lo for lo, hi in self._block_box(key)))
        slot = self._spilled.pop(key, None)
        if slot is not None:
            assert self._spill is not None
            buf = self._spill.read(slot, shape)
        else:
            buf = np.zeros(shape, np.float32)
        self._cache[key] = buf
        self._cached_bytes += buf.nbytes
        self.peak_cached_bytes = max(self.peak_cached_bytes, self._cached_bytes)
        return buf

    def _drop(self, key: Key) -> np.ndarray:
        buf = self._cache.pop(key)
        self._cached_bytes -= buf.nbytes
        return buf

    def _evict(self) -> None:
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            key = next(iter(self._cache))
            buf = self._drop(key)
            if self._spill is None:
                self._spill = _SlotFile(self.block_nbytes, self._scratch_parent)
                log.debug(
                    "accumulator spills partial blocks to a scratch file in %s",
                    self._scratch_parent or tempfile.gettempdir(),
                )
            self._spilled[key] = self._spill.write(buf)
            self.n_spills += 1

    def _finish(self, key: Key) -> None:
        buf = self._drop(key)
        k = self.n_classes
        np.divide(buf[:k], buf[k], out=buf[:k])
        sl = tuple(slice(lo, hi) for lo, hi in self._block_box(key))
        where = (slice(None), *sl)
        self.out[where] = buf[:k].astype(self.out.dtype, copy=False)

    # ------------------------------------------------------------------ public
    def add(self, box: Box, weighted: np.ndarray, weight: np.ndarray) -> None:
        """Add one tile: ``weighted`` (K, dz, dy, dx) = w * p and ``weight`` (dz, dy, dx) = w, both
        covering ``box`` of the volume. Blocks this tile completes are written out."""
        k = self.n_classes
        ranges = [range(lo // b, (hi - 1) // b + 1) for (lo, hi), b in zip(box, self.block_zyx)]
        for key in ((z, y, x) for z in ranges[0] for y in ranges[1] for x in ranges[2]):
            bbox = self._block_box(key)
            inter = [(max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(box, bbox)]
            in_blk = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inter, bbox))
            in_tile = tuple(slice(lo - a0, hi - a0) for (lo, hi), (a0, _) in zip(inter, box))
            buf = self._get(key)
            scores_at: tuple[slice, ...] = (slice(0, k), *in_blk)
            from_tile: tuple[slice, ...] = (slice(None), *in_tile)
            weight_at: tuple[int | slice, ...] = (k, *in_blk)
            buf[scores_at] += weighted[from_tile]
            buf[weight_at] += weight[in_tile]
            self._remaining[key] -= 1
            if self._remaining[key] == 0:
                self._finish(key)
        self._evict()

    @property
    def complete(self) -> bool:
        return not self._cache and not self._spilled and not self._remaining.any()

    @property
    def spill_file_bytes(self) -> int:
        """Size the spill file reached (its slots are reused, so this is the peak spilled set)."""
        return 0 if self._spill is None else self._spill.n_slots * self._spill.slot_bytes

    def close(self) -> None:
        """Close and remove the spill file (if one was created)."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def __enter__(self) -> TileAccumulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
