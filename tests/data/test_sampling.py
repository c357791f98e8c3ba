from __future__ import annotations

import warnings

import numpy as np
import pytest
import zarr

from voxflow.data.sampling import CaseHandle, ChunkCache, PatchSampler, open_cases, read_patch, stream_rng
from voxflow.errors import LayoutError, VoxflowWarning


def _padded_region(x: np.ndarray, lo: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Eager oracle: pad the whole array with zeros, then slice."""
    pad = max(size) + int(np.abs(lo).max()) + 1
    padded = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(pad, pad)] * 3)
    sl = tuple(slice(int(a) + pad, int(a) + pad + s) for a, s in zip(lo, size, strict=True))
    return padded[(slice(None),) * (x.ndim - 3) + sl]


@pytest.mark.parametrize(
    ("lo", "size"),
    [
        ((1, 1, 1), (5, 4, 3)),  # inside one chunk
        ((5, 4, 3), (9, 8, 7)),  # across chunk borders
        ((-3, 10, 12), (8, 12, 9)),  # past both borders
        ((-4, -4, -4), (30, 30, 30)),  # larger than the volume
        ((25, 0, 0), (4, 4, 4)),  # completely outside
    ],
)
def test_read_patch_equals_numpy_region(tmp_path, rng, lo, size) -> None:
    x = rng.normal(size=(2, 20, 18, 16)).astype(np.float32)
    arr = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=x.shape, chunks=(1, 7, 6, 5), dtype="float32")
    arr[...] = x
    got = read_patch(arr, lo, size)
    np.testing.assert_array_equal(got, _padded_region(x, np.array(lo), size))
    assert got.shape == (2, *size)


def test_read_patch_touches_only_overlapping_chunks(tmp_path, rng) -> None:
    x = rng.normal(size=(1, 21, 18, 15)).astype(np.float32)
    path = tmp_path / "b.zarr"
    arr = zarr.create_array(store=str(path), shape=x.shape, chunks=(1, 7, 6, 5), dtype="float32")
    arr[...] = x
    # delete every chunk file that the patch [7:14, 6:12, 5:10] does not overlap: reading must still work
    keep = {"c/0/1/1/1"}
    for f in (path / "c").rglob("*"):
        if f.is_file() and str(f.relative_to(path)) not in keep:
            f.unlink()
    got = read_patch(zarr.open_array(str(path)), (7, 6, 5), (7, 6, 5))
    np.testing.assert_array_equal(got, x[:, 7:14, 6:12, 5:10])


def test_sampler_patches_equal_store_regions(preprocessed_store) -> None:
    store = preprocessed_store()
    cases = open_cases(store, store.case_ids())
    sampler = PatchSampler(cases, (12, 10, 8), final_patch_size_vox=(8, 6, 4), rng=stream_rng(3))
    full = {c.case_id: (c.image[...], c.label[...]) for c in cases}
    for _ in range(10):
        pb = sampler.sample(3)
        for b in range(3):
            img, lab = full[pb.case_ids[b]]
            np.testing.assert_array_equal(pb.image[b], _padded_region(img, pb.lo_zyx[b], (12, 10, 8)))
            np.testing.assert_array_equal(pb.label[b], _padded_region(lab[None], pb.lo_zyx[b], (12, 10, 8))[0])
    assert pb.image.dtype == np.float32
    assert pb.label.dtype == np.uint8


def _numpy_case(label: np.ndarray, case_id: str = "n") -> CaseHandle:
    rows = np.concatenate(
        [np.c_[np.full(int((label == k).sum()), k), np.argwhere(label == k)] for k in np.unique(label) if k != 0]
    )
    classes = tuple(int(k) for k in np.unique(label) if k != 0)
    return CaseHandle(case_id, label[None].astype(np.float32), label, rows, classes)


def test_final_patch_stays_inside_volume() -> None:
    label = np.zeros((30, 25, 20), np.uint8)
    label[0, 0, 0] = 1
    label[29, 24, 19] = 2
    case = _numpy_case(label)
    sampler = PatchSampler(
        [case], (14, 12, 10), final_patch_size_vox=(8, 8, 6), rng=stream_rng(0), oversample_foreground=0.5
    )
    shape = np.array(label.shape)
    for _ in range(300):
        lo = sampler.draw_corner(case, foreground=bool(sampler.rng.random() < 0.5))
        final_lo = lo + (np.array([14, 12, 10]) - [8, 8, 6]) // 2
        assert (final_lo >= 0).all()
        assert (final_lo + [8, 8, 6] <= shape).all()


def test_small_volume_is_padded_around() -> None:
    label = np.ones((3, 4, 5), np.uint8)
    case = _numpy_case(label)
    sampler = PatchSampler([case], (8, 8, 8), rng=stream_rng(0))
    pb = sampler.sample(4)
    assert pb.image.shape == (4, 1, 8, 8, 8)
    assert (pb.label.sum(axis=(1, 2, 3)) == label.size).all()  # the whole volume is in every patch


def test_foreground_ratio_matches_configuration() -> None:
    label = np.zeros((40, 40, 40), np.uint8)
    label[2:4, 2:4, 2:4] = 1
    case = _numpy_case(label)
    p, size, batch, n = 0.33, (8, 8, 8), 3, 600
    sampler = PatchSampler([case], size, oversample_foreground=p, rng=stream_rng(7))
    # exact chance q that a uniformly placed patch contains foreground
    lb, ub = sampler.bounds(label.shape)
    hits = [(lo <= 3) & (lo + 8 > 2) for lo in (np.arange(a, b + 1) for a, b in zip(lb, ub, strict=True))]
    q = float(np.prod([h.mean() for h in hits]))
    forced = contains = 0
    for _ in range(n):
        pb = sampler.sample(batch)
        forced += int(pb.forced_fg.sum())
        contains += int((pb.label.reshape(batch, -1).max(1) > 0).sum())
    total = n * batch
    sd = np.sqrt(p * (1 - p) / total)
    assert abs(forced / total - p) < 4 * sd
    expected = p + (1 - p) * q
    assert abs(contains / total - expected) < 4 * np.sqrt(expected * (1 - expected) / total)


def test_rare_class_is_drawn_as_often_as_large_class() -> None:
    label = np.zeros((30, 30, 30), np.uint8)
    label[5:25, 5:25, 5:15] = 1
    label[27, 27, 27] = 2
    case = _numpy_case(label)
    sampler = PatchSampler([case], (6, 6, 6), oversample_foreground=1.0, rng=stream_rng(1))
    pb = sampler.sample(400)
    assert pb.forced_fg.all()
    has_rare = (pb.label.reshape(400, -1) == 2).any(1).mean()
    assert 0.4 < has_rare < 0.6
    assert (pb.label.reshape(400, -1).max(1) > 0).all()


def test_case_without_foreground_falls_back_to_random() -> None:
    label = np.zeros((10, 10, 10), np.uint8)
    case = CaseHandle("empty", label[None].astype(np.float32), label, np.zeros((0, 4), np.int64), ())
    pb = PatchSampler([case], (4, 4, 4), oversample_foreground=1.0, rng=stream_rng(0)).sample(5)
    assert pb.image.shape == (5, 1, 4, 4, 4)


def test_same_seed_same_patches_distinct_streams(preprocessed_store) -> None:
    store = preprocessed_store()
    cases = open_cases(store, store.case_ids())

    def corners(**kw: int) -> np.ndarray:
        s = PatchSampler(cases, (6, 6, 6), rng=stream_rng(5, **kw))
        return np.concatenate([s.sample(4).lo_zyx for _ in range(5)])

    np.testing.assert_array_equal(corners(), corners())
    streams = [corners(), corners(rank=1), corners(worker=1), corners(rank=1, worker=1)]
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            assert not np.array_equal(streams[i], streams[j])


def test_2d_patches_are_single_slices() -> None:
    label = np.zeros((6, 20, 20), np.uint8)
    label[4, 10, 10] = 1
    case = _numpy_case(label)
    pb = PatchSampler([case], (1, 8, 8), oversample_foreground=1.0, rng=stream_rng(0)).sample(3)
    assert pb.image.shape == (3, 1, 1, 8, 8)
    assert (pb.lo_zyx[:, 0] == 4).all()
    assert (pb.label == 1).reshape(3, -1).any(1).all()


def test_open_cases_errors(preprocessed_store, rng) -> None:
    image = rng.normal(size=(1, 6, 6, 6)).astype(np.float32)
    store = preprocessed_store({"lab": (image, np.zeros((6, 6, 6), np.uint8)), "nolab": (image, None)})
    with pytest.raises(LayoutError, match="'nolab'"):
        open_cases(store, ["lab", "nolab"])
    assert open_cases(store, ["nolab"], require_label=False)[0].label is None
    with pytest.raises(LayoutError, match="at least one case"):
        open_cases(store, [])


def test_missing_fg_index_warns(preprocessed_store, rng) -> None:
    image = rng.normal(size=(1, 6, 6, 6)).astype(np.float32)
    label = np.zeros((6, 6, 6), np.uint8)
    label[1, 1, 1] = 1
    store = preprocessed_store({"a": (image, label)}, fg_index=False)
    with pytest.warns(VoxflowWarning, match="no fg_index"):
        (case,) = open_cases(store, ["a"])
    assert case.fg_classes == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PatchSampler([case], (4, 4, 4), rng=stream_rng(0)).sample(2)


@pytest.mark.parametrize("cache_bytes", [10**7, 2000])  # everything fits / constant eviction
def test_cached_reads_equal_numpy_region(tmp_path, rng, cache_bytes) -> None:
    x = rng.normal(size=(2, 20, 18, 16)).astype(np.float32)
    arr = zarr.create_array(store=str(tmp_path / "c.zarr"), shape=x.shape, chunks=(1, 7, 6, 5), dtype="float32")
    arr[...] = x
    cache = ChunkCache(cache_bytes)
    for _ in range(30):
        lo = rng.integers(-6, 18, size=3)
        size = tuple(int(v) for v in rng.integers(1, 12, size=3))
        np.testing.assert_array_equal(read_patch(arr, lo, size, cache=cache, key="x"), _padded_region(x, lo, size))
    assert cache.nbytes <= cache_bytes
    if cache_bytes > x.nbytes:
        assert cache.hits > 0
        np.testing.assert_array_equal(read_patch(arr, (0, 0, 0), (20, 18, 16), cache=cache, key="x"), x)


def test_ignore_label_is_not_a_foreground_target(preprocessed_store, rng) -> None:
    label = np.zeros((10, 10, 10), np.uint8)
    label[:5] = 3  # ignore
    label[8, 8, 8] = 1
    image = rng.normal(size=(1, 10, 10, 10)).astype(np.float32)
    store = preprocessed_store({"a": (image, label)}, labels={"background": 0, "x": 1, "ignore": 3})
    (case,) = open_cases(store, ["a"])
    assert case.fg_classes == (1,)
