"""Sliding-window tile grids (pure): where the tiles of a patch size lie in a volume.

All positions are voxel indices in numpy order (z, y, x). A volume smaller than the patch along an
axis is (virtually) padded symmetrically to the patch size; tile starts are given in that padded
grid and :meth:`TileGrid.region` maps a tile back to the part of the unpadded volume it covers.

Whole-image tiles (``whole_image_voxels``): when the volume, rounded up per axis to the network's
divisibility, has at most that many voxels, one tile of that shape covers it (2-D networks, with a
patch of 1 along z: one such tile per slice) instead of training-patch tiles with overlap: a
fully convolutional network takes any divisible shape, and every voxel lies in exactly one tile,
so the tile weights cancel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from voxflow.errors import VoxflowError

__all__ = ["TileGrid", "tile_grid", "tile_starts", "whole_image_patch"]

Box = tuple[tuple[int, int], ...]


def tile_starts(size: int, patch: int, *, step: float = 0.5) -> list[int]:
    """Start indices of tiles of length ``patch`` along an axis of length ``size``.

    nnU-Net's rule: the fewest tiles whose spacing does not exceed ``step * patch``, spread evenly
    from 0 to ``size - patch`` so that the first and last tile touch the borders (at least one voxel
    apart, so no tile repeats). ``size < patch``
    gives one tile at 0 (the axis is padded to the patch).

    >>> tile_starts(11, 4, step=0.5)
    [0, 2, 4, 5, 7]
    """
    if not 0.0 < step <= 1.0:
        raise VoxflowError(f"step must be in (0, 1] (a fraction of the patch size); got {step!r}.")
    if patch < 1 or size < 1:
        raise VoxflowError(f"size and patch must be positive; got size={size!r}, patch={patch!r}.")
    if size <= patch:
        return [0]
    n = math.ceil((size - patch) / max(patch * step, 1.0)) + 1
    actual = (size - patch) / (n - 1)
    return [int(round(actual * i)) for i in range(n)]


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``patch_size_vox`` covering a volume of ``shape_zyx`` (see :func:`tile_grid`)."""

    shape_zyx: tuple[int, ...]
    patch_size_vox: tuple[int, ...]
    step: float
    pad_lo_zyx: tuple[int, ...]
    starts_zyx: tuple[tuple[int, ...], ...]

    @property
    def padded_shape_zyx(self) -> tuple[int, ...]:
        return tuple(max(s, p) for s, p in zip(self.shape_zyx, self.patch_size_vox))

    def __len__(self) -> int:
        return math.prod(len(s) for s in self.starts_zyx)

    def tiles(self) -> list[tuple[int, ...]]:
        """Tile starts in the padded grid, raster order (z slowest)."""
        out: list[tuple[int, ...]] = [()]
        for starts in self.starts_zyx:
            out = [t + (s,) for t in out for s in starts]
        return out

    def start_array(self) -> np.ndarray:
        """Tile starts as an (n, 3) int64 array in the order of :meth:`tiles` (12-24 bytes per tile
        instead of Python tuples: bookkeeping for 10^5 tiles stays small)."""
        mesh = np.meshgrid(*(np.asarray(s, np.int64) for s in self.starts_zyx), indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=1).reshape(-1, len(self.starts_zyx))

    def volume_boxes(self, starts: np.ndarray | None = None) -> np.ndarray:
        """(n, 3, 2) int64 array: ``[:, axis] = (lo, hi)`` of each tile's box in the unpadded volume."""
        st = self.start_array() if starts is None else np.asarray(starts, np.int64)
        pad = np.asarray(self.pad_lo_zyx, np.int64)
        lo = st - pad
        hi = np.minimum(lo + np.asarray(self.patch_size_vox, np.int64), np.asarray(self.shape_zyx, np.int64))
        return np.stack([np.maximum(lo, 0), hi], axis=2)

    def region(self, start: Sequence[int]) -> tuple[Box, Box]:
        """For a tile start (padded grid): its box ``((lo, hi), ...)`` in the unpadded volume and the
        matching box inside the tile (both half-open)."""
        vol: list[tuple[int, int]] = []
        loc: list[tuple[int, int]] = []
        for s, p, pad, n in zip(start, self.patch_size_vox, self.pad_lo_zyx, self.shape_zyx):
            lo, hi = max(s - pad, 0), min(s - pad + p, n)
            vol.append((lo, hi))
            loc.append((lo - (s - pad), hi - (s - pad)))
        return tuple(vol), tuple(loc)


def whole_image_patch(
    shape_zyx: Sequence[int], patch_size_vox: Sequence[int], divisor_zyx: Sequence[int], max_voxels: int
) -> tuple[int, ...] | None:
    """The whole-image tile of a volume: its shape rounded up per axis to ``divisor_zyx`` (axes where
    the patch is 1, a 2-D network's z, stay 1); None if that tile has more than ``max_voxels`` voxels.

    >>> whole_image_patch((35, 50, 36), (40, 48, 32), (8, 8, 8), 10**6)
    (40, 56, 40)
    """
    tile = tuple(
        1 if p == 1 else -(-int(s) // int(d)) * int(d)
        for s, p, d in zip(shape_zyx, patch_size_vox, divisor_zyx, strict=True)
    )
    return tile if math.prod(tile) <= max_voxels else None


def tile_grid(
    shape_zyx: Sequence[int],
    patch_size_vox: Sequence[int],
    *,
    step: float = 0.5,
    whole_image_voxels: int = 0,
    divisor_zyx: Sequence[int] | None = None,
) -> TileGrid:
    """The sliding-window tile grid of a volume; every voxel lies in at least one tile.

    The one function deciding the tiles of a prediction (single process and block-parallel alike).

    Parameters
    ----------
    shape_zyx : volume shape (z, y, x) in voxels.
    patch_size_vox : tile shape (z, y, x); axes where the volume is smaller are padded symmetrically.
    step : tile spacing as a fraction of the patch size (0.5 = half-overlapping tiles).
    whole_image_voxels : if > 0, tiles of :func:`whole_image_patch` when it has at most this many
        voxels (the grid's ``patch_size_vox`` is then that tile); 0 = always ``patch_size_vox``.
    divisor_zyx : what every tile axis must be divisible by (the network's total stride); default
        ``patch_size_vox`` itself (whole-image tiles are then whole multiples of the patch).
    """
    shape = tuple(int(s) for s in shape_zyx)
    patch = tuple(int(p) for p in patch_size_vox)
    if len(shape) != len(patch):
        raise VoxflowError(f"patch_size_vox {patch!r} must have one entry per axis of shape {shape!r}.")
    if whole_image_voxels > 0:
        divisor = patch if divisor_zyx is None else tuple(int(d) for d in divisor_zyx)
        if len(divisor) != len(patch) or min(divisor) < 1:
            raise VoxflowError(f"divisor_zyx must hold one positive entry per axis; got {divisor!r}.")
        patch = whole_image_patch(shape, patch, divisor, whole_image_voxels) or patch
    pad_lo = tuple(max(p - s, 0) // 2 for s, p in zip(shape, patch))
    starts = tuple(tuple(tile_starts(max(s, p), p, step=step)) for s, p in zip(shape, patch))
    return TileGrid(shape, patch, float(step), pad_lo, starts)
