"""Crop to the nonzero bounding box (over all channels), as nnU-Net does before normalising."""

from __future__ import annotations

from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np

from voxflow.errors import VoxflowError

__all__ = ["BBox", "bbox_from_projections", "crop", "nonzero_mask", "nonzero_projections"]

BBox = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def nonzero_mask(image: da.Array) -> da.Array:
    """(Z, Y, X) bool: voxels where any channel of a (C, Z, Y, X) image is nonzero, lazy."""
    return (image != 0).any(axis=0)


def nonzero_projections(image: da.Array) -> tuple[da.Array, da.Array, da.Array]:
    """Per spatial axis, whether the slab at each index holds a nonzero voxel: three lazy 1-D bools.

    Computing them reads the image once, chunk by chunk; :func:`bbox_from_projections` turns the
    result into a bounding box.
    """
    mask = nonzero_mask(image)
    return mask.any(axis=(1, 2)), mask.any(axis=(0, 2)), mask.any(axis=(0, 1))


def bbox_from_projections(projections: Sequence[np.ndarray]) -> BBox:
    """``((z0, z1), (y0, y1), (x0, x1))``, half-open; the whole grid when nothing is nonzero."""
    box = []
    for p in projections:
        idx = np.flatnonzero(np.asarray(p))
        box.append((int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, int(len(p))))
    return tuple(box)  # type: ignore[return-value]


def nonzero_bbox(image: da.Array) -> BBox:
    """Bounding box of the nonzero voxels of a (C, Z, Y, X) image (computes a small reduction)."""
    return bbox_from_projections(dask.compute(*nonzero_projections(image)))


def crop(arr: da.Array, bbox_zyx: BBox) -> da.Array:
    """Lazy crop of the last three axes to ``bbox_zyx`` (half-open voxel ranges, z, y, x)."""
    if len(bbox_zyx) != 3:
        raise VoxflowError(f"bbox_zyx must hold 3 (lo, hi) pairs; got {bbox_zyx!r}")
    for (lo, hi), n in zip(bbox_zyx, arr.shape[-3:], strict=True):
        if not (0 <= lo < hi <= n):
            raise VoxflowError(f"bbox_zyx {bbox_zyx!r} must lie inside the grid {arr.shape[-3:]}")
    index = (Ellipsis, *(slice(lo, hi) for lo, hi in bbox_zyx))
    return arr[index]
