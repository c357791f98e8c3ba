"""Undo preprocessing lazily: resample probabilities back, uncrop, turn them into a label map.

Probabilities go back with :func:`voxflow.preprocess.resample_to_shape` at order 1 (order 0 along
the separate axis of anisotropic plans), nnU-Net's choice for probability maps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import dask.array as da
import numpy as np

from voxflow.errors import VoxflowError
from voxflow.preprocess import resample_to_shape

__all__ = ["background_probabilities", "probabilities_to_label", "uncrop", "undo_preprocessing"]

log = logging.getLogger(__name__)


def background_probabilities(n_outputs: int, activation: str) -> list[float]:
    """The probabilities of a voxel outside the crop box: 1 for softmax class 0, else 0."""
    return [1.0 if (activation == "softmax" and c == 0) else 0.0 for c in range(n_outputs)]


def uncrop(
    probs: da.Array,
    crop_bbox_zyx: Sequence[Sequence[int]],
    original_shape_zyx: Sequence[int],
    *,
    background: Sequence[float],
) -> da.Array:
    """Place (K, z, y, x) probabilities of the crop box into the original (K, Z, Y, X) grid; voxels
    outside the box get ``background[k]`` for channel k (1 for softmax class 0, else 0)."""
    pad = [(0, 0)] + [(int(lo), int(n) - int(hi)) for (lo, hi), n in zip(crop_bbox_zyx, original_shape_zyx)]
    if any(p < 0 for pair in pad for p in pair):
        raise VoxflowError(
            f"crop_bbox_zyx {crop_bbox_zyx!r} must lie inside the original shape {tuple(original_shape_zyx)!r}."
        )
    if all(p == (0, 0) for p in pad):
        return probs
    parts = [
        da.pad(probs[k : k + 1], pad, mode="constant", constant_values=float(background[k]))
        for k in range(probs.shape[0])
    ]
    return da.concatenate(parts, axis=0)


def undo_preprocessing(
    probs: da.Array,
    *,
    shape_after_crop_zyx: Sequence[int],
    crop_bbox_zyx: Sequence[Sequence[int]],
    original_shape_zyx: Sequence[int],
    activation: str = "softmax",
    separate_axis: int | None = None,
    out_chunks_zyx: Sequence[int] = (64, 128, 128),
) -> da.Array:
    """(K, z', y', x') probabilities on the preprocessed grid -> (K, Z, Y, X) on the original grid.

    Linear resampling back to the cropped shape (nearest along ``separate_axis`` for anisotropic
    plans), then uncropping; the result is float32, chunked ``(K, *out_chunks_zyx)``.
    """
    k = probs.shape[0]
    back = resample_to_shape(
        probs, shape_after_crop_zyx, order=1, separate_axis=separate_axis, separate_order=0, out_chunks=out_chunks_zyx
    )
    full = uncrop(
        back.astype(np.float32), crop_bbox_zyx, original_shape_zyx, background=background_probabilities(k, activation)
    )
    chunks = (k, *(min(int(c), int(n)) for c, n in zip(out_chunks_zyx, original_shape_zyx)))
    return full.rechunk(chunks)


def _regions_to_label(p: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    seg = np.zeros(p.shape[1:], np.uint8)
    for i, value in enumerate(order):
        seg[p[i] > 0.5] = value
    return seg


def probabilities_to_label(probs: da.Array, *, regions_class_order: Sequence[int] | None = None) -> da.Array:
    """(K, Z, Y, X) probabilities -> (Z, Y, X) uint8 labels.

    Softmax outputs: the argmax class index (class k is label value k). Region outputs (sigmoid):
    voxels with region i above 0.5 get ``regions_class_order[i]``, later regions overwrite earlier.
    """
    probs = probs.rechunk({0: -1})
    meta = np.empty((0, 0, 0), np.uint8)
    if regions_class_order is None:
        return da.map_blocks(
            lambda p: np.argmax(p, axis=0).astype(np.uint8), probs, drop_axis=0, dtype=np.uint8, meta=meta
        )
    order = tuple(int(v) for v in regions_class_order)
    if len(order) != probs.shape[0]:
        raise VoxflowError(
            f"regions_class_order must have one value per region output ({probs.shape[0]}); "
            f"got {order!r}. Fix regions_class_order in dataset.json."
        )
    return da.map_blocks(_regions_to_label, probs, order, drop_axis=0, dtype=np.uint8, meta=meta)
