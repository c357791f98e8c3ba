"""Chunk-exact, separable resampling of dask arrays to a new grid shape.

Coordinate mapping (the one used everywhere in voxflow, inference's inverse included): the
nnU-Net / ``skimage.transform.resize`` convention, i.e. ``scipy.ndimage.zoom(x, out/in,
order=order, mode="nearest", grid_mode=True)``. Voxel *centres* are aligned at the grid edges:
output index ``j`` along an axis of ``n_in -> n_out`` voxels samples the input at

    c(j) = (j + 0.5) * n_in / n_out - 0.5

and positions outside ``[0, n_in - 1]`` take the edge value (``mode="nearest"``; for spline
order > 1 scipy pads 12 edge voxels before its spline prefilter, which we reproduce exactly).
Resampling back with ``resample_to_shape(y, n_in)`` uses the same rule, so the physical grid of
the preprocessed volume (see :func:`resampled_geometry`) is consistent both ways.

How it stays exact and bounded: a spline zoom is separable, so the 3-D zoom equals three 1-D zooms
applied one axis after the other. Each 1-D zoom is a linear operator ``M`` (``n_out x n_in``)
built by zooming unit impulses with scipy itself, so its weights *are* scipy's (rounding of
order 0, boundary handling, the global order-3 prefilter). ``M`` is banded: entries below
``1e-9`` of a row's largest weight are dropped (the order-3 prefilter decays as 0.268**k, i.e.
a halo of ~16 voxels). Per output chunk the graph reads only the input footprint of its rows
(the halo follows from the band, hence from the order) and applies the block of ``M`` with a
matrix product; order 0 is a gather (exact for any dtype). Axes that shrink are resampled first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import dask.array as da
import numpy as np
import scipy.ndimage as ndi

from voxflow.errors import VoxflowError

__all__ = ["axis_operator", "resample_label_to_shape", "resample_to_shape", "zoom_reference"]

_DROP = 1e-9  # relative weight below which an operator entry is treated as zero


@functools.lru_cache(maxsize=64)
def axis_operator(n_in: int, n_out: int, order: int) -> np.ndarray:
    """The 1-D resampling operator ``M`` (``n_out x n_in``, float64) of ``zoom_reference``.

    Column ``i`` is scipy's 1-D zoom of the unit impulse at ``i``; small entries are zeroed.
    """
    if n_in < 1 or n_out < 1:
        raise VoxflowError(f"axis lengths must be >= 1; got n_in={n_in}, n_out={n_out}")
    m = np.empty((n_out, n_in), dtype=np.float64)
    impulse = np.zeros(n_in, dtype=np.float64)
    for i in range(n_in):
        impulse[i] = 1.0
        m[:, i] = ndi.zoom(impulse, n_out / n_in, order=order, mode="nearest", grid_mode=True)
        impulse[i] = 0.0
    if order == 0:  # make selection exact: one 1 per row
        rows = np.zeros_like(m)
        rows[np.arange(n_out), np.argmax(m, axis=1)] = 1.0
        return rows
    scale = np.abs(m).max(axis=1, keepdims=True)
    m[np.abs(m) < _DROP * scale] = 0.0
    m.setflags(write=False)
    return m


def zoom_reference(x: np.ndarray, out_shape: Sequence[int], *, order: int) -> np.ndarray:
    """Eager whole-array reference: ``scipy.ndimage.zoom`` with voxflow's mapping (tests, baselines)."""
    factors = [o / i for o, i in zip(out_shape, x.shape)]
    return ndi.zoom(x, factors, order=order, mode="nearest", grid_mode=True)


