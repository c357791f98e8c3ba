"""nnU-Net's preprocessing and tile weights, reproduced on dask arrays.

voxflow's crop -> normalise -> resample equals nnU-Net's ``DefaultPreprocessor`` (both resample
like ``scipy.ndimage.zoom(..., grid_mode=True, mode="nearest")``) except for one detail: nnU-Net
resamples images with ``skimage.transform.resize``, which clips its output to the input's value
range -- per channel, or per slice along the separate axis for anisotropic data. Order-3
overshoot at clipped CT values (many voxels sit exactly at the percentile bounds) would otherwise
differ. :func:`clip_like_skimage` applies that clip lazily, given bounds computed beforehand.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np
import scipy.ndimage as ndi

from voxflow.geometry import Geometry
from voxflow.plan.schema import Configuration
from voxflow.preprocess import BBox, axis_operator, crop, normalize, resample_to_shape, target_shape

__all__ = ["clip_bounds", "clip_like_skimage", "nnunet_gaussian", "normalized_crop", "resample_like_nnunet"]


def nnunet_gaussian(
    patch_size_vox: Sequence[int], *, sigma_scale: float = 1.0 / 8, value_scaling_factor: float = 10.0
) -> np.ndarray:
    """nnU-Net's tile weights (``compute_gaussian``), float32 holding its float16 values.

    A unit impulse at ``p // 2`` per axis smoothed with ``sigma = p * sigma_scale`` (``mode=
    "constant"``, scipy's truncation), scaled to a peak of ``value_scaling_factor``, rounded to
    float16; zeros are replaced by the smallest nonzero weight.
    """
    patch = tuple(int(p) for p in patch_size_vox)
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1.0
    g = ndi.gaussian_filter(impulse, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    g = (g / (g.max() / value_scaling_factor)).astype(np.float16)
    g[g == 0] = g[g != 0].min()
    return g.astype(np.float32)


def normalized_crop(image: da.Array, bbox_zyx: BBox, config: Configuration) -> da.Array:
    """(C, z, y, x) float32: ``image`` cropped to ``bbox_zyx`` and normalised per the plan (lazy)."""
    return normalize(crop(image, bbox_zyx), config.normalization)


def clip_bounds(normalized: da.Array, separate_axis: int | None) -> tuple[da.Array, da.Array]:
    """Lazy per-channel (C,) min and max, or per channel and slice (C, n) along ``separate_axis``."""
    if separate_axis is None:
        axes: tuple[int, ...] = (1, 2, 3)
    else:
        axes = tuple(a for a in (1, 2, 3) if a != separate_axis + 1)
    return normalized.min(axis=axes), normalized.max(axis=axes)


def clip_like_skimage(
    resampled: da.Array, lo: np.ndarray, hi: np.ndarray, *, n_in: int | None = None, separate_axis: int | None = None
) -> da.Array:
    """Clip resampled (C, Z, Y, X) data to the input range as skimage's ``resize`` does (lazy).

    ``lo``/``hi`` are (C,) per channel, or (C, n_in) per input slice along ``separate_axis``: an
    output slice takes the bounds of the input slice it was copied from (order 0 along that axis).
    """
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    if separate_axis is None:
        shape = (-1, 1, 1, 1)
        return da.clip(resampled, lo.reshape(shape), hi.reshape(shape)).astype(np.float32)
    n_out = resampled.shape[1 + separate_axis]
    src = np.argmax(axis_operator(int(n_in or lo.shape[1]), int(n_out), 0), axis=1)
    per_slice = [lo.shape[0], 1, 1, 1]
    per_slice[1 + separate_axis] = n_out
    return da.clip(resampled, lo[:, src].reshape(per_slice), hi[:, src].reshape(per_slice)).astype(np.float32)


def resample_like_nnunet(
    normalized: da.Array,
    geometry: Geometry,
    config: Configuration,
    bounds: tuple[np.ndarray, np.ndarray] | None,
    out_chunks: Sequence[int] | None = None,
) -> da.Array:
    """Resample a normalised crop to the configuration's spacing as nnU-Net does (lazy, float32).

    ``geometry`` is the *original* case geometry (its spacing); ``bounds`` from :func:`clip_bounds`
    (computed), or None to skip the clip. Nothing changes when the shape is already the target.
    """
    shape_in = tuple(int(s) for s in normalized.shape[1:])
    out_shape = target_shape(shape_in, geometry.spacing_zyx, config)
    if out_shape == shape_in:
        return normalized.astype(np.float32)
    res = config.resampling
    sep = res.separate_axis if res.separate_z else None
    out = resample_to_shape(
        normalized,
        out_shape,
        order=res.image_order,
        separate_axis=sep,
        separate_order=res.separate_order,
        out_chunks=out_chunks,
    )
    if bounds is None or res.image_order == 0:
        return out
    return clip_like_skimage(
        out, bounds[0], bounds[1], n_in=shape_in[sep] if sep is not None else None, separate_axis=sep
    )
