from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

from voxflow.errors import VoxflowError
from voxflow.preprocess import resample_label_to_shape, resample_to_shape, zoom_reference
from voxflow.testing import raise_if_computes

CASES = [  # (in shape, out shape, input chunks, output chunks): up, down, non-integer, anisotropic
    ((23, 31, 17), (40, 13, 17), (7, 6, 5), (6, 7, 5)),
    ((30, 30, 30), (17, 45, 29), (8, 11, 7), (9, 9, 9)),
    ((12, 40, 36), (31, 20, 36), (12, 5, 13), (31, 6, 11)),
    ((9, 16, 16), (9, 16, 16), (4, 5, 6), (4, 5, 6)),
]


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize(("shape", "out", "chunks", "out_chunks"), CASES)
def test_resample_matches_whole_array_scipy(shape, out, chunks, out_chunks, order, rng) -> None:
    x = rng.normal(size=shape).astype(np.float32) * 100
    with raise_if_computes():
        lazy = resample_to_shape(da.from_array(x, chunks=chunks), out, order=order, out_chunks=out_chunks)
    assert lazy.shape == out
    assert lazy.dtype == np.float32
    assert all(max(c) <= oc for c, oc in zip(lazy.chunks, out_chunks, strict=True))
    ref = ndi.zoom(x, [o / i for o, i in zip(out, shape, strict=True)], order=order, mode="nearest", grid_mode=True)
    got = lazy.compute()
    assert np.abs(got - ref).max() <= 1e-4 * np.ptp(x)


def test_resample_keeps_channels_and_int_input(rng) -> None:
    x = rng.integers(0, 1000, size=(2, 10, 12, 14)).astype(np.int16)
    lazy = resample_to_shape(da.from_array(x, chunks=(1, 4, 5, 6)), (15, 7, 20), order=1)
    got = lazy.compute()
    assert got.shape == (2, 15, 7, 20)
    assert got.dtype == np.float32
    for c in range(2):
        ref = zoom_reference(x[c].astype(np.float32), (15, 7, 20), order=1)
        np.testing.assert_allclose(got[c], ref, atol=1e-4 * 1000)


@pytest.mark.parametrize("sep_order", [0, 1])
def test_separate_axis_is_inplane_then_axis(rng, sep_order) -> None:
    x = rng.normal(size=(9, 20, 22)).astype(np.float32)
    out = (21, 13, 30)
    lazy = resample_to_shape(
        da.from_array(x, chunks=(4, 7, 6)), out, order=3, separate_axis=0, separate_order=sep_order
    )
    inplane = zoom_reference(x, (9, 13, 30), order=3)
    ref = zoom_reference(inplane, out, order=sep_order)
    np.testing.assert_allclose(lazy.compute(), ref, atol=1e-4 * np.ptp(x))


def _label_oracle(label: np.ndarray, out, values, order) -> tuple[np.ndarray, np.ndarray]:
    stack = np.stack([zoom_reference((label == v).astype(np.float64), out, order=order) for v in values])
    top2 = np.sort(stack, axis=0)[-2:]
    return np.asarray(values)[np.argmax(stack, axis=0)], (top2[1] - top2[0]) < 1e-5


@pytest.mark.parametrize(("out", "chunks"), [((19, 31, 9), (5, 7, 4)), ((7, 11, 30), (3, 4, 13))])
def test_label_resampling_one_hot_matches_scipy_across_chunk_borders(out, chunks, rng) -> None:
    from voxflow.testing import synthetic_case

    _, label = synthetic_case((13, 22, 17), n_labels=3, rng=rng)
    label[6, 10, 8] = 3  # a one-voxel class on a chunk border
    with raise_if_computes():
        lazy = resample_label_to_shape(
            da.from_array(label, chunks=(6, 10, 8)), out, values=[0, 1, 2, 3], order=1, out_chunks=chunks
        )
    got = lazy.compute()
    ref, ties = _label_oracle(label, out, [0, 1, 2, 3], 1)
    assert got.dtype == np.uint8
    assert np.array_equal(got[~ties], ref[~ties])
    assert set(np.unique(got)) == set(np.unique(ref))


def test_label_nearest_is_exact_gather(rng) -> None:
    label = rng.integers(0, 5, size=(11, 13, 9)).astype(np.uint8)
    lazy = resample_label_to_shape(da.from_array(label, chunks=(4, 5, 3)), (17, 6, 9), values=range(5), order=0)
    np.testing.assert_array_equal(lazy.compute(), zoom_reference(label, (17, 6, 9), order=0))


def test_resample_rejects_bad_arguments() -> None:
    x = da.zeros((4, 4, 4), chunks=2)
    with pytest.raises(VoxflowError, match="out_shape_zyx"):
        resample_to_shape(x, (4, 4), order=1)
    with pytest.raises(VoxflowError, match="order"):
        resample_to_shape(x, (4, 4, 4), order=5)