def _axis_footprints(m: np.ndarray, out_chunks: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(out_lo, out_hi, in_lo, in_hi) per output chunk: the input rows that chunk needs."""
    nz = m != 0
    first = np.argmax(nz, axis=1)
    last = m.shape[1] - 1 - np.argmax(nz[:, ::-1], axis=1)
    spans = []
    lo = 0
    for c in out_chunks:
        hi = lo + c
        spans.append((lo, hi, int(first[lo:hi].min()), int(last[lo:hi].max()) + 1))
        lo = hi
    return spans


def _apply_dense(block: np.ndarray, m: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(block, axis, 0)
    out = np.tensordot(m, moved, axes=(1, 0))
    return np.ascontiguousarray(np.moveaxis(out, 0, axis)).astype(np.float32, copy=False)


def _apply_take(block: np.ndarray, idx: np.ndarray, axis: int) -> np.ndarray:
    return np.take(block, idx, axis=axis)


def _resample_axis(x: da.Array, axis: int, n_out: int, order: int, chunks_out: int) -> da.Array:
    """Resample ``x`` along one axis to ``n_out`` voxels; other axes keep their chunks."""
    n_in = x.shape[axis]
    m = axis_operator(n_in, n_out, order)
    out_chunks = _split(n_out, chunks_out)
    pieces = []
    for o_lo, o_hi, i_lo, i_hi in _axis_footprints(m, out_chunks):
        index = [slice(None)] * x.ndim
        index[axis] = slice(i_lo, i_hi)
        slab = x[tuple(index)].rechunk({axis: i_hi - i_lo})
        new_chunks = list(slab.chunks)
        new_chunks[axis] = (o_hi - o_lo,)
        sub = m[o_lo:o_hi, i_lo:i_hi]
        if order == 0:
            idx = np.argmax(sub, axis=1).astype(np.intp)
            piece = slab.map_blocks(_apply_take, idx, axis, chunks=tuple(new_chunks), dtype=x.dtype,
                                    meta=np.empty((0,) * x.ndim, dtype=x.dtype))
        else:
            w = sub.astype(np.float32) if x.dtype == np.float32 else sub
            piece = slab.map_blocks(_apply_dense, w, axis, chunks=tuple(new_chunks), dtype=np.float32,
                                    meta=np.empty((0,) * x.ndim, dtype=np.float32))
        pieces.append(piece)
    return da.concatenate(pieces, axis=axis) if len(pieces) > 1 else pieces[0]


def _split(n: int, chunk: int) -> tuple[int, ...]:
    chunk = max(1, min(int(chunk), n))
    full, rest = divmod(n, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def _plan_axes(in_shape: Sequence[int], out_shape: Sequence[int], order: int, separate_axis: int | None,
               separate_order: int) -> list[tuple[int, int]]:
    """(spatial axis, order) for every axis whose length changes, shrinking axes first."""
    todo = []
    for a, (i, o) in enumerate(zip(in_shape, out_shape)):
        if i != o:
            todo.append((o / i, a, separate_order if a == separate_axis else order))
    return [(a, k) for _, a, k in sorted(todo)]


def _check(arr: da.Array, out_shape_zyx: Sequence[int], order: int, separate_axis: int | None) -> tuple[int, ...]:
    if arr.ndim < 3:
        raise VoxflowError(f"resampling needs an array with (..., Z, Y, X) axes; got shape {arr.shape}")
    out = tuple(int(s) for s in out_shape_zyx)
    if len(out) != 3 or any(s < 1 for s in out):
        raise VoxflowError(f"out_shape_zyx must be 3 positive integers (z, y, x); got {tuple(out_shape_zyx)!r}")
    if order not in (0, 1, 2, 3):
        raise VoxflowError(f"order must be a spline order 0..3; got {order!r}")
    if separate_axis is not None and separate_axis not in (0, 1, 2):
        raise VoxflowError(f"separate_axis must be 0 (z), 1 (y), 2 (x) or None; got {separate_axis!r}")
    return out


def _target_chunks(arr: da.Array, out_shape: tuple[int, ...], out_chunks: Sequence[int] | None) -> tuple[int, ...]:
    if out_chunks is not None:
        return tuple(int(c) for c in out_chunks)[-3:]
    in_shape = arr.shape[-3:]
    return tuple(max(1, math.ceil(max(c) * o / i)) for c, o, i in zip(arr.chunks[-3:], out_shape, in_shape))


def resample_to_shape(arr: da.Array, out_shape_zyx: Sequence[int], *, order: int,
                      separate_axis: int | None = None, separate_order: int = 0,
                      out_chunks: Sequence[int] | None = None) -> da.Array:
    """Resample the last three axes (Z, Y, X) of ``arr`` to ``out_shape_zyx``, lazily, float32.

    Equals ``scipy.ndimage.zoom(x, out/in, order=order, mode="nearest", grid_mode=True)`` on the
    whole array (to float32 rounding), whatever the chunking. With ``separate_axis`` set, that axis
    (0 = z) is resampled with ``separate_order`` instead (nnU-Net's rule for anisotropic data),
    i.e. the reference is an in-plane zoom followed by a zoom along that axis. Leading axes
    (channels) are kept. ``out_chunks`` gives the (z, y, x) chunks of the result (default: the
    input chunks scaled by the zoom).
    """
    out_shape = _check(arr, out_shape_zyx, order, separate_axis)
    target = _target_chunks(arr, out_shape, out_chunks)
    lead = arr.ndim - 3
    x = arr if arr.dtype == np.float32 else arr.astype(np.float32)
    for axis, k in _plan_axes(arr.shape[-3:], out_shape, order, separate_axis, separate_order):
        x = _resample_axis(x, lead + axis, out_shape[axis], k, target[axis])
    return x.rechunk(tuple(arr.chunks[:lead]) + tuple(_split(n, c) for n, c in zip(out_shape, target)))


def _argmax_classes(*channels: np.ndarray, values: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    stacked = np.stack(channels)
    return values[np.argmax(stacked, axis=0)].astype(out_dtype, copy=False)


def resample_label_to_shape(label: da.Array, out_shape_zyx: Sequence[int], *, values: Sequence[int],
                            order: int = 1, separate_axis: int | None = None, separate_order: int = 0,
                            out_chunks: Sequence[int] | None = None) -> da.Array:
    """Resample a (Z, Y, X) label map: each class's one-hot mask with ``order``, then argmax.

    ``values`` lists the label values to keep (background included); a voxel whose value is not
    listed counts as the first value. Ties go to the smaller value (``np.argmax``). With
    ``order=0`` the labels are gathered directly (nearest voxel, exact). Output dtype: the input's.
    """
    out_shape = _check(label, out_shape_zyx, order, separate_axis)
    if label.ndim != 3:
        raise VoxflowError(f"a label map must be (Z, Y, X); got shape {label.shape}")
    target = _target_chunks(label, out_shape, out_chunks)
    final_chunks = tuple(_split(n, c) for n, c in zip(out_shape, target))
    axes = _plan_axes(label.shape, out_shape, order, separate_axis, separate_order)
    if all(k == 0 for _, k in axes):
        x = label
        for axis, _k in axes:
            x = _resample_axis(x, axis, out_shape[axis], 0, target[axis])
        return x.rechunk(final_chunks)
    vals = np.asarray(sorted(int(v) for v in values))
    if vals.size == 0:
        raise VoxflowError("values must list at least one label value (the background)")
    chans = []
    for v in vals:
        onehot = (label == v).astype(np.float32)
        for axis, k in axes:
            onehot = _resample_axis(onehot, axis, out_shape[axis], k, target[axis])
        chans.append(onehot.rechunk(final_chunks))
    return da.map_blocks(_argmax_classes, *chans, values=vals, out_dtype=label.dtype, dtype=label.dtype,
                         meta=np.empty((0, 0, 0), dtype=label.dtype))


def resampled_geometry_spacing(spacing_zyx: Sequence[float], in_shape: Sequence[int],
                               out_shape: Sequence[int]) -> tuple[float, float, float]:
    """Voxel size (mm) of the resampled grid: ``spacing * n_in / n_out`` per axis."""
    return tuple(float(s) * i / o for s, i, o in zip(spacing_zyx, in_shape, out_shape))  # type: ignore[return-value]
