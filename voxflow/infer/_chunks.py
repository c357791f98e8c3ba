"""Chunk shapes used by prediction (pure): which Zarr chunks its scratch and output arrays get, and
which dask chunks read and compute them.

Dask chunks that are whole multiples of the Zarr chunks read or write whole chunks per task (no
lock), and few large tasks keep a case's task graph -- whose Python objects would otherwise grow
with the volume: ~10^5 tasks, ~150 MB, for a 512 M-voxel case in half-patch chunks -- to a few
hundred tasks per G-voxel. Shapes are (z, y, x) in voxels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from voxflow.store import DEFAULT_CHUNKS_ZYX, Store

__all__ = ["clamp_chunks", "grow_chunks", "output_chunks", "read_chunks"]


def clamp_chunks(chunks_zyx: Sequence[int], shape_zyx: Sequence[int]) -> tuple[int, ...]:
    """``chunks_zyx`` limited to ``shape_zyx`` (at least 1 per axis)."""
    return tuple(max(1, min(int(c), int(s))) for c, s in zip(chunks_zyx, shape_zyx, strict=True))


def grow_chunks(chunks_zyx: Sequence[int], bytes_per_voxel: int, max_bytes: int = 8 * 2**20) -> tuple[int, ...]:
    """Whole multiples of ``chunks_zyx``: doubled along x, y, z in turn while one chunk of
    ``bytes_per_voxel`` (e.g. channels x 4 for float32) stays within ``max_bytes``."""
    chunks = [max(1, int(c)) for c in chunks_zyx]
    axis = 2
    for _ in range(64):
        grown = list(chunks)
        grown[axis] *= 2
        if bytes_per_voxel * math.prod(grown) > max_bytes:
            break
        chunks, axis = grown, (axis - 1) % 3
    return tuple(chunks)


def output_chunks(shape_zyx: Sequence[int], n_outputs: int, max_bytes: int = 16 * 2**20) -> tuple[int, ...]:
    """Chunks of the prediction store: DEFAULT_CHUNKS_ZYX, z halved until one float32 (K, chunk)
    block of probabilities fits in ``max_bytes`` (bounds each write task's memory)."""
    cz, cy, cx = DEFAULT_CHUNKS_ZYX
    while cz > 1 and n_outputs * cz * cy * cx * 4 > max_bytes:
        cz //= 2
    return clamp_chunks((cz, cy, cx), shape_zyx)


def read_chunks(store: Store, case_id: str) -> tuple[int, ...]:
    """Dask chunks (C, z, y, x) for reading a case's image: whole multiples of its Zarr chunks, ~8 MB
    as float32."""
    z = store.zarr_array(case_id, "image")
    n_channels = int(z.shape[0])
    return (n_channels, *clamp_chunks(grow_chunks(z.chunks[1:], 4 * n_channels), z.shape[1:]))
