from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from voxflow.cluster import scheduler_context
from voxflow.errors import PlanError
from voxflow.fingerprint import (
    Fingerprint,
    _block_seed,
    allocate_samples,
    chunk_statistics,
    compute_fingerprint,
    fingerprint_graph,
)
from voxflow.geometry import Geometry
from voxflow.store import DatasetMeta, Store
from voxflow.testing import raise_if_computes, synthetic_case

META = DatasetMeta(channel_names=("T1", "T2"), labels={"background": 0, "oedema": 1, "tumour": 2}, name="tiny")
IMAGE_CHUNKS = (1, 7, 6, 5)
LABEL_CHUNKS = (8, 8, 8)
SPACINGS = [(3.0, 1.0, 1.0), (2.5, 0.9, 0.9), (4.0, 1.1, 1.1)]
SHAPES = [(20, 18, 17), (15, 22, 19), (18, 16, 21)]


def _case_arrays(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    image, label = synthetic_case(SHAPES[i], rng=rng, n_channels=2)
    image[:, : 2 + i] = 0  # empty slabs: the nonzero box is smaller than the image
    image[1, :, :, -3:] = 0
    image[0, :, :, -3:] = 0
    label[: 2 + i] = 0
    return image, label


@pytest.fixture
def tiny_store(tmp_path) -> Store:
    store = Store.create(tmp_path / "ds.zarr", META)
    for i, (shape, spacing) in enumerate(zip(SHAPES, SPACINGS, strict=True)):
        image, label = _case_arrays(i)
        cid = f"case_{i}"
        store.begin_case(cid, geometry=Geometry(shape_zyx=shape, spacing_zyx=spacing))
        store.create_array(cid, "image", shape=image.shape, dtype=image.dtype, chunks=IMAGE_CHUNKS)[...] = image
        store.create_array(cid, "label", shape=label.shape, dtype=label.dtype, chunks=LABEL_CHUNKS)[...] = label
        store.mark_complete(cid)
    return store


def _numpy_case(cid: str, image: np.ndarray, label: np.ndarray, samples: int, seed: int) -> dict:
    """Plain numpy oracle: the same chunk-wise seeded sampling, everything else from scratch."""
    nz = np.argwhere(np.any(image != 0, axis=0))
    box = tuple((int(lo), int(hi) + 1) for lo, hi in zip(nz.min(0), nz.max(0), strict=True))
    values, counts = np.unique(label, return_counts=True)
    grid = [range(0, n, c) for n, c in zip(label.shape, IMAGE_CHUNKS[1:], strict=True)]
    per_chunk = []
    for starts in np.ndindex(*(len(g) for g in grid)):
        sl = tuple(slice(g[i], g[i] + c) for g, i, c in zip(grid, starts, IMAGE_CHUNKS[1:], strict=True))
        rng = np.random.default_rng(_block_seed(seed, cid, starts))
        per_chunk.append(
            chunk_statistics(
                image[(slice(None), *sl)], label[sl], offset_zyx=[s.start for s in sl], max_samples=samples, rng=rng
            )
        )
    quota = allocate_samples([c["n_fg"] for c in per_chunk], samples)
    pooled = np.concatenate([c["samples"][:, :q] for c, q in zip(per_chunk, quota, strict=True)], axis=1)
    comps = {v: ndimage.label(label == v)[1] for v in (1, 2)}
    return {
        "box": box,
        "counts": dict(zip(values.tolist(), counts.tolist(), strict=True)),
        "n_fg": int((label > 0).sum()),
        "samples": pooled,
        "components": comps,
    }


@pytest.mark.parametrize("samples_per_case", [25, 100_000])
def test_fingerprint_matches_numpy(tiny_store: Store, samples_per_case: int) -> None:
    fp = compute_fingerprint(tiny_store, samples_per_case=samples_per_case, seed=7, progress=False)
    pooled = []
    for i, case in enumerate(fp.cases):
        image, label = _case_arrays(i)
        ref = _numpy_case(case.case_id, image, label, samples_per_case, seed=7)
        assert case.shape_zyx == SHAPES[i]
        assert case.spacing_zyx == SPACINGS[i]
        assert case.nonzero_bbox_zyx == ref["box"]
        assert case.shape_after_crop_zyx == tuple(hi - lo for lo, hi in ref["box"])
        assert case.fraction_kept_by_crop == pytest.approx(math.prod(case.shape_after_crop_zyx) / math.prod(SHAPES[i]))
        assert case.class_voxel_counts == ref["counts"]
        assert case.n_foreground_voxels == ref["n_fg"]
        assert case.n_components == ref["components"]
        assert ref["samples"].shape[1] == min(samples_per_case, ref["n_fg"])
        pooled.append(ref["samples"])
        if samples_per_case >= ref["n_fg"]:  # independent check: the sample is every fg voxel
            np.testing.assert_array_equal(
                np.sort(ref["samples"], axis=1), np.sort(image[:, label > 0].astype(np.float64), axis=1)
            )
    pooled = np.concatenate(pooled, axis=1)
    for c, st in enumerate(fp.intensity):
        x = pooled[c]
        assert st.n_samples == x.size
        assert (st.mean, st.std, st.median, st.min, st.max) == (x.mean(), x.std(), np.median(x), x.min(), x.max())
        assert (st.percentile_00_5, st.percentile_99_5) == tuple(np.percentile(x, [0.5, 99.5]))
    np.testing.assert_allclose(fp.spacing.median_zyx, np.median(SPACINGS, axis=0))
    np.testing.assert_allclose(fp.spacing.p10_zyx, np.percentile(SPACINGS, 10, axis=0))
    np.testing.assert_allclose(fp.shape.p90_zyx, np.percentile(SHAPES, 90, axis=0))
    by_value = {c.value: c for c in fp.classes}
    labels = [_case_arrays(i)[1] for i in range(3)]
    assert by_value[2].name == "tumour"
    assert by_value[2].voxel_count == sum(int((lab == 2).sum()) for lab in labels)
    assert by_value[1].n_cases == sum(int((lab == 1).any()) for lab in labels)


def test_building_the_graph_computes_nothing(tiny_store: Store) -> None:
    with raise_if_computes():
        graph = fingerprint_graph(tiny_store, samples_per_case=10, seed=0)
    assert sorted(graph) == ["case_0", "case_1", "case_2"]


def test_same_result_on_threads_and_local_cluster(tiny_store: Store) -> None:
    with scheduler_context("threads"):
        a = compute_fingerprint(tiny_store.path, samples_per_case=30, seed=3, progress=False)
    with scheduler_context("local:2"):
        b = compute_fingerprint(tiny_store.path, samples_per_case=30, seed=3, progress=True)
    assert a.to_dict() == b.to_dict()
    c = compute_fingerprint(tiny_store, samples_per_case=30, seed=4, progress=False)
    assert c.intensity != a.intensity  # the seed matters


def test_json_round_trip_and_named_errors(tiny_store: Store, tmp_path) -> None:
    fp = compute_fingerprint(tiny_store, samples_per_case=20, progress=False)
    path = tmp_path / "fp.json"
    fp.save(path)
    assert Fingerprint.load(path) == fp
    data = json.loads(path.read_text())
    data["cases"][1]["shape_zyx"] = [15, 22]
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"cases\[1\].*shape_zyx"):
        Fingerprint.load(path)
    data = fp.to_dict()
    data["cases"][0]["nonzero_box"] = data["cases"][0].pop("nonzero_bbox_zyx")
    with pytest.raises(PlanError, match=r"cases\[0\].*nonzero_box"):
        Fingerprint.from_dict(data)
    data = fp.to_dict()
    data["intensity"] = data["intensity"][:1]
    with pytest.raises(PlanError, match="intensity"):
        Fingerprint.from_dict(data)
    with pytest.raises(PlanError, match="does not exist"):
        Fingerprint.load(tmp_path / "missing.json")


