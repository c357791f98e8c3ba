"""Block-parallel sliding window (pure parts): the blocks of a volume and the exact prediction of one.

The scores volume (K, Z, Y, X) is cut into blocks that are whole multiples of its Zarr chunks. A
block task predicts every tile of the GLOBAL tile grid (:func:`~voxflow.infer.tile_grid`, the one
the single-process path uses) that overlaps the block's core, adds only the part inside the core and
writes ``sum(w * p) / sum(w)`` there. Per voxel that is the same float32 sum, in the same tile order
(:func:`~voxflow.infer.order_tiles` with the single-process arguments), of the same per-tile scores
(each task runs whole batches of the single-process batching, so even a batch-size-dependent kernel
gives the same bits) -- the result is bit-identical to
:func:`~voxflow.infer.sliding_window_predict` at the same precision. Tiles that straddle blocks
are predicted once per block they touch: :func:`duplicated_tile_overhead`; bigger blocks cost more
memory per task and duplicate fewer tiles. Shapes are (z, y, x) in voxels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxflow.infer._accumulator import order_tiles
from voxflow.infer._tiling import TileGrid, tile_grid

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "TileSchedule",
    "block_boxes",
    "block_grid",
    "block_shape",
    "duplicated_tile_overhead",
    "predict_block",
]

Box = tuple[tuple[int, int], ...]
#: Default accumulation memory of one block task: (K + 1) float32 values per core voxel.
DEFAULT_BLOCK_BYTES = 512 * 2**20  # PredictOptions.block_bytes


@dataclass(frozen=True)
class TileSchedule:
    """The single-process tile schedule of one volume: grid, order and batches (picklable, small).

    ``chunk_zyx`` and ``cache_bytes`` are the accumulation block and cache of the single-process
    :func:`~voxflow.infer.sliding_window_predict` run it reproduces (they decide its tile order).
    """

    shape_zyx: tuple[int, int, int]
    patch_size_vox: tuple[int, int, int]
    step: float
    chunk_zyx: tuple[int, int, int]
    n_classes: int
    cache_bytes: int
    batch_size: int

    def grid(self) -> TileGrid:
        return tile_grid(self.shape_zyx, self.patch_size_vox, step=self.step)

    def batches(self) -> tuple[TileGrid, np.ndarray, np.ndarray, list[np.ndarray]]:
        """(grid, tile starts (n, 3), tile volume boxes (n, 3, 2), batches of tile indices) exactly as
        the single-process path orders and batches them."""
        grid = self.grid()
        starts = grid.start_array()
        boxes = grid.volume_boxes(starts)
        chunk = tuple(max(1, min(c, s)) for c, s in zip(self.chunk_zyx, self.shape_zyx, strict=True))
        nbytes = (self.n_classes + 1) * math.prod(chunk) * 4  # TileAccumulator.block_nbytes
        order = order_tiles(boxes, block_zyx=chunk, block_nbytes=nbytes, cache_bytes=self.cache_bytes)
        bs = max(1, int(self.batch_size))
        return grid, starts, boxes, [order[i : i + bs] for i in range(0, len(order), bs)]


def block_shape(
    shape_zyx: Sequence[int], chunk_zyx: Sequence[int], n_classes: int, *, max_bytes: int = DEFAULT_BLOCK_BYTES
) -> tuple[int, int, int]:
    """The largest block of whole chunks, grown evenly over the axes (the shortest first), whose
    (K + 1) float32 buffer fits ``max_bytes``; never beyond the volume (rounded up to whole chunks)."""
    chunk = [max(1, min(int(c), int(s))) for c, s in zip(chunk_zyx, shape_zyx, strict=True)]
    limit = [-(-int(s) // c) for s, c in zip(shape_zyx, chunk, strict=True)]  # chunks per axis
    mult = [1, 1, 1]
    per_voxel = 4 * (int(n_classes) + 1)
    while True:
        open_axes = [a for a in range(3) if mult[a] < limit[a]]
        if not open_axes:
            break
        a = min(open_axes, key=lambda ax: (mult[ax] * chunk[ax], -ax))
        grown = list(mult)
        grown[a] += 1
        if per_voxel * math.prod(m * c for m, c in zip(grown, chunk, strict=True)) > max_bytes:
            break
        mult = grown
    return (mult[0] * chunk[0], mult[1] * chunk[1], mult[2] * chunk[2])


def block_grid(shape_zyx: Sequence[int], block_zyx: Sequence[int]) -> tuple[int, int, int]:
    """Blocks per axis (z, y, x)."""
    n = [-(-int(s) // int(b)) for s, b in zip(shape_zyx, block_zyx, strict=True)]
    return (n[0], n[1], n[2])


def block_boxes(shape_zyx: Sequence[int], block_zyx: Sequence[int]) -> Iterator[tuple[tuple[int, int, int], Box]]:
    """``(block index, core box)`` of every block, raster order; boxes are half-open, clipped."""
    nz, ny, nx = block_grid(shape_zyx, block_zyx)
    for idx in ((z, y, x) for z in range(nz) for y in range(ny) for x in range(nx)):
        yield idx, tuple((i * b, min((i + 1) * b, int(s))) for i, b, s in zip(idx, block_zyx, shape_zyx, strict=True))


def _overlapping(boxes: np.ndarray, core: Box) -> np.ndarray:
    """Boolean mask of the tiles whose volume box overlaps ``core``."""
    c = np.asarray(core, np.int64)
    return np.all((boxes[:, :, 0] < c[:, 1]) & (boxes[:, :, 1] > c[:, 0]), axis=1)


def _needed_batches(boxes: np.ndarray, batches: list[np.ndarray], core: Box) -> list[np.ndarray]:
    hit = _overlapping(boxes, core)
    return [b for b in batches if hit[b].any()]


def duplicated_tile_overhead(schedule: TileSchedule, block_zyx: Sequence[int]) -> float:
    """Tiles predicted by all block tasks together / tiles of the grid (1.0 = no duplicates)."""
    _, _, boxes, batches = schedule.batches()
    total = sum(
        sum(len(b) for b in _needed_batches(boxes, batches, core))
        for _, core in block_boxes(schedule.shape_zyx, block_zyx)
    )
    return total / max(len(boxes), 1)


def predict_block(
    image: Any, predictor: Any, schedule: TileSchedule, core: Box, weights: np.ndarray
) -> tuple[np.ndarray, int]:
    """Scores ``sum(w * p) / sum(w)`` (K, *core) of one block's core, and how many tiles it predicted.

    ``image``: the (C, Z, Y, X) model-grid image (a Zarr array: only the tiles are read, the next
    batch while the current one runs); ``predictor``: the model's tile predictor; ``weights``: the
    patch-shaped tile weights (the model's importance map). Bit-identical to the same voxels of
    :func:`~voxflow.infer.sliding_window_predict` with the schedule's arguments.
    """
    import torch

    from voxflow.infer._sliding import weighted_batches

    grid, starts, boxes, batches = schedule.batches()
    needed = _needed_batches(boxes, batches, core)
    k = schedule.n_classes
    lo = np.asarray([c[0] for c in core], np.int64)
    buf = np.zeros((k + 1, *(hi - c0 for c0, hi in core)), np.float32)
    gauss = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    if not needed:
        return buf[:k], 0
    for idx, weighted in weighted_batches(image, predictor, grid, starts, needed, gauss):
        for j, i in enumerate(idx):
            _add_tile(buf, grid, starts[i], core, lo, weighted[j], weights)
    np.divide(buf[:k], buf[k], out=buf[:k])
    return buf[:k], sum(len(b) for b in needed)


def _add_tile(
    buf: np.ndarray,
    grid: TileGrid,
    start: np.ndarray,
    core: Box,
    lo: np.ndarray,
    weighted: np.ndarray,
    weights: np.ndarray,
) -> None:
    """Add the part of one tile inside ``core`` (no-op for a batch mate that misses it)."""
    vol, loc = grid.region([int(s) for s in start])
    inter = [(max(a0, c0), min(a1, c1)) for (a0, a1), (c0, c1) in zip(vol, core, strict=True)]
    if any(hi <= lo_ for lo_, hi in inter):
        return
    in_tile = tuple(
        slice(l0 + (i0 - v0), l0 + (i1 - v0)) for (i0, i1), (v0, _), (l0, _) in zip(inter, vol, loc, strict=True)
    )
    in_buf = tuple(slice(i0 - int(o), i1 - int(o)) for (i0, i1), o in zip(inter, lo, strict=True))
    k = buf.shape[0] - 1
    sums, tile_part, weight_sum = (slice(0, k), *in_buf), (slice(None), *in_tile), (k, *in_buf)
    buf[sums] += weighted[tile_part]
    buf[weight_sum] += weights[in_tile]
