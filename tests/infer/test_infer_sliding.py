from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from voxflow.infer import (
    TileAccumulator,
    TilePredictor,
    mirror_combinations,
    sliding_window_predict,
    sliding_window_predict_in_memory,
    tile_grid,
)


@pytest.mark.parametrize("shape", [(13, 22, 17), (5, 9, 30)])
@pytest.mark.parametrize(("cache_bytes", "batch_size"), [(2**30, 1), (30_000, 3)])
def test_tiled_zarr_prediction_equals_in_memory_oracle(
    shape: tuple[int, int, int], cache_bytes: int, batch_size: int, rng: np.random.Generator, conv_net
) -> None:  # noqa: ANN001
    """Same tiles + same Gaussian weights, accumulated chunk-wise into Zarr (with spills when the cache
    is tiny) == whole-volume numpy accumulation (nnU-Net style)."""
    pred = TilePredictor(conv_net())
    img = rng.normal(size=(1, *shape)).astype(np.float32)
    ref = sliding_window_predict_in_memory(img, pred, patch_size_vox=(8, 16, 16), n_classes=3)
    out = zarr.create_array(store={}, shape=(3, *shape), chunks=(3, 5, 7, 6), dtype="f4")
    sliding_window_predict(
        zarr.create_array(store={}, data=img, chunks=(1, 7, 6, 5)),
        pred,
        patch_size_vox=(8, 16, 16),
        n_classes=3,
        out=out,
        batch_size=batch_size,
        cache_bytes=cache_bytes,
    )
    np.testing.assert_allclose(out[...], ref, atol=2e-6)
    np.testing.assert_allclose(out[...].sum(0), 1.0, atol=1e-5)


