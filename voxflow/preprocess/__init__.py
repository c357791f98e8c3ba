"""Preprocessing as lazy Dask graphs: crop to the nonzero box, normalise, resample; foreground index.

Public API: :func:`resample_to_shape` / :func:`resample_label_to_shape` (chunk-exact against
``scipy.ndimage.zoom(..., mode="nearest", grid_mode=True)``), :func:`normalize`,
:func:`preprocess_case` (lazy, one case) and :func:`run_preprocess` (store -> preprocessed store).
"""

from voxflow.preprocess._case import PreprocessedCase, preprocess_case, preprocessed_chunks, target_shape
from voxflow.preprocess._crop import crop, nonzero_bbox, nonzero_mask
from voxflow.preprocess._foreground import foreground_index
from voxflow.preprocess._normalize import normalize
from voxflow.preprocess._resample import resample_label_to_shape, resample_to_shape, zoom_reference
from voxflow.preprocess._run import run_preprocess

__all__ = [
    "PreprocessedCase",
    "crop",
    "foreground_index",
    "nonzero_bbox",
    "nonzero_mask",
    "normalize",
    "preprocess_case",
    "preprocessed_chunks",
    "resample_label_to_shape",
    "resample_to_shape",
    "run_preprocess",
    "target_shape",
    "zoom_reference",
]
