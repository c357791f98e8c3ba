from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from voxflow.errors import VoxflowError
from voxflow.infer import probabilities_to_label, uncrop, undo_preprocessing
from voxflow.preprocess import zoom_reference
from voxflow.testing import raise_if_computes


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(0))
    return (e / e.sum(0)).astype(np.float32)


@pytest.mark.parametrize("chunks", [(3, 7, 6, 5), (3, 4, 3, 9)])
def test_undo_preprocessing_is_lazy_and_matches_scipy(chunks: tuple[int, ...], rng: np.random.Generator) -> None:
    probs = _softmax(rng.normal(size=(3, 9, 14, 11)))
    bbox = ((2, 15), (1, 21), (0, 17))
    with raise_if_computes():
        lazy = undo_preprocessing(
            da.from_array(probs, chunks=chunks),
            shape_after_crop_zyx=(13, 20, 17),
            crop_bbox_zyx=bbox,
            original_shape_zyx=(18, 22, 17),
            out_chunks_zyx=(7, 6, 5),
        )
    back = np.stack([zoom_reference(p, (13, 20, 17), order=1) for p in probs])
    expected = np.zeros((3, 18, 22, 17), np.float32)
    expected[0] = 1.0
    expected[:, 2:15, 1:21, 0:17] = back
    got = lazy.compute()
    assert lazy.dtype == np.float32
    assert lazy.chunksize == (3, 7, 6, 5)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_undo_preprocessing_of_regions_pads_with_zero(rng: np.random.Generator) -> None:
    probs = rng.uniform(size=(2, 4, 5, 6)).astype(np.float32)
    out = undo_preprocessing(
        da.from_array(probs),
        shape_after_crop_zyx=(4, 5, 6),
        crop_bbox_zyx=((1, 5), (0, 5), (0, 6)),
        original_shape_zyx=(6, 5, 6),
        activation="sigmoid",
    ).compute()
    np.testing.assert_array_equal(out[:, [0, 5]], 0.0)
    np.testing.assert_allclose(out[:, 1:5], probs, atol=1e-7)


def test_uncrop_rejects_box_outside_the_volume() -> None:
    with pytest.raises(VoxflowError, match="must lie inside"):
        uncrop(da.zeros((2, 4, 4, 4)), ((0, 4), (0, 4), (2, 6)), (4, 4, 5), background=(1, 0))


@pytest.mark.parametrize("chunks", [(4, 7, 6, 5), (2, 3, 3, 3)])
def test_probabilities_to_label_argmax(chunks: tuple[int, ...], rng: np.random.Generator) -> None:
    probs = _softmax(rng.normal(size=(4, 9, 8, 7)))
    with raise_if_computes():
        lab = probabilities_to_label(da.from_array(probs, chunks=chunks))
    assert lab.dtype == np.uint8
    np.testing.assert_array_equal(lab.compute(), probs.argmax(0))


def test_probabilities_to_label_regions(rng: np.random.Generator) -> None:
    probs = rng.uniform(size=(3, 6, 5, 4)).astype(np.float32)
    expected = np.zeros((6, 5, 4), np.uint8)
    for i, value in enumerate((1, 2, 3)):
        expected[probs[i] > 0.5] = value
    lab = probabilities_to_label(da.from_array(probs, chunks=(1, 3, 3, 3)), regions_class_order=(1, 2, 3))
    np.testing.assert_array_equal(lab.compute(), expected)
    with pytest.raises(VoxflowError, match="one value per region"):
        probabilities_to_label(da.from_array(probs), regions_class_order=(1, 2))
