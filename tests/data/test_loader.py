from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from voxflow.data import AugmentConfig, apply, build_loader, sample_params
from voxflow.data.sampling import PatchSampler, stream_rng
from voxflow.errors import LayoutError


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("voxflow-loader")]


def _take(loader, n: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_train_batches_have_contract_shapes(preprocessed_store, config_factory) -> None:
    store = preprocessed_store()
    cfg = config_factory((8, 8, 8), batch_size=3)
    with build_loader(store, store.case_ids(), cfg, ds_scales=[(1.0, 1.0, 1.0), (0.5, 0.5, 0.5)]) as loader:
        assert loader.spec.read_patch_vox != (8, 8, 8)  # enlarged for rotation/scaling
        for batch in _take(loader, 4):
            assert batch.image.shape == (3, 1, 8, 8, 8)
            assert batch.image.dtype == torch.float32
            assert [tuple(t.shape) for t in batch.target] == [(3, 1, 8, 8, 8), (3, 1, 4, 4, 4)]
            assert all(t.dtype == torch.int64 for t in batch.target)
            assert set(batch.target[0].unique().tolist()) <= {0, 1, 2}
            assert len(batch.case_ids) == 3
    assert not _loader_threads()


def test_2d_configuration_gives_4d_batches(preprocessed_store, config_factory) -> None:
    store = preprocessed_store()
    cfg = config_factory((1, 8, 8), batch_size=2)
    with build_loader(store, store.case_ids(), cfg, ds_scales=[(1.0, 1.0), (0.5, 0.5)], num_workers=1) as loader:
        assert loader.spec.augment is not None
        assert loader.spec.augment.mirror_axes == (0, 1)
        batch = _take(loader, 2)[-1]
    assert batch.image.shape == (2, 1, 8, 8)
    assert [tuple(t.shape) for t in batch.target] == [(2, 1, 8, 8), (2, 1, 4, 4)]


def test_same_seed_same_batches_distinct_ranks(preprocessed_store, config_factory) -> None:
    store = preprocessed_store()
    cfg = config_factory((8, 8, 8))

    def batches(**kw):
        with build_loader(store, store.case_ids(), cfg, num_workers=2, **kw) as loader:
            return [b.image for b in _take(loader, 4)]

    a, b = batches(seed=1), batches(seed=1)
    assert len(a) == 4
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    other = batches(seed=1, rank=1, world_size=2)
    assert not any(torch.equal(x, y) for x, y in zip(a, other, strict=True))


def test_validation_loader_is_finite_unaugmented_and_repeatable(preprocessed_store, config_factory) -> None:
    store = preprocessed_store()
    cfg = config_factory((8, 8, 8), val_iters=3, oversample=1.0)
    with build_loader(store, store.case_ids(), cfg, train=False, num_workers=2) as loader:
        assert loader.spec.augment is None
        assert loader.spec.read_patch_vox == (8, 8, 8)
        assert len(loader) == 3
        first = list(loader)
        second = list(loader)
    assert len(first) == 3
    assert all(torch.equal(x.image, y.image) for x, y in zip(first, second, strict=True))
    assert all(x.params is not None and not x.params.spatial.any() for x in first)
    # oversample 1.0: every validation patch is centred on foreground
    assert all((x.target[0] > 0).flatten(1).any(1).all() for x in first)
    assert not _loader_threads()


def test_unaugmented_train_batch_is_a_store_region(preprocessed_store, config_factory) -> None:
    store = preprocessed_store()
    cfg = config_factory((8, 8, 8), oversample=0.0)
    full = {c: store.zarr_array(c, "image")[...] for c in store.case_ids()}
    with build_loader(store, store.case_ids(), cfg, augment=False, num_workers=0) as loader:
        batch = next(iter(loader))
    for b, cid in enumerate(batch.case_ids):
        x = full[cid][0]
        img = batch.image[b, 0].numpy()
        # find where the patch sits (random patches of an 8^3 patch on >= 11-voxel axes lie inside)
        hits = [
            (z, y, xx)
            for z in range(x.shape[0] - 7)
            for y in range(x.shape[1] - 7)
            for xx in range(x.shape[2] - 7)
            if np.array_equal(x[z : z + 8, y : y + 8, xx : xx + 8], img)
        ]
        assert len(hits) == 1


def test_close_joins_threads_and_worker_errors_propagate(preprocessed_store, config_factory, monkeypatch) -> None:
    store = preprocessed_store()
    cfg = config_factory((8, 8, 8))
    loader = build_loader(store, store.case_ids(), cfg, num_workers=2)
    _take(loader, 2)
    assert len(_loader_threads()) == 2
    loader.close()
    assert not _loader_threads()

    calls = {"n": 0}
    original = PatchSampler.read

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError("disk went away")
        return original(self, *args)

    monkeypatch.setattr(PatchSampler, "read", flaky)
    with pytest.raises(OSError, match="disk went away"), build_loader(store, store.case_ids(), cfg) as loader:
        _take(loader, 10)
    assert not _loader_threads()


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_in_training_loop_leaves_no_thread(preprocessed_store, config_factory, exc) -> None:
    store = preprocessed_store()
    cfg = config_factory((8, 8, 8))
    with pytest.raises(exc), build_loader(store, store.case_ids(), cfg, num_workers=2, prefetch=1) as loader:  # noqa: PT012
        for i, _ in enumerate(loader):
            if i == 1:
                raise exc()
    assert not _loader_threads()


def test_custom_augment_config_and_bad_inputs(preprocessed_store, config_factory, rng) -> None:
    store = preprocessed_store()
    cfg = config_factory((8, 8, 8))
    loader = build_loader(str(store.path), store.case_ids(), cfg, augment=AugmentConfig.off(), num_workers=0)
    assert loader.spec.read_patch_vox == (8, 8, 8)
    assert next(iter(loader)).image.shape == (2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="rank"):
        build_loader(store, store.case_ids(), cfg, rank=2, world_size=2)
    with pytest.raises(LayoutError, match="expects 2 channels"):
        build_loader(store, store.case_ids(), config_factory((8, 8, 8), n_channels=2))
    with pytest.raises(ValueError, match="ds_scales"):
        build_loader(store, store.case_ids(), cfg, ds_scales=[(1.0, 1.0)])
    with pytest.raises(TypeError, match="infinite"):
        len(build_loader(store, store.case_ids(), cfg, num_workers=0))


@pytest.mark.parametrize("patch", [(8, 8, 8), (1, 10, 8)])
def test_footprint_reads_equal_reading_the_enlarged_patch(preprocessed_store, config_factory, patch) -> None:
    """The loader reads only each sample's footprint; the result must equal augmenting the whole
    enlarged patch with the same draws and parameters."""
    store = preprocessed_store()
    cfg = config_factory(patch, batch_size=4)
    aug = AugmentConfig(p_rotation=0.7, p_scale=0.7, p_elastic=0.3, mirror_axes=(0, 1))
    scales = [(1.0,) * (len(patch) if patch[0] != 1 else 2)]
    loader = build_loader(store, store.case_ids(), cfg, augment=aug, num_workers=0, seed=3, ds_scales=scales)
    batches = _take(loader, 3)
    spec = loader.spec
    rng = stream_rng(3, rank=0, worker=0, purpose="train")
    sampler = PatchSampler(
        loader.cases,
        spec.read_patch_vox,
        final_patch_size_vox=(1, *spec.final_patch_vox) if len(spec.final_patch_vox) == 2 else spec.final_patch_vox,
        oversample_foreground=spec.oversample_foreground,
        rng=rng,
    )
    dims = len(spec.final_patch_vox)
    for batch in batches:
        cases, corners, _ = sampler.draw(4)
        params = sample_params(
            rng, 4, n_channels=1, spatial_dims=dims, config=spec.augment, patch_size=spec.final_patch_vox
        )
        assert np.array_equal(params.matrix, batch.params.matrix)
        reads = [sampler.read(c, lo) for c, lo in zip(cases, corners, strict=True)]
        image = torch.from_numpy(np.stack([r[0] for r in reads]))
        label = torch.from_numpy(np.stack([r[1] for r in reads]))
        if dims == 2:
            image, label = image[:, :, 0], label[:, 0]
        ref_image, ref_targets = apply(image, label, params, patch_size=spec.final_patch_vox, ds_scales=scales)
        torch.testing.assert_close(batch.image, ref_image, atol=1e-4, rtol=1e-5)
        assert (batch.target[0] == ref_targets[0]).float().mean() > 0.995
    assert any(b.params.spatial.any() for b in batches)


def test_dropped_loader_stops_its_threads(preprocessed_store, config_factory) -> None:
    import gc
    import time

    store = preprocessed_store()
    loader = build_loader(store, store.case_ids(), config_factory((8, 8, 8)), num_workers=2)
    _take(loader, 1)
    assert _loader_threads()
    del loader
    gc.collect()
    deadline = time.monotonic() + 5
    while _loader_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _loader_threads()
