"""Block-parallel sliding window (pure parts): every block task together equals the single-process
accumulator bit for bit; block shapes; the duplicated-tile overhead."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from voxflow.infer import TilePredictor, gaussian_importance_map, sliding_window_predict
from voxflow.infer._blocks import (
    TileSchedule,
    block_boxes,
    block_shape,
    duplicated_tile_overhead,
    predict_block,
)


@pytest.fixture(autouse=True)
def _one_torch_thread():  # noqa: ANN202  # tiny convolutions: threads only contend on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, 3, 3, padding=1)).eval()


def _blockwise(
    image: np.ndarray, predictor: TilePredictor, schedule: TileSchedule, block: tuple[int, ...], weights: np.ndarray
) -> tuple[np.ndarray, int]:
    out = np.full((schedule.n_classes, *image.shape[1:]), np.nan, np.float32)
    n_tiles = 0
    for _, core in block_boxes(image.shape[1:], block):
        values, n = predict_block(image, predictor, schedule, core, weights)
        out[(slice(None), *(slice(lo, hi) for lo, hi in core))] = values
        n_tiles += n
    return out, n_tiles


@pytest.mark.parametrize(
    ("shape", "batch", "tta", "cache", "block_bytes"),
    [
        ((21, 37, 29), 1, False, 2**15, 16 * 8 * 8 * 16 * 4),  # small cache: the single path sweeps columns
        ((13, 30, 26), 3, True, 2**20, 16 * 8 * 16 * 8 * 4),  # batches straddle blocks; mirroring
        ((5, 40, 33), 2, False, 2**27, 16 * 4 * 16 * 16 * 4),  # z smaller than the patch: padded tiles
    ],
)
def test_blocks_equal_single_process_bit_for_bit(shape, batch, tta, cache, block_bytes, rng) -> None:  # noqa: ANN001
    image = rng.normal(size=(1, *shape)).astype(np.float32)
    patch, k = (8, 16, 16), 3
    predictor = TilePredictor([_net(0), _net(1)], mirror_axes=(0, 1, 2) if tta else (), activation="softmax")
    chunk = tuple(min(-(-p // 2), s) for p, s in zip(patch, shape, strict=True))
    ref = sliding_window_predict(
        image, predictor, patch_size_vox=patch, n_classes=k, block_zyx=chunk, batch_size=batch, cache_bytes=cache
    )
    schedule = TileSchedule(shape, patch, 0.5, chunk, k, cache, batch)  # type: ignore[arg-type]
    block = block_shape(shape, chunk, k, max_bytes=block_bytes)
    assert len(list(block_boxes(shape, block))) >= 4  # several blocks
    got, n_tiles = _blockwise(image, predictor, schedule, block, gaussian_importance_map(patch))
    np.testing.assert_array_equal(got, ref)  # no tolerance: the same float32 sums in the same order
    assert n_tiles / len(schedule.grid()) == pytest.approx(duplicated_tile_overhead(schedule, block))


def test_block_shape_is_whole_chunks_within_budget() -> None:
    shape, chunk, k = (100, 300, 290), (20, 48, 40), 3
    for max_bytes in (2**20, 16 * 2**20, 2**30):
        block = block_shape(shape, chunk, k, max_bytes=max_bytes)
        assert all(b % c == 0 for b, c in zip(block, chunk, strict=True))
        assert (k + 1) * 4 * np.prod(block) <= max(max_bytes, (k + 1) * 4 * np.prod(chunk))
    assert block_shape(shape, chunk, k, max_bytes=2**40) == (100, 336, 320)  # the volume, in whole chunks
    assert block_shape(shape, chunk, k, max_bytes=1) == chunk  # at least one chunk


def test_bigger_blocks_duplicate_fewer_tiles() -> None:
    shape, patch, k = (64, 96, 96), (16, 32, 32), 3
    chunk = (8, 16, 16)
    schedule = TileSchedule(shape, patch, 0.5, chunk, k, 2**27, 1)  # type: ignore[arg-type]
    overheads = [
        duplicated_tile_overhead(schedule, block_shape(shape, chunk, k, max_bytes=b)) for b in (2**18, 2**21, 2**24)
    ]
    assert overheads[0] > overheads[1] > overheads[2] == 1.0  # one block: every tile once


class _Staged:
    name, names, previous_stage = "3d_cascade_fullres", ["3d_cascade_fullres/fold_0"], object()


@pytest.mark.parametrize(
    ("options", "models", "match"),
    [
        ({"device": "cuda:0,cuda:1"}, [], "one device"),
        ({"whole_image": True}, [], "whole-image"),
        ({}, [_Staged()], "cascades"),
    ],
)
def test_cluster_runs_refuse_what_blocks_cannot_do(options, models, match) -> None:  # noqa: ANN001
    from voxflow.errors import VoxflowError
    from voxflow.infer import PredictOptions
    from voxflow.infer._distributed import block_run

    with pytest.raises(VoxflowError, match=match):
        block_run(None, models, None, PredictOptions(**options))
