from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.spatial.distance import cdist

from voxflow.evaluate import confusion_matrix, overlap_metrics, region_counts, surface_metrics
from voxflow.testing import raise_if_computes

SPACING = (2.5, 0.8, 0.8)


def sphere(shape: tuple[int, int, int], spacing: tuple[float, ...], radius_mm: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"))
    centre = np.array([n * s / 2 for n, s in zip(shape, spacing, strict=True)])[:, None, None, None]
    return ((grid - centre) ** 2).sum(0) <= radius_mm**2


@pytest.mark.parametrize(("k", "axis"), [(1, 0), (2, 0), (3, 1), (5, 2)])
def test_spheres_offset_by_k_voxels(k: int, axis: int) -> None:
    radius = 10.0
    ref = sphere((20, 40, 40), SPACING, radius)
    pred = np.roll(ref, k, axis=axis)
    d = k * SPACING[axis]
    cm = dask.compute(
        confusion_matrix(
            da.from_array(pred.astype(np.uint8), chunks=(7, 9, 11)),
            da.from_array(ref.astype(np.uint8), chunks=(5, 8, 13)),
            3,
        )
    )[0]
    m = overlap_metrics(**region_counts(cm, (1,)), voxel_volume_mm3=float(np.prod(SPACING)))
    # Dice of two balls of radius r whose centres are d apart: lens volume / ball volume
    analytic = (math.pi * (4 * radius + d) * (2 * radius - d) ** 2 / 12) / (4 / 3 * math.pi * radius**3)
    assert m["dice"] == pytest.approx(analytic, abs=0.015)
    assert m["tp"] == int((pred & ref).sum())
    assert m["volume_diff_mm3"] == 0.0
    s = surface_metrics(pred, ref, SPACING, tolerance_mm=1.0)
    assert s["hd_mm"] == pytest.approx(d)
    assert 0.85 * d <= s["hd95_mm"] <= d + 1e-9
    assert 0 < s["assd_mm"] < d


def test_empty_cases_follow_nnunet() -> None:
    empty = np.zeros((5, 6, 7), bool)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = True
    both_empty = overlap_metrics(0, 0, 0, 210)
    assert math.isnan(both_empty["dice"])
    assert math.isnan(both_empty["iou"])
    assert math.isnan(both_empty["precision"])
    assert math.isnan(both_empty["recall"])
    missed = overlap_metrics(0, 0, 8, 202)  # empty prediction, reference present
    assert missed["dice"] == 0.0
    assert missed["recall"] == 0.0
    assert math.isnan(missed["precision"])
    spurious = overlap_metrics(0, 8, 0, 202)
    assert spurious["dice"] == 0.0
    assert spurious["precision"] == 0.0
    assert math.isnan(spurious["recall"])
    s = surface_metrics(empty, empty, (1, 1, 1))
    assert math.isnan(s["hd95_mm"])
    assert math.isnan(s["nsd"])
    s = surface_metrics(empty, full, (1, 1, 1))
    assert math.isnan(s["hd95_mm"])
    assert math.isnan(s["assd_mm"])
    assert s["nsd"] == 0.0


def reference_surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tol: float
) -> dict[str, float]:
    """Brute force: surface = mask minus its 6-neighbour erosion, all pairwise distances in mm."""

    def surface_points(m: np.ndarray) -> np.ndarray:
        padded = np.pad(m, 1)
        inner = padded.copy()
        for ax in range(3):
            for shift in (1, -1):
                inner &= np.roll(padded, shift, axis=ax)
        surf = (padded & ~inner)[1:-1, 1:-1, 1:-1]
        return np.argwhere(surf) * np.asarray(spacing)

    sp, sr = surface_points(pred), surface_points(ref)
    dist = cdist(sp, sr)
    d_pr, d_rp = dist.min(1), dist.min(0)
    both = np.concatenate([d_pr, d_rp])
    return {
        "hd95_mm": max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)),
        "hd_mm": both.max(),
        "assd_mm": both.mean(),
        "nsd": float((both <= tol).mean()),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_metrics_agree_with_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pred = ndi.binary_opening(rng.random((14, 15, 16)) < 0.55)
    ref = ndi.binary_opening(rng.random((14, 15, 16)) < 0.55)
    spacing = (1.7, 0.6, 0.9)
    ours = surface_metrics(pred, ref, spacing, tolerance_mm=1.0)
    expected = reference_surface_metrics(pred, ref, spacing, 1.0)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-9), key


def test_surface_metrics_on_a_crop_equal_the_whole_array() -> None:
    rng = np.random.default_rng(5)
    pred = np.zeros((30, 30, 30), bool)
    ref = np.zeros_like(pred)
    pred[10:16, 8:20, 5:9] = rng.random((6, 12, 4)) < 0.8
    ref[11:17, 9:19, 5:10] = rng.random((6, 10, 5)) < 0.8
    whole = surface_metrics(pred, ref, SPACING)
    box = (slice(9, 18), slice(7, 21), slice(4, 11))
    assert surface_metrics(pred[box], ref[box], SPACING) == pytest.approx(whole)


def test_confusion_matrix_is_lazy_chunked_and_exact(rng: np.random.Generator) -> None:
    pred = rng.integers(0, 5, size=(13, 14, 15)).astype(np.uint8)
    ref = rng.integers(0, 4, size=(13, 14, 15)).astype(np.uint16)
    with raise_if_computes():
        lazy = confusion_matrix(da.from_array(pred, chunks=(4, 5, 6)), da.from_array(ref, chunks=(7, 3, 8)), 4)
    (cm,) = dask.compute(lazy)
    expected = np.zeros((4, 4), np.int64)
    np.add.at(expected, (np.minimum(ref, 3), np.minimum(pred, 3)), 1)
    np.testing.assert_array_equal(cm, expected)
    c = region_counts(cm, (1, 2))
    p, r = np.isin(pred, (1, 2)), np.isin(ref, (1, 2))
    assert c == {
        "tp": int((p & r).sum()),
        "fp": int((p & ~r).sum()),
        "fn": int((~p & r).sum()),
        "tn": int((~p & ~r).sum()),
    }


def test_overlap_metrics_agree_with_numpy_on_random_masks(rng: np.random.Generator) -> None:
    p, r = rng.random((9, 10, 11)) < 0.3, rng.random((9, 10, 11)) < 0.4
    tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
    m = overlap_metrics(tp, fp, fn, voxel_volume_mm3=0.5)
    assert m["dice"] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()))
    assert m["iou"] == pytest.approx((p & r).sum() / (p | r).sum())
    assert m["volume_pred_mm3"] == pytest.approx(p.sum() * 0.5)
    assert m["volume_diff_mm3"] == pytest.approx((p.sum() - r.sum()) * 0.5)


def test_case_graph_builds_without_computing(rng: np.random.Generator) -> None:
    from voxflow.evaluate._evaluate import _case_graph
    from voxflow.evaluate._io import Segmentation
    from voxflow.geometry import Geometry

    geom = Geometry(shape_zyx=(9, 10, 11), spacing_zyx=(1.0, 1.0, 1.0))
    arr = da.from_array(rng.integers(0, 3, size=(9, 10, 11)).astype(np.uint8), chunks=(4, 5, 6))
    seg = Segmentation("c", arr, geom, "mem")
    with raise_if_computes():
        graph = _case_graph(seg, seg, [(1,), (1, 2)], surface=True)
    assert isinstance(graph["matrix"], da.Array)
