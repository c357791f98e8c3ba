"""Segmentation metrics: overlap from chunk-wise counts, surface distances on the structure's box.

Conventions (as nnU-Net for the overlap metrics):

* Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN); both are NaN when prediction and
  reference are empty (nothing to score; excluded from means), and 0 when only one is empty.
* precision = TP / (TP + FP) is NaN for an empty prediction; recall = TP / (TP + FN) NaN for an
  empty reference.
* Volumes are voxel counts times the voxel volume in mm^3; ``volume_diff_mm3`` = pred - ref.
* Surfaces are the voxels of a mask removed by one binary erosion (face connectivity; voxels on
  the array border count as surface). Distances from one surface to the other use the exact
  Euclidean distance transform with the voxel spacing, in mm.
* HD95 = max of the two directed 95th percentiles (as MONAI), ``hd_mm`` the plain Hausdorff
  distance, ASSD the mean of all distances in both directions, NSD (normalised surface Dice at
  ``tolerance_mm``) the fraction of surface voxels of both masks within the tolerance of the
  other surface. Surface metrics are NaN when either mask is empty (NSD: NaN if both are empty,
  0 if only one is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import dask
import dask.array as da
import numpy as np
import scipy.ndimage as ndi

__all__ = [
    "confusion_matrix",
    "overlap_metrics",
    "projections",
    "region_counts",
    "surface_metrics",
]

NAN = float("nan")


def _block_hist(pred: np.ndarray, ref: np.ndarray, n_values: int) -> np.ndarray:
    p = np.minimum(pred.astype(np.int64, copy=False), n_values - 1).ravel()
    r = np.minimum(ref.astype(np.int64, copy=False), n_values - 1).ravel()
    return np.bincount(r * n_values + p, minlength=n_values * n_values)


def confusion_matrix(pred: da.Array, ref: da.Array, n_values: int) -> da.Array:
    """Lazy ``(n_values, n_values)`` int64 voxel counts: rows reference value, columns prediction.

    Values ``>= n_values - 1`` share the last bin. Computed block by block (``ref`` is rechunked
    like ``pred``); only the small histograms meet in memory.
    """
    ref = ref.rechunk(pred.chunks)
    hist = dask.delayed(_block_hist, pure=True)
    parts = [hist(p, r, n_values) for p, r in zip(pred.to_delayed().ravel(), ref.to_delayed().ravel(), strict=True)]
    total = dask.delayed(_sum_hists, pure=True)(parts, n_values)
    # an Array, not a Delayed: dask 2026.8 misorders dask.compute results that mix the two
    return cast(da.Array, da.from_delayed(total, shape=(n_values, n_values), dtype=np.int64))


def _sum_hists(hists: list[np.ndarray], n_values: int) -> np.ndarray:
    return cast(np.ndarray, np.sum(hists, axis=0).reshape(n_values, n_values))


def region_counts(matrix: np.ndarray, values: Sequence[int]) -> dict[str, int]:
    """TP, FP, FN, TN voxel counts of the region formed by ``values`` from a confusion matrix."""
    inside = np.zeros(matrix.shape[0], dtype=bool)
    inside[[v for v in values if v < matrix.shape[0]]] = True
    tp = int(matrix[np.ix_(inside, inside)].sum())
    fp = int(matrix[np.ix_(~inside, inside)].sum())
    fn = int(matrix[np.ix_(inside, ~inside)].sum())
    tn = int(matrix.sum()) - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else NAN


def overlap_metrics(tp: int, fp: int, fn: int, tn: int = 0, *, voxel_volume_mm3: float = 1.0) -> dict[str, float]:
    """Dice, IoU, precision, recall, volumes from counts (conventions in the module docstring)."""
    n_pred, n_ref = tp + fp, tp + fn
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, n_pred),
        "recall": _ratio(tp, n_ref),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "n_pred": n_pred,
        "n_ref": n_ref,
        "volume_pred_mm3": n_pred * voxel_volume_mm3,
        "volume_ref_mm3": n_ref * voxel_volume_mm3,
        "volume_diff_mm3": (n_pred - n_ref) * voxel_volume_mm3,
    }


def projections(mask: da.Array) -> list[da.Array]:
    """Per axis, the lazy 1-D ``any`` of ``mask`` over the other axes (gives its bounding box)."""
    axes = range(mask.ndim)
    return [mask.any(axis=tuple(a for a in axes if a != ax)) for ax in axes]


def bounding_box(profiles: Sequence[np.ndarray], *, pad: int = 1) -> tuple[slice, ...] | None:
    """Slices of the box holding every True of the 1-D ``profiles``, padded; ``None`` when empty."""
    box = []
    for prof in profiles:
        idx = np.flatnonzero(prof)
        if idx.size == 0:
            return None
        box.append(slice(max(0, int(idx[0]) - pad), min(len(prof), int(idx[-1]) + 1 + pad)))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndi.generate_binary_structure(mask.ndim, 1)
    return cast(np.ndarray, mask & ~ndi.binary_erosion(mask, structure=structure, border_value=0))


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to ``ref``'s surface, and back."""
    sp, sr = _surface(pred.astype(bool)), _surface(ref.astype(bool))
    to_ref = ndi.distance_transform_edt(~sr, sampling=spacing)[sp]
    to_pred = ndi.distance_transform_edt(~sp, sampling=spacing)[sr]
    return to_ref, to_pred


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], *, tolerance_mm: float = 1.0
) -> dict[str, float]:
    """HD95, Hausdorff, ASSD (mm) and NSD at ``tolerance_mm`` of two boolean masks (numpy).

    ``pred`` and ``ref`` may be a crop of the full volume that holds both masks with one voxel
    to spare (or touches the array border where they do): the result is then the same.
    """
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    empty_p, empty_r = not pred.any(), not ref.any()
    if empty_p or empty_r:
        nsd = NAN if empty_p and empty_r else 0.0
        return {"hd95_mm": NAN, "hd_mm": NAN, "assd_mm": NAN, "nsd": nsd}
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    both = np.concatenate([d_pr, d_rp])
    return {
        "hd95_mm": float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))),
        "hd_mm": float(both.max()),
        "assd_mm": float(both.mean()),
        "nsd": float(np.count_nonzero(both <= tolerance_mm + 1e-9) / both.size),
    }


def nan_to_none(value: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become ``None`` (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