def test_allocate_samples() -> None:
    np.testing.assert_array_equal(allocate_samples([3, 0, 5], 100), [3, 0, 5])
    q = allocate_samples([10, 30, 60, 1], 10)
    assert q.sum() == 10
    assert list(q) == [1, 3, 6, 0]
    q = allocate_samples([5, 5, 5], 10)  # ties broken by position
    assert list(q) == [4, 3, 3]
    assert all(allocate_samples([7, 1, 2], k).sum() == min(k, 10) for k in range(15))


def test_unlabelled_and_all_zero_case(tmp_path) -> None:
    store = Store.create(tmp_path / "u.zarr", DatasetMeta(channel_names=("CT",), labels={"background": 0, "a": 1}))
    store.begin_case("zero", geometry=Geometry(shape_zyx=(5, 6, 7), spacing_zyx=(1, 1, 1)))
    # written as zeros: since issue 19 an array whose chunk files are missing is damage, not zeros
    store.create_array("zero", "image", shape=(1, 5, 6, 7), dtype="int16", chunks=(1, 4, 4, 4))[...] = 0
    store.mark_complete("zero")
    fp = compute_fingerprint(store, progress=False)
    case = fp.cases[0]
    assert case.nonzero_bbox_zyx == ((0, 5), (0, 6), (0, 7))
    assert case.fraction_kept_by_crop == 1.0
    assert not case.labelled
    assert case.n_foreground_voxels == 0
    assert fp.intensity[0].n_samples == 0
    assert fp.intensity[0].mean is None


def test_empty_store_is_an_error(tmp_path) -> None:
    store = Store.create(tmp_path / "e.zarr", META)
    with pytest.raises(PlanError, match="no complete case"):
        compute_fingerprint(store, progress=False)
