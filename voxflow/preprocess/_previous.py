"""A cascade's previous-stage segmentation on the next stage's grid, and its one-hot channels.

The first stage (``3d_lowres``) writes its label map on the case's original grid, like any
prediction. The second stage (``3d_cascade_fullres``) needs it on its own preprocessed grid: the
same crop and the same label resampling as the case's reference label in preprocessing
(:func:`~voxflow.preprocess.preprocess_case`: each class one-hot, ``label_order``, argmax),
which is how nnU-Net preprocesses ``segs_from_prev_stage`` at inference. Both functions are lazy
and chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np

from voxflow.errors import VoxflowError
from voxflow.plan.schema import Configuration
from voxflow.preprocess._crop import BBox, crop
from voxflow.preprocess._resample import resample_label_to_shape

__all__ = ["one_hot_channels", "previous_onto_grid"]


def previous_onto_grid(
    label: da.Array,
    config: Configuration,
    *,
    crop_bbox_zyx: BBox,
    out_shape_zyx: Sequence[int],
    values: Sequence[int],
    out_chunks: Sequence[int] | None = None,
) -> da.Array:
    """Crop a (Z, Y, X) label map of the original grid to ``crop_bbox_zyx`` and resample it to
    ``out_shape_zyx`` (voxels, z-y-x) as preprocessing resamples labels; uint8, lazy.

    ``values``: the label values to keep besides the background (others become background).
    """
    if label.ndim != 3:
        raise VoxflowError(f"a previous-stage segmentation must be a (Z, Y, X) label map; got shape {label.shape}")
    res = config.resampling
    sep = res.separate_axis if res.separate_z else None
    lab = crop(label, crop_bbox_zyx)
    out = resample_label_to_shape(
        lab,
        tuple(int(s) for s in out_shape_zyx),
        values=sorted({0, *values}),
        order=res.label_order,
        separate_axis=sep,
        separate_order=res.separate_order,
        out_chunks=out_chunks,
    )
    return out.astype(np.uint8)


def one_hot_channels(label: da.Array, values: Sequence[int], *, dtype: type = np.float32) -> da.Array:
    """(K, Z, Y, X) channels ``label == v`` for each of ``values`` (K of them), lazy; chunks follow
    ``label``'s spatial chunks with all K channels in one chunk."""
    if not values:
        raise VoxflowError("one_hot_channels needs at least one label value; got none")
    chans = [(label == int(v)).astype(dtype) for v in values]
    return da.stack(chans, axis=0).rechunk({0: len(values)})
