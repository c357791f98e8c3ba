"""Label-map operations built on chunked connected components; all lazy (dask in, dask out).

A *target* says which voxels form the structure an operation acts on:

* an ``int`` -- one class value,
* a tuple of ints -- a region (the union of these values, nnU-Net style),
* ``"foreground"`` -- every nonzero value together.

Removed voxels become background (0); filled holes take the class value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import dask.array as da
import numpy as np

from voxflow.errors import PostprocessingError
from voxflow.postprocess._components import (
    ComponentTables,
    PendingFilter,
    filter_components,
    finish_filters,
    prepare_filter,
)

__all__ = [
    "Target",
    "fill_holes",
    "fill_holes_mask",
    "keep_largest_component",
    "parse_target",
    "prepare_fill_holes",
    "prepare_keep_largest",
    "prepare_remove_small",
    "remove_small_components",
    "target_mask",
    "target_name",
]

Target = int | tuple[int, ...] | str


def parse_target(value: Any) -> Target:
    """Normalise a target from JSON/CLI: ``1``, ``"1"``, ``[1, 2]``, ``"1+2"`` or ``"foreground"``."""
    if isinstance(value, str):
        if value in ("foreground", "all"):
            return "foreground"
        parts = value.replace("+", ",").split(",")
        try:
            ints = tuple(int(p) for p in parts if p.strip())
        except ValueError:
            raise PostprocessingError(
                f"target must be a class value, a region like '1+2' or 'foreground'; got {value!r}"
            ) from None
        return ints[0] if len(ints) == 1 else ints
    if isinstance(value, (list, tuple)):
        ints = tuple(int(v) for v in value)
        return ints[0] if len(ints) == 1 else ints
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise PostprocessingError(f"target must be an int, a list of ints or 'foreground'; got {value!r}")


def target_name(target: Target) -> str:
    """``1``, ``1+2`` or ``foreground``: the key a target has in JSON summaries."""
    if isinstance(target, tuple):
        return "+".join(str(v) for v in target)
    return str(target)


def target_mask(label: da.Array, target: Target) -> da.Array:
    """Boolean mask of the voxels belonging to ``target`` (lazy)."""
    if target == "foreground":
        return cast(da.Array, label > 0)
    if isinstance(target, tuple):
        return cast(da.Array, da.isin(label, np.asarray(target, dtype=label.dtype)))
    if isinstance(target, int):
        return cast(da.Array, label == target)
    raise PostprocessingError(f"unknown target {target!r}")


def _largest(tables: ComponentTables) -> np.ndarray:
    keep = np.zeros(tables.n + 1, dtype=bool)
    if tables.n and tables.sizes_vox is not None:
        keep[1 + int(np.argmax(tables.sizes_vox[1:]))] = True
    return keep


class _AtLeast:
    """Picklable decision: keep components with at least ``min_vox`` voxels."""

    def __init__(self, min_vox: float):
        self.min_vox = min_vox

    def __call__(self, tables: ComponentTables) -> np.ndarray:
        assert tables.sizes_vox is not None  # requested with sizes=True
        return tables.sizes_vox >= self.min_vox


def _enclosed(tables: ComponentTables) -> np.ndarray:
    assert tables.touches_border is not None  # always built
    return ~tables.touches_border


def _drop_unkept(label: da.Array, mask: da.Array, kept: da.Array) -> da.Array:
    return cast(da.Array, da.where(mask & ~kept, label.dtype.type(0), label))


def prepare_keep_largest(label: da.Array, target: Target = "foreground", *, connectivity: int = 1) -> PendingFilter:
    """Lazy first half of :func:`keep_largest_component` (for batching with :func:`finish_filters`)."""
    return prepare_filter(label, _TargetMask(target), _largest, _drop_unkept, connectivity=connectivity, sizes=True)


def keep_largest_component(label: da.Array, target: Target = "foreground", *, connectivity: int = 1) -> da.Array:
    """Keep only the largest connected component of ``target``; its other voxels become 0.

    ``label`` is an integer label map (``(Z, Y, X)`` or ``(Y, X)``), lazy. Ties keep the component
    with the smallest label (first in block order). The summary pass over ``label`` runs now
    (streaming); the result is lazy.
    """
    return finish_filters([prepare_keep_largest(label, target, connectivity=connectivity)])[0]


def prepare_remove_small(
    label: da.Array,
    target: Target = "foreground",
    *,
    min_size_vox: float | None = None,
    min_size_mm3: float | None = None,
    spacing: Sequence[float] | None = None,
    connectivity: int = 1,
) -> PendingFilter:
    """Lazy first half of :func:`remove_small_components`."""
    if min_size_mm3 is not None:
        if spacing is None:
            raise PostprocessingError("remove_small_components with min_size_mm3 needs spacing (mm per voxel)")
        min_size_vox = float(min_size_mm3) / float(np.prod(spacing))
    if min_size_vox is None or min_size_vox < 0:
        raise PostprocessingError(f"min_size_vox must be >= 0 (or give min_size_mm3); got {min_size_vox!r}")
    return prepare_filter(
        label, _TargetMask(target), _AtLeast(float(min_size_vox)), _drop_unkept, connectivity=connectivity, sizes=True
    )


def remove_small_components(
    label: da.Array,
    target: Target = "foreground",
    *,
    min_size_vox: float | None = None,
    min_size_mm3: float | None = None,
    spacing: Sequence[float] | None = None,
    connectivity: int = 1,
) -> da.Array:
    """Set components of ``target`` smaller than a threshold to 0 (summary pass now, result lazy).

    Give ``min_size_vox`` (voxels), or ``min_size_mm3`` with ``spacing`` (mm per voxel, array order).
    """
    return finish_filters(
        [
            prepare_remove_small(
                label,
                target,
                min_size_vox=min_size_vox,
                min_size_mm3=min_size_mm3,
                spacing=spacing,
                connectivity=connectivity,
            )
        ]
    )[0]


class _Outside:
    """Mask of the voxels not in class ``target``; in-plane for a (1, Y, X) image."""

    def __init__(self, target: int, squeeze: bool):
        self.target, self.squeeze = target, squeeze

    def __call__(self, label: da.Array) -> da.Array:
        outside = label != self.target
        return cast(da.Array, outside[0] if self.squeeze else outside)


class _Fill:
    def __init__(self, target: int, squeeze: bool):
        self.target, self.squeeze = target, squeeze

    def __call__(self, label: da.Array, _outside: da.Array, enclosed: da.Array) -> da.Array:
        if self.squeeze:
            enclosed = enclosed[None]
        return cast(da.Array, da.where(enclosed & (label == 0), label.dtype.type(self.target), label))


def prepare_fill_holes(label: da.Array, target: int, *, connectivity: int = 1) -> PendingFilter:
    """Lazy first half of :func:`fill_holes`."""
    if not isinstance(target, int):
        raise PostprocessingError(f"fill_holes works on one class value; got target {target!r}")
    squeeze = label.ndim == 3 and label.shape[0] == 1  # a 2D image stored as (1, Y, X): holes are in-plane
    conn = _in_plane(connectivity) if squeeze else connectivity
    return prepare_filter(
        label, _Outside(target, squeeze), _enclosed, _Fill(target, squeeze), connectivity=conn, sizes=False
    )


def fill_holes(label: da.Array, target: int, *, connectivity: int = 1) -> da.Array:
    """Fill the holes of class ``target``: background voxels it encloses become ``target``.

    A hole is a connected component (``connectivity``) of voxels *not* in ``target`` that does not
    touch the array border -- as ``scipy.ndimage.binary_fill_holes`` with the same structure; a
    ``(1, Y, X)`` image is treated as 2D. Only voxels that are background (0) in the hole are
    filled; other classes inside it are kept. Summary pass now, result lazy.
    """
    return finish_filters([prepare_fill_holes(label, target, connectivity=connectivity)])[0]


def fill_holes_mask(mask: da.Array, *, connectivity: int = 1) -> da.Array:
    """Boolean ``mask`` with its holes filled (``scipy.ndimage.binary_fill_holes``, chunked)."""
    if mask.ndim == 3 and mask.shape[0] == 1:
        return cast(da.Array, fill_holes_mask(mask[0], connectivity=_in_plane(connectivity))[None])
    return filter_components(
        mask.astype(bool), _invert, _enclosed, _or_enclosed, connectivity=connectivity, sizes=False
    )


def _invert(mask: da.Array) -> da.Array:
    return cast(da.Array, ~mask)


def _or_enclosed(mask: da.Array, _outside: da.Array, enclosed: da.Array) -> da.Array:
    return cast(da.Array, mask | enclosed)


class _TargetMask:
    def __init__(self, target: Target):
        self.target = target

    def __call__(self, label: da.Array) -> da.Array:
        return target_mask(label, self.target)


def _in_plane(connectivity: int) -> int:
    """The 2D connectivity rank matching a 3D one (6 -> 4-neighbours, 18/26 -> 8-neighbours)."""
    rank = {6: 1, 18: 2, 26: 3, 4: 1, 8: 2}.get(int(connectivity), int(connectivity))
    return min(rank, 2)
