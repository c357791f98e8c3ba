from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxflow.errors import VoxflowError
from voxflow.infer import gaussian_importance_map, tile_grid, tile_starts


@pytest.mark.parametrize(
    ("size", "patch", "expected"),
    [
        (16, 8, [0, 4, 8]),
        (11, 4, [0, 2, 4, 5, 7]),
        (8, 8, [0]),
        (5, 8, [0]),
        (9, 8, [0, 1]),
    ],
)
def test_tile_starts_known_cases(size: int, patch: int, expected: list[int]) -> None:
    assert tile_starts(size, patch, step=0.5) == expected


@pytest.mark.parametrize("step", [0.0, 1.5, -0.5])
def test_tile_starts_rejects_bad_step(step: float) -> None:
    with pytest.raises(VoxflowError, match="step must be in"):
        tile_starts(20, 8, step=step)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 200), patch=st.integers(1, 64), step=st.floats(0.1, 1.0))
def test_tile_starts_cover_axis_within_step(size: int, patch: int, step: float) -> None:
    starts = tile_starts(size, patch, step=step)
    assert starts[0] == 0
    assert starts[-1] == max(size - patch, 0)
    gaps = np.diff(starts)
    assert (gaps > 0).all()
    assert (gaps <= np.ceil(step * patch)).all()
    covered = np.zeros(max(size, patch), bool)
    for s in starts:
        covered[s : s + patch] = True
    assert covered.all()


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 40)] * 3), patch=st.tuples(*[st.integers(1, 16)] * 3))
def test_tiles_cover_every_voxel_with_positive_weight(shape: tuple[int, int, int], patch: tuple[int, int, int]) -> None:
    grid = tile_grid(shape, patch, step=0.5)
    gauss = gaussian_importance_map(patch)
    weight = np.zeros(shape)
    for start in grid.tiles():
        vol, loc = grid.region(start)
        weight[tuple(slice(a, b) for a, b in vol)] += gauss[tuple(slice(a, b) for a, b in loc)]
    assert (weight > 0).all()
    assert len(grid) == len(grid.tiles())


def test_region_of_volume_smaller_than_patch_is_centred() -> None:
    grid = tile_grid((3, 20, 9), (8, 8, 8))
    assert grid.padded_shape_zyx == (8, 20, 9)
    assert grid.pad_lo_zyx == (2, 0, 0)
    vol, loc = grid.region(grid.tiles()[0])
    assert vol == ((0, 3), (0, 8), (0, 8))
    assert loc == ((2, 5), (0, 8), (0, 8))


def test_gaussian_matches_definition() -> None:
    patch = (6, 9, 16)
    g = gaussian_importance_map(patch, min_value=1e-3)
    # the definition, voxel by voxel
    ref = np.empty(patch)
    for idx in np.ndindex(*patch):
        e = sum((i - (p - 1) / 2) ** 2 / (2 * (p / 8) ** 2) for i, p in zip(idx, patch, strict=True))
        ref[idx] = np.exp(-e)
    np.testing.assert_allclose(g, np.maximum(ref / ref.max(), 1e-3), rtol=1e-6)
    assert g.dtype == np.float32
    assert g.max() == pytest.approx(1.0)
    assert g.min() == pytest.approx(1e-3)
    np.testing.assert_array_equal(g, g[::-1, ::-1, ::-1])


def test_gaussian_is_never_zero_and_peaks_in_centre() -> None:
    g = gaussian_importance_map((64, 64, 64), min_value=1e-5)
    assert g.min() >= 1e-5
    np.testing.assert_array_equal(g[31:33, 31:33, 31:33], g.max())


@pytest.mark.parametrize(("shape", "patch", "step"), [((5, 40, 37), (8, 16, 16), 0.5), ((33, 9, 70), (6, 16, 8), 0.3)])
def test_start_array_and_volume_boxes_match_tiles_and_region(shape, patch, step) -> None:  # noqa: ANN001
    grid = tile_grid(shape, patch, step=step)
    starts = grid.start_array()
    assert starts.shape == (len(grid), 3)
    assert [tuple(r) for r in starts.tolist()] == grid.tiles()
    boxes = grid.volume_boxes(starts)
    assert [tuple(map(tuple, b)) for b in boxes.tolist()] == [grid.region(s)[0] for s in grid.tiles()]
