from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi

from voxflow.postprocess import (
    Operation,
    PostprocessingError,
    PostprocessingSpec,
    apply_postprocessing,
    fill_holes,
    fill_holes_mask,
    keep_largest_component,
    remove_small_components,
)
from voxflow.postprocess._ops import prepare_fill_holes, prepare_keep_largest
from voxflow.postprocess._spec import prepare_operation
from voxflow.testing import raise_if_computes


def hand_made() -> np.ndarray:
    """Class 1: a 3x3x3 cube and a single voxel; class 2: a 2x2x2 cube and a 1x1x2 bar."""
    lab = np.zeros((10, 11, 12), np.uint8)
    lab[1:4, 1:4, 1:4] = 1
    lab[8, 9, 10] = 1
    lab[6:8, 1:3, 6:8] = 2
    lab[1, 8, 5:7] = 2
    return lab


def test_keep_largest_per_class_is_lazy_and_exact() -> None:
    lab = hand_made()
    with raise_if_computes():  # building the summary pass computes nothing
        prepare_keep_largest(da.from_array(lab, chunks=(3, 4, 5)), 1)
    out1 = keep_largest_component(da.from_array(lab, chunks=(3, 4, 5)), 1)
    with raise_if_computes():  # the summary pass ran; the result itself is lazy
        out1.sum()
    out2 = keep_largest_component(out1, 2)
    expected = lab.copy()
    expected[8, 9, 10] = 0
    expected[1, 8, 5:7] = 0
    np.testing.assert_array_equal(out2.compute(), expected)
    assert out2.dtype == lab.dtype


def test_keep_largest_foreground_and_region() -> None:
    lab = hand_made()
    lab[4, 2, 2] = 2  # touches the class-1 cube: together they form the largest foreground component
    x = da.from_array(lab, chunks=(3, 4, 5))
    fg = keep_largest_component(x, "foreground").compute()
    expected = np.zeros_like(lab)
    expected[1:4, 1:4, 1:4] = 1
    expected[4, 2, 2] = 2
    np.testing.assert_array_equal(fg, expected)
    region = keep_largest_component(x, (1, 2)).compute()
    np.testing.assert_array_equal(region, expected)


def test_keep_largest_connectivity_matters() -> None:
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    lab[3, 3, 3] = 1  # corner neighbour of the cube
    lab[5, 0, 5] = 1
    out6 = keep_largest_component(da.from_array(lab, chunks=2), 1, connectivity=1).compute()
    out26 = keep_largest_component(da.from_array(lab, chunks=2), 1, connectivity=3).compute()
    assert out6[3, 3, 3] == 0
    assert out26[3, 3, 3] == 1
    assert out6[5, 0, 5] == 0


def test_remove_small_components_by_voxels_and_mm3() -> None:
    lab = hand_made()
    x = da.from_array(lab, chunks=(3, 4, 5))
    out = remove_small_components(x, 2, min_size_vox=3).compute()
    expected = lab.copy()
    expected[1, 8, 5:7] = 0
    np.testing.assert_array_equal(out, expected)
    # 2 mm3 per voxel: components under 5 mm3 (= 2.5 voxels) of any class go
    out_mm = remove_small_components(x, "foreground", min_size_mm3=5.0, spacing=(2.0, 1.0, 1.0)).compute()
    expected[8, 9, 10] = 0
    np.testing.assert_array_equal(out_mm, expected)
    with pytest.raises(PostprocessingError, match="spacing"):
        remove_small_components(x, 1, min_size_mm3=5.0)


def test_fill_holes_hand_made_keeps_other_classes() -> None:
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[1:8, 1:8, 1:8] = 1
    lab[3:6, 3:6, 3:6] = 0  # a cavity ...
    lab[4, 4, 4] = 2  # ... holding a lesion voxel
    lab[0:3, 0:3, 0] = 0
    out = fill_holes(da.from_array(lab, chunks=(4, 3, 5)), 1).compute()
    expected = lab.copy()
    expected[3:6, 3:6, 3:6] = 1
    expected[4, 4, 4] = 2
    np.testing.assert_array_equal(out, expected)
    # a cavity joined to the outside by a one-voxel tunnel is not a hole
    lab[4, 4, 1:3] = 0
    out2 = fill_holes(da.from_array(lab, chunks=(4, 3, 5)), 1).compute()
    np.testing.assert_array_equal(out2, lab)


@pytest.mark.parametrize("connectivity", [1, 3])
def test_fill_holes_mask_matches_scipy(connectivity: int, rng: np.random.Generator) -> None:
    x = rng.random((16, 17, 18)) < (0.93 if connectivity == 3 else 0.75)
    with raise_if_computes():
        prepare_fill_holes(da.from_array(x.astype(np.uint8), chunks=(5, 6, 7)), 1, connectivity=connectivity)
    lazy = fill_holes_mask(da.from_array(x, chunks=(5, 6, 7)), connectivity=connectivity)
    ref = ndi.binary_fill_holes(x, structure=ndi.generate_binary_structure(3, connectivity))
    assert ref.sum() > x.sum()  # the test has holes to fill
    np.testing.assert_array_equal(lazy.compute(), ref)


def test_fill_holes_2d_image_stored_as_single_slice() -> None:
    lab = np.zeros((1, 7, 7), np.uint8)
    lab[0, 1:6, 1:6] = 1
    lab[0, 3, 3] = 0
    out = fill_holes(da.from_array(lab, chunks=(1, 3, 4)), 1).compute()
    assert out[0, 3, 3] == 1
    np.testing.assert_array_equal(fill_holes_mask(da.from_array(lab > 0, chunks=(1, 3, 4))).compute(), out > 0)


def test_spec_roundtrip_apply_and_errors(tmp_path) -> None:
    spec = PostprocessingSpec(
        operations=(
            Operation(op="keep_largest", target="foreground"),
            Operation(op="remove_small", target=[2], min_size_mm3=3.0),
            Operation(op="fill_holes", target="1"),
        ),
        connectivity=1,
    )
    spec.save(tmp_path / "pp.json")
    loaded = PostprocessingSpec.load(tmp_path / "pp.json")
    assert loaded == spec
    assert loaded.operations[1].target == 2
    lab = hand_made()
    with raise_if_computes():
        for op in loaded.operations:
            prepare_operation(da.from_array(lab, chunks=(3, 4, 5)), op, spacing=(1, 1, 1))
    out = apply_postprocessing(da.from_array(lab, chunks=(3, 4, 5)), tmp_path / "pp.json", spacing=(1, 1, 1))
    expected = np.zeros_like(lab)
    expected[1:4, 1:4, 1:4] = 1
    np.testing.assert_array_equal(out.compute(), expected)
    with pytest.raises(PostprocessingError, match="Did you mean 'keep_largest'"):
        Operation(op="keep_larges", target=1)
    with pytest.raises(PostprocessingError, match="one class value"):
        Operation(op="fill_holes", target=[1, 2])
