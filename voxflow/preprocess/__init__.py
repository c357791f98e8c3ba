"""Preprocessing as lazy Dask graphs: crop to the nonzero box, normalise, resample; foreground index.

* :func:`resample_to_shape` / :func:`resample_label_to_shape` -- chunk-exact against
  ``scipy.ndimage.zoom(x, out/in, order, mode="nearest", grid_mode=True)`` on the whole array
  (nnU-Net / skimage ``resize`` coordinates: voxel centres aligned at the grid edges,
  ``c = (j + 0.5) * n_in / n_out - 0.5``; edge values beyond the grid). Inference resamples back
  with the same function, so the mapping is the same both ways. See :mod:`._resample`.
* :func:`normalize` -- per channel, per the plan's :class:`~voxflow.plan.ChannelNormalization`;
  per-image statistics are reductions inside the same graph.
* :func:`preprocess_case` -- one case, lazy: crop -> normalise -> resample (+ label, fg index).
* :func:`previous_onto_grid` / :func:`one_hot_channels` -- a cascade's first-stage segmentation
  on the second stage's grid, as one-hot input channels.
* :func:`run_preprocess` -- dataset store -> preprocessed store, resumable, on any scheduler.

Memory: every task holds a few chunks; the graph as a whole keeps at most about one output
z-slab of intermediates (chunk depth x the in-plane extent), measured at ~0.3 GB over the
interpreter for a 1 GB volume (``tests/preprocess/test_bounded_memory.py``,
``benchmarks/preprocess.py``).
"""

from voxflow.preprocess._case import PreprocessedCase, preprocess_case, preprocessed_chunks, target_shape
from voxflow.preprocess._crop import BBox, crop, nonzero_bbox, nonzero_mask
from voxflow.preprocess._foreground import foreground_index
from voxflow.preprocess._normalize import normalize
from voxflow.preprocess._previous import one_hot_channels, previous_onto_grid
from voxflow.preprocess._resample import (
    axis_operator,
    resample_label_to_shape,
    resample_to_shape,
    zoom_reference,
)
from voxflow.preprocess._run import run_preprocess

__all__ = [
    "BBox",
    "PreprocessedCase",
    "axis_operator",
    "crop",
    "foreground_index",
    "nonzero_bbox",
    "nonzero_mask",
    "normalize",
    "one_hot_channels",
    "preprocess_case",
    "preprocessed_chunks",
    "previous_onto_grid",
    "resample_label_to_shape",
    "resample_to_shape",
    "run_preprocess",
    "target_shape",
    "zoom_reference",
]
