"""Many small cases run one task per case, in parallel: the same stores and metrics as the chunked path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from voxflow import cluster
from voxflow.evaluate import evaluate
from voxflow.io import convert
from voxflow.preprocess import run_preprocess
from voxflow.store import DatasetMeta, Store
from voxflow.synthetic import make_dataset


def _digest(root: Path) -> dict[str, str]:
    """Every file of a store (metadata and chunks) by its bytes."""
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "raw", kind="mr", n_cases=5, shape_zyx=(9, 14, 12))


@pytest.fixture(params=["threads", "pool", "sync"])
def scheduler(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """threads; threads handing the small cases to worker processes (POOL_MIN_CASES); sync."""
    if request.param == "pool":
        monkeypatch.setattr(cluster, "POOL_MIN_CASES", 1)
        return "threads"
    return str(request.param)


def test_convert_small_cases_in_parallel_writes_the_same_store(tmp_path, raw, monkeypatch, scheduler) -> None:
    convert(raw, tmp_path / "small.zarr", progress=False, scheduler=scheduler)
    monkeypatch.setattr(cluster, "SMALL_CASE_VOXELS", 1)  # every case through the chunked path
    convert(raw, tmp_path / "chunked.zarr", progress=False, scheduler="threads")
    small, chunked = _digest(tmp_path / "small.zarr"), _digest(tmp_path / "chunked.zarr")
    assert len(Store.open(tmp_path / "small.zarr").case_ids()) == 5
    assert small == chunked


def test_preprocess_small_cases_in_parallel_writes_the_same_store(
    tmp_path, small_store, helpers, monkeypatch, scheduler
) -> None:
    src = small_store(n_cases=4)
    plan = helpers.make_plan(helpers.make_config())
    run_preprocess(src, plan, "3d_fullres", tmp_path / "small.zarr", progress=False, scheduler=scheduler)
    monkeypatch.setattr(cluster, "SMALL_CASE_VOXELS", 1)
    run_preprocess(src, plan, "3d_fullres", tmp_path / "chunked.zarr", progress=False, scheduler="threads")
    assert _digest(tmp_path / "small.zarr") == _digest(tmp_path / "chunked.zarr")
    assert Store.open(tmp_path / "small.zarr").case_ids() == src.case_ids()


def test_a_case_at_the_threshold_keeps_its_chunked_graph() -> None:
    assert cluster.is_small_case(cluster.SMALL_CASE_VOXELS - 1)
    assert not cluster.is_small_case(cluster.SMALL_CASE_VOXELS)


def test_evaluate_small_cases_gives_the_same_metrics(tmp_path, rng, monkeypatch, scheduler) -> None:
    from voxflow.geometry import Geometry

    meta = {"channel_names": ("MR",), "labels": {"background": 0, "a": 1, "b": 2}}
    stores = {
        k: Store.create(tmp_path / f"{k}.zarr", DatasetMeta(**meta, kind=kind))
        for k, kind in (("pred", "prediction"), ("ref", "dataset"))
    }
    for i, shape in enumerate([(9, 14, 12), (1, 20, 18), (7, 8, 9)]):  # 3D, 2D, and one with label 2 absent
        ref = (rng.random(shape) * 2.4).astype(np.uint8) if i != 2 else np.zeros(shape, np.uint8)
        pred = np.roll(ref, 1, axis=-1)
        if i == 2:
            pred[2:4, 2:4, 2:4] = 1
        for k, lab in (("pred", pred), ("ref", ref)):
            stores[k].begin_case(f"c{i}", geometry=Geometry(shape_zyx=shape, spacing_zyx=(2.0, 0.8, 0.7)))
            stores[k].create_array(f"c{i}", "label", shape=shape, dtype=np.uint8, chunks=(4, 5, 6))[...] = lab
            stores[k].mark_complete(f"c{i}")
    small = evaluate(tmp_path / "pred.zarr", tmp_path / "ref.zarr", progress=False, scheduler=scheduler)
    monkeypatch.setattr(cluster, "SMALL_CASE_VOXELS", 1)
    chunked = evaluate(tmp_path / "pred.zarr", tmp_path / "ref.zarr", progress=False)
    assert json.dumps(small.to_dict(), sort_keys=True) == json.dumps(chunked.to_dict(), sort_keys=True)
    assert np.isfinite(small.metric_per_case[0].metrics["1"]["hd95_mm"])
