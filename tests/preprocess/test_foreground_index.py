from __future__ import annotations

import dask.array as da
import numpy as np

from voxflow.preprocess import foreground_index
from voxflow.preprocess._foreground import foreground_index_eager
from voxflow.testing import raise_if_computes, synthetic_case


def test_foreground_index_is_bounded_valid_and_chunking_independent(rng) -> None:
    _, label = synthetic_case((15, 22, 19), n_labels=2, rng=rng)
    label[0, 0, 0] = 7
    with raise_if_computes():
        lazy = foreground_index(da.from_array(label, chunks=(4, 7, 5)), max_per_class=50, seed=3)
    index, present = lazy.compute()
    assert index.dtype == np.int32
    assert index.shape[1] == 4
    assert present == sorted(np.unique(label).tolist())
    for v in (1, 2, 7):
        rows = index[index[:, 0] == v]
        assert len(rows) == min(50, int((label == v).sum()))
        assert (label[rows[:, 1], rows[:, 2], rows[:, 3]] == v).all()
        assert len({tuple(r) for r in rows}) == len(rows)
    other, _ = foreground_index(da.from_array(label, chunks=(15, 5, 19)), max_per_class=50, seed=3).compute()
    np.testing.assert_array_equal(index, other)
    np.testing.assert_array_equal(index, foreground_index_eager(label, max_per_class=50, seed=3)[0])
    reseeded, _ = foreground_index(da.from_array(label, chunks=(4, 7, 5)), max_per_class=50, seed=4).compute()
    assert not np.array_equal(index, reseeded)


def test_foreground_index_of_empty_label() -> None:
    index, present = foreground_index(da.zeros((5, 6, 7), dtype=np.uint8, chunks=3)).compute()
    assert index.shape == (0, 4)
    assert present == [0]