def test_tiled_prediction_equals_one_shot_full_volume(rng: np.random.Generator) -> None:
    """A pointwise network sees no tile borders: tiled == one forward pass on the whole volume."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv3d(2, 6, 1), nn.Tanh(), nn.Conv3d(6, 4, 1))
    pred = TilePredictor(net)
    img = rng.normal(size=(2, 13, 22, 19)).astype(np.float32)
    tiled = sliding_window_predict(
        img, pred, patch_size_vox=(8, 8, 16), n_classes=4, cache_bytes=40_000, block_zyx=(5, 6, 7)
    )
    one_shot = pred(img[None]).numpy()[0]
    np.testing.assert_allclose(tiled, one_shot, atol=2e-6)


def test_scores_a_predictor_keeps_are_not_weighted_in_place(rng: np.random.Generator, conv_net) -> None:  # noqa: ANN001
    """The window weights a TilePredictor's scores in place (its output is its own) and copies any
    other predictor's: a callable that hands out the same buffer every time keeps it intact, and both
    give bit-identical sums."""
    pred = TilePredictor(conv_net())
    assert pred.fresh_output
    img = rng.normal(size=(1, 11, 21, 18)).astype(np.float32)
    args = {"patch_size_vox": (8, 16, 16), "n_classes": 3, "cache_bytes": 40_000, "block_zyx": (5, 6, 7)}
    own = sliding_window_predict(img, pred, **args)
    np.testing.assert_array_equal(sliding_window_predict(img, lambda t: pred(t).clone(), **args), own)
    scores = pred(img[None, :, :8, :16, :16]).numpy().copy()
    before = scores.copy()
    sliding_window_predict(img, lambda t: scores, **args)  # one tile per batch, the same buffer each time
    np.testing.assert_array_equal(scores, before)


def test_volume_smaller_than_patch(rng: np.random.Generator, conv_net) -> None:  # noqa: ANN001
    pred = TilePredictor(conv_net())
    img = rng.normal(size=(1, 3, 5, 7)).astype(np.float32)
    out = sliding_window_predict(img, pred, patch_size_vox=(8, 16, 16), n_classes=3)
    # one tile: the zero-padded volume through the net, cropped back (weights cancel)
    padded = np.zeros((1, 1, 8, 16, 16), np.float32)
    padded[0, :, 2:5, 5:10, 4:11] = img
    expected = pred(padded).numpy()[0][:, 2:5, 5:10, 4:11]
    assert out.shape == (3, 3, 5, 7)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_tta_with_mirror_equivariant_network_changes_nothing(
    rng: np.random.Generator,
    conv_net,  # noqa: ANN001
    symmetric_net,
) -> None:  # noqa: ANN001
    net = symmetric_net(seed=5)
    img = rng.normal(size=(1, 12, 12, 12)).astype(np.float32)
    plain = TilePredictor(net)(img[None]).numpy()
    tta = TilePredictor(net, mirror_axes=(0, 1, 2))(img[None]).numpy()
    np.testing.assert_allclose(tta, plain, atol=1e-6)
    # a network that is not mirror-equivariant does change under TTA (the check above can fail)
    skewed = TilePredictor(conv_net(seed=5), mirror_axes=(0, 1, 2))(img[None]).numpy()
    assert np.abs(skewed - TilePredictor(conv_net(seed=5))(img[None]).numpy()).max() > 1e-4


def test_tta_averages_flipped_predictions(rng: np.random.Generator, conv_net) -> None:  # noqa: ANN001
    net = conv_net(seed=2)
    x = torch.from_numpy(rng.normal(size=(2, 1, 6, 8, 10)).astype(np.float32))
    with torch.no_grad():
        ref = torch.stack(
            [
                torch.flip(torch.softmax(net(torch.flip(x, [a + 2 for a in c])), 1), [a + 2 for a in c])
                for c in mirror_combinations((1, 2))
            ]
        ).mean(0)
    np.testing.assert_allclose(TilePredictor(net, mirror_axes=(2, 1))(x).numpy(), ref.numpy(), atol=1e-6)
    assert mirror_combinations((2, 0)) == [(), (0,), (2,), (0, 2)]


def test_fold_ensemble_averages_probabilities(rng: np.random.Generator, conv_net) -> None:  # noqa: ANN001
    nets = [conv_net(seed=s) for s in (1, 2, 3)]
    x = rng.normal(size=(1, 1, 8, 8, 8)).astype(np.float32)
    mean = np.mean([TilePredictor(n)(x).numpy() for n in nets], axis=0)
    np.testing.assert_allclose(TilePredictor(nets)(x).numpy(), mean, atol=1e-6)


def test_sigmoid_and_2d_networks(rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    net2d = nn.Conv2d(1, 2, 3, padding=1).eval()
    img = rng.normal(size=(1, 4, 20, 18)).astype(np.float32)
    pred = TilePredictor(net2d, activation="sigmoid", spatial_dims=2, mirror_axes=(1, 2))
    out = sliding_window_predict(img, pred, patch_size_vox=(1, 16, 16), n_classes=2, batch_size=4)
    ref = sliding_window_predict_in_memory(img, pred, patch_size_vox=(1, 16, 16), n_classes=2)
    np.testing.assert_allclose(out, ref, atol=2e-6)
    assert ((out > 0) & (out < 1)).all()


def test_accumulator_normalises_and_writes_each_block_once() -> None:
    writes: list[tuple] = []

    class Recorder(np.ndarray):
        def __setitem__(self, key, value):  # noqa: ANN001
            writes.append(key)
            super().__setitem__(key, value)

    out = np.zeros((1, 6, 6, 6), np.float32).view(Recorder)
    boxes = [((0, 4), (0, 6), (0, 6)), ((2, 6), (0, 6), (0, 6))]
    acc = TileAccumulator(out, boxes, block_zyx=(3, 3, 3), cache_bytes=10**6)
    for value, box in zip((2.0, 4.0), boxes, strict=True):
        shape = tuple(b - a for a, b in box)
        acc.add(box, np.full((1, *shape), value * 0.5, np.float32), np.full(shape, 0.5, np.float32))
    assert acc.complete
    assert len(writes) == len(set(map(str, writes))) == 8
    np.testing.assert_allclose(np.asarray(out)[0, :2], 2.0)
    np.testing.assert_allclose(np.asarray(out)[0, 2:4], 3.0)
    np.testing.assert_allclose(np.asarray(out)[0, 4:], 4.0)


def test_accumulator_spills_with_a_small_cache_and_cleans_up(
    tmp_path,
    rng: np.random.Generator,  # noqa: ANN001
    conv_net,
) -> None:  # noqa: ANN001
    pred = TilePredictor(conv_net())
    img = rng.normal(size=(1, 12, 20, 24)).astype(np.float32)
    grid = tile_grid(img.shape[1:], (8, 8, 8))
    boxes = [grid.region(s)[0] for s in grid.tiles()]
    out = np.zeros((3, *img.shape[1:]), np.float32)
    with TileAccumulator(out, boxes, block_zyx=(8, 8, 8), cache_bytes=1, scratch_dir=tmp_path) as acc:
        assert acc.block_nbytes == 4 * 512 * 4
    ref = sliding_window_predict_in_memory(img, pred, patch_size_vox=(8, 8, 8), n_classes=3)
    got = sliding_window_predict(
        img,
        pred,
        patch_size_vox=(8, 8, 8),
        n_classes=3,
        block_zyx=(8, 8, 8),
        cache_bytes=3 * 4 * 512 * 4,
        scratch_dir=tmp_path,
    )
    np.testing.assert_allclose(got, ref, atol=2e-6)
    assert list(tmp_path.iterdir()) == []


def test_custom_importance_map(rng: np.random.Generator, conv_net) -> None:  # noqa: ANN001
    """A uniform map gives the plain mean over overlapping tiles; a wrong map is rejected."""
    pred = TilePredictor(conv_net(seed=9))
    img = rng.normal(size=(1, 6, 12, 12)).astype(np.float32)
    got = sliding_window_predict(
        img, pred, patch_size_vox=(6, 8, 8), n_classes=3, importance_map=np.ones((6, 8, 8), np.float32)
    )
    grid = tile_grid(img.shape[1:], (6, 8, 8))
    acc, n = np.zeros((3, 6, 12, 12)), np.zeros((6, 12, 12))
    for start in grid.tiles():
        sl = tuple(slice(s, s + p) for s, p in zip(start, (6, 8, 8), strict=True))
        acc[(slice(None), *sl)] += pred(img[(slice(None), *sl)][None]).numpy()[0]
        n[sl] += 1
    np.testing.assert_allclose(got, acc / n, atol=1e-6)
    with pytest.raises(ValueError, match="importance_map must have the patch shape"):
        sliding_window_predict(img, pred, patch_size_vox=(6, 8, 8), n_classes=3, importance_map=np.ones((6, 8, 7)))


def test_accumulator_counts_tiles_per_block_like_brute_force(rng: np.random.Generator) -> None:
    shape, block = (23, 17, 30), (4, 5, 7)
    boxes = []
    for _ in range(60):
        lo = [int(rng.integers(0, s)) for s in shape]
        boxes.append(tuple((a, int(rng.integers(a + 1, s + 1))) for a, s in zip(lo, shape, strict=True)))
    acc = TileAccumulator(np.zeros((2, *shape), np.float32), boxes, block_zyx=block)
    expected = np.zeros(acc._remaining.shape, np.int64)
    for box in boxes:
        expected[tuple(slice(lo // b, (hi - 1) // b + 1) for (lo, hi), b in zip(box, block, strict=True))] += 1
    np.testing.assert_array_equal(acc._remaining, expected)
    with pytest.raises(ValueError, match="inside the volume"):
        TileAccumulator(np.zeros((2, *shape), np.float32), [((0, 24), (0, 1), (0, 1))], block_zyx=block)


def test_spilled_blocks_round_trip_exactly_and_reuse_slots(tmp_path, rng: np.random.Generator) -> None:  # noqa: ANN001
    """Random tiles added with a one-block cache (every other block goes to the spill file and back)
    give bit-identical sums to an unbounded cache; freed slots are reused, so the spill file stays
    far smaller than the volume; the file is gone afterwards."""
    shape, block = (16, 24, 40), (4, 8, 8)
    grid = tile_grid(shape, (8, 16, 16), step=0.5)
    boxes = grid.volume_boxes()
    tiles = [(tuple(map(tuple, b)), rng.random((2, *(b[:, 1] - b[:, 0])), dtype=np.float32)) for b in boxes]
    outs = []
    for cache in (2**30, 1):
        out = np.zeros((2, *shape), np.float32)
        with TileAccumulator(out, boxes, block_zyx=block, cache_bytes=cache, scratch_dir=tmp_path) as acc:
            for box, val in tiles:
                acc.add(box, val, np.full(val.shape[1:], 0.5, np.float32))
            assert acc.complete
            spills, slots = acc.n_spills, acc.spill_file_bytes // acc.block_nbytes
        outs.append(out)
    n_blocks = 4 * 3 * 5
    assert spills > 100
    assert 0 < slots < n_blocks / 2  # slots are reused: the file holds the spilled frontier, not the volume
    np.testing.assert_array_equal(outs[0], outs[1])
    assert list(tmp_path.iterdir()) == []
