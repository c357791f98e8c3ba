from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from voxflow.errors import VoxflowError
from voxflow.plan.schema import ChannelNormalization
from voxflow.preprocess import crop, nonzero_bbox, normalize
from voxflow.testing import raise_if_computes


def _image(rng) -> np.ndarray:
    x = np.zeros((2, 13, 17, 11), np.float32)
    x[0, 2:11, 3:15, 1:9] = rng.normal(300, 40, size=(9, 12, 8))
    x[1, 4:12, 5:10, 2:10] = rng.normal(-5, 2, size=(8, 5, 8))
    return x


def test_nonzero_bbox_and_crop_match_numpy(rng) -> None:
    x = _image(rng)
    lazy = da.from_array(x, chunks=(1, 5, 6, 4))
    box = nonzero_bbox(lazy)
    nz = np.argwhere(np.any(x != 0, axis=0))
    expected = tuple((int(lo), int(hi) + 1) for lo, hi in zip(nz.min(0), nz.max(0), strict=True))
    assert box == expected
    with raise_if_computes():
        cropped = crop(lazy, box)
    np.testing.assert_array_equal(cropped.compute(), x[(slice(None), *(slice(a, b) for a, b in box))])
    assert nonzero_bbox(da.zeros((1, 3, 4, 5), chunks=2)) == ((0, 3), (0, 4), (0, 5))
    with pytest.raises(VoxflowError, match="inside the grid"):
        crop(lazy, ((0, 14), (0, 17), (0, 11)))


def _eager(x: np.ndarray, spec: ChannelNormalization, mask: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    if spec.scheme == "ct":
        return (np.clip(x, spec.lower, spec.upper) - spec.mean) / spec.std
    if spec.scheme == "none":
        return x
    sel = x[mask] if spec.use_mask else x.ravel()
    if spec.scheme == "zscore":
        out = (x - sel.mean()) / max(sel.std(), 1e-8)
    else:
        out = (x - sel.min()) / max(sel.max() - sel.min(), 1e-8)
    return np.where(mask, out, 0.0) if spec.use_mask else out


@pytest.mark.parametrize(
    "specs",
    [
        (ChannelNormalization(scheme="zscore", use_mask=True), ChannelNormalization(scheme="zscore")),
        (
            ChannelNormalization(scheme="ct", mean=250.0, std=30.0, lower=200.0, upper=380.0),
            ChannelNormalization(scheme="rescale_0_1", use_mask=True),
        ),
        (ChannelNormalization(scheme="none"), ChannelNormalization(scheme="rescale_0_1")),
    ],
)
def test_normalize_matches_numpy_and_is_lazy(specs, rng) -> None:
    x = _image(rng)
    with raise_if_computes():
        lazy = normalize(da.from_array(x, chunks=(1, 7, 6, 5)), specs)
    got = lazy.compute()
    assert got.dtype == np.float32
    assert got.shape == x.shape
    mask = np.any(x != 0, axis=0)
    for c, spec in enumerate(specs):
        np.testing.assert_allclose(got[c], _eager(x[c], spec, mask), rtol=1e-5, atol=1e-5)


def test_normalize_statistics_read_separately_from_output(rng) -> None:
    """The stats branch is a clone: output tasks depend on the stats scalars, not on shared reads."""
    x = da.from_array(_image(rng), chunks=(1, 7, 6, 5))
    out = normalize(x, (ChannelNormalization(scheme="zscore"), ChannelNormalization(scheme="zscore")))
    keys = {k[0] if isinstance(k, tuple) else k for k in dict(out.__dask_graph__())}
    assert not any(str(k) == x.name for k in keys)  # the source was re-keyed (bound to the stats)


def test_normalize_requires_one_spec_per_channel(rng) -> None:
    with pytest.raises(VoxflowError, match="one normalization per channel"):
        normalize(da.from_array(_image(rng)), (ChannelNormalization(scheme="none"),))
