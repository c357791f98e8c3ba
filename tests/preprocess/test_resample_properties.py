"""Property test: chunked resampling equals whole-array scipy for arbitrary shapes and chunkings."""

from __future__ import annotations

import dask.array as da
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from voxflow.preprocess import resample_to_shape, zoom_reference

axis = st.integers(1, 14)


@settings(max_examples=15, deadline=None)
@given(
    shape=st.tuples(axis, axis, axis),
    out=st.tuples(axis, axis, axis),
    order=st.sampled_from([0, 1, 2, 3]),
    chunk=st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(2, 6)),
    out_chunk=st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(2, 6)),
    seed=st.integers(0, 99),
)
def test_resample_equals_scipy_for_any_chunking(shape, out, order, chunk, out_chunk, seed) -> None:
    x = np.random.default_rng(seed).uniform(-5, 5, size=shape).astype(np.float32)
    got = resample_to_shape(da.from_array(x, chunks=chunk), out, order=order, out_chunks=out_chunk).compute()
    ref = zoom_reference(x, out, order=order)
    assert got.shape == tuple(out)
    assert np.abs(got - ref).max() <= 1e-4 * max(float(np.ptp(x)), 1e-6)
