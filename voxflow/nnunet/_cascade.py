"""A cascade's extra input: the previous stage's segmentation as one-hot channels, as nnU-Net makes it.

nnU-Net (``DefaultPreprocessor.run_case`` with ``seg_file``, then ``convert_labelmap_to_one_hot``
over the foreground labels) crops the previous stage's label map (on the original grid) with the
image's nonzero box, marks background outside the nonzero mask as -1, resamples it *as a
segmentation* to the cascade's grid and one-hot encodes the foreground labels. Its segmentation
resampling (batchgenerators' ``resize_segmentation``) zooms every present label's indicator (seg
order, linear) and takes the per-voxel argmax; an exact tie goes to the nearest-neighbour label if
that is one of the tied labels, else to the smallest. With a separate (anisotropic) axis that
happens in the plane; along the axis it gathers (order 0) or, for ``order_z > 0``, zooms each
label's indicator and writes it where ``> 0.5``, larger labels last.

Here the same runs lazily, chunk by chunk: the indicators of -1, 0 and every foreground label are
zoomed (:func:`voxflow.preprocess.resample_to_shape`, float32), the winner is picked per block.
The nonzero mask is not hole-filled as in nnU-Net (as for ``use_mask_for_norm``).
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np

from voxflow.preprocess import BBox, crop, resample_to_shape

__all__ = ["pick_labels", "previous_stage_onehot"]

_OUTSIDE = -1  # nnU-Net's value for background outside the nonzero mask (crop_to_nonzero)


def pick_labels(scores: np.ndarray, nearest: np.ndarray, *, values: np.ndarray, n_lead: int) -> np.ndarray:
    """One-hot (V - n_lead, ...) float32 of the winning label per voxel.

    ``scores``: (V, ...) zoomed indicators of the increasing label ``values``; ``nearest``: (...) or
    (1, ...) the nearest-neighbour label. Winner: the argmax (first maximum), unless the nearest label's
    score equals the maximum and is positive. The first ``n_lead`` values get no channel.
    """
    nearest = nearest.reshape(scores.shape[1:])
    top = scores.max(axis=0)
    win = np.argmax(scores, axis=0)
    nn = np.clip(np.searchsorted(values, nearest), 0, len(values) - 1)
    s_nn = np.take_along_axis(scores, nn[None], axis=0)[0]
    win = np.where((s_nn == top) & (s_nn > 0) & (values[nn] == nearest), nn, win)
    return (win[None] == np.arange(n_lead, len(values)).reshape((-1,) + (1,) * win.ndim)).astype(np.float32)


def exclusive_labels(hits: np.ndarray) -> np.ndarray:
    """(L, ...) bool masks of increasing label values -> float32 one-hot where the largest hit wins."""
    later = np.flip(np.logical_or.accumulate(np.flip(hits, axis=0), axis=0), axis=0)
    won = hits.copy()
    won[:-1] &= ~later[1:]
    return won.astype(np.float32)


def _resize_segmentation(
    seg: da.Array,
    values: np.ndarray,
    n_lead: int,
    shape_zyx: tuple[int, ...],
    *,
    order: int,
    out_chunks: Sequence[int] | None,
) -> da.Array:
    """Foreground one-hot of a (z, y, x) label map resized like ``resize_segmentation`` (lazy)."""
    if tuple(seg.shape) == shape_zyx or order == 0:
        near = (
            seg if tuple(seg.shape) == shape_zyx else resample_to_shape(seg, shape_zyx, order=0, out_chunks=out_chunks)
        )
        return da.stack([near == v for v in values[n_lead:]]).astype(np.float32)
    scores = resample_to_shape(da.stack([seg == v for v in values]), shape_zyx, order=order, out_chunks=out_chunks)
    near = resample_to_shape(seg, shape_zyx, order=0, out_chunks=out_chunks)
    return da.map_blocks(
        pick_labels,
        scores.rechunk({0: -1}),
        near[None],
        values=values.astype(np.float32),
        n_lead=n_lead,
        dtype=np.float32,
        chunks=((len(values) - n_lead,), *scores.chunks[1:]),
        meta=np.empty((0,) * 4, dtype=np.float32),
    )


def _along_axis(
    onehot: da.Array, shape_zyx: tuple[int, ...], *, order_z: int, out_chunks: Sequence[int] | None
) -> da.Array:
    """The separate axis: gather (order 0), or per-label zoom written where ``> 0.5``, larger last."""
    if tuple(onehot.shape[1:]) == shape_zyx:
        return onehot
    zoomed = resample_to_shape(onehot, shape_zyx, order=order_z, out_chunks=out_chunks)
    if order_z == 0:
        return zoomed
    return (zoomed > 0.5).rechunk({0: -1}).map_blocks(exclusive_labels, dtype=np.float32)


def previous_stage_onehot(
    label: da.Array,
    bbox_zyx: BBox,
    out_shape_zyx: Sequence[int],
    *,
    labels: Sequence[int],
    nonzero: da.Array | None = None,
    order: int = 1,
    separate_axis: int | None = None,
    order_z: int = 0,
    out_chunks: Sequence[int] | None = None,
) -> da.Array:
    """(L, Z, Y, X) float32 one-hot channels of a previous stage's (Z, Y, X) label map, lazy.

    ``label`` and ``nonzero`` (the image's nonzero mask; None: all nonzero) lie on the case's
    original grid; ``bbox_zyx`` is the image's nonzero box (nnU-Net's crop), ``out_shape_zyx`` the
    cascade's preprocessed shape; one channel per value of ``labels`` (nnU-Net's foreground labels).
    ``order``: the plans' seg resampling order; ``separate_axis`` (0 = z) is resampled afterwards
    with ``order_z``, as nnU-Net's ``resample_data_or_seg(is_seg=True)`` does.
    """
    fg = sorted(int(v) for v in labels)
    seg = crop(label, bbox_zyx).astype(np.float32)
    if nonzero is not None:
        seg = da.where((seg == 0) & ~crop(nonzero, bbox_zyx), np.float32(_OUTSIDE), seg)
    values = np.asarray([_OUTSIDE, 0, *fg], dtype=np.float64)
    out = tuple(int(s) for s in out_shape_zyx)
    plane = list(out)
    if separate_axis is not None:
        plane[separate_axis] = int(seg.shape[separate_axis])
    onehot = _resize_segmentation(seg, values, 2, tuple(plane), order=order, out_chunks=out_chunks)
    onehot = _along_axis(onehot, out, order_z=order_z, out_chunks=out_chunks)
    if out_chunks is not None:
        onehot = onehot.rechunk((len(fg), *(int(c) for c in out_chunks)))
    return onehot
