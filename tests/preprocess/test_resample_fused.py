"""Orders 0 and 1 resample every output chunk in one task from its input footprint (no per-axis
intermediate arrays): bit-identical to one pass per axis, equal to scipy's zoom, lazy."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from voxflow.preprocess import _resample as R
from voxflow.preprocess import resample_label_to_shape, resample_to_shape
from voxflow.testing import raise_if_computes


def _per_axis(
    x: da.Array, out_shape: tuple[int, ...], axes: list[tuple[int, int]], target: tuple[int, ...]
) -> da.Array:
    for axis, order in axes:
        x = R._resample_axis(x, x.ndim - 3 + axis, out_shape[axis], order, target[axis])
    return x


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "chunks", "separate_axis"),
    [
        ((13, 17, 11), (26, 33, 23), (7, 6, 5), None),  # upsampling (a cascade's probabilities going back)
        ((24, 20, 16), (11, 13, 9), (7, 6, 5), None),  # downsampling
        ((9, 20, 16), (20, 15, 16), (4, 7, 16), 0),  # anisotropic: order 0 along z, one axis unchanged
    ],
)
def test_fused_orders_0_1_are_bit_identical_to_per_axis_passes(
    in_shape: tuple[int, int, int],
    out_shape: tuple[int, int, int],
    chunks: tuple[int, int, int],
    separate_axis: int | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, *in_shape), dtype=np.float32)
    lazy = da.from_array(x, chunks=(2, *chunks))
    with raise_if_computes():
        fused = resample_to_shape(lazy, out_shape, order=1, separate_axis=separate_axis, out_chunks=(5, 8, 6))
    got = fused.compute()
    monkeypatch.setattr(R, "_resample_axes", _per_axis)
    reference = resample_to_shape(lazy, out_shape, order=1, separate_axis=separate_axis, out_chunks=(5, 8, 6))
    np.testing.assert_array_equal(got, reference.compute())
    assert got.shape == (3, *out_shape)
    assert fused.chunks[0] == (2, 1)  # channel chunks kept
    if separate_axis is None:
        zoomed = np.stack([R.zoom_reference(c, out_shape, order=1) for c in x])
        np.testing.assert_allclose(got, zoomed, rtol=1e-5, atol=1e-6)


def test_fused_label_resampling_matches_per_axis(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, size=(14, 19, 12)).astype(np.uint8)
    lazy = da.from_array(label, chunks=(7, 6, 5))
    out = {}
    for order in (0, 1):
        out[order] = resample_label_to_shape(lazy, (25, 11, 20), values=[0, 1, 2], order=order).compute()
    monkeypatch.setattr(R, "_resample_axes", _per_axis)
    for order in (0, 1):
        ref = resample_label_to_shape(lazy, (25, 11, 20), values=[0, 1, 2], order=order).compute()
        np.testing.assert_array_equal(out[order], ref)
        assert out[order].dtype == np.uint8
    np.testing.assert_array_equal(out[0], R.zoom_reference(label, (25, 11, 20), order=0))
