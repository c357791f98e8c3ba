"""The same preprocessing on every scheduler: threads, processes, a LocalCluster, a tcp:// cluster."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from voxflow.preprocess import run_preprocess
from voxflow.store import Store
from voxflow.testing import start_dask_scheduler, start_dask_worker


def _assert_same(a: Store, b: Store) -> None:
    assert a.case_ids() == b.case_ids()
    for cid in a.case_ids():
        for name in ("image", "label", "fg_index"):
            np.testing.assert_array_equal(a.zarr_array(cid, name)[...], b.zarr_array(cid, name)[...])
        assert a.case_attrs(cid) == {**b.case_attrs(cid)}


@pytest.fixture
def dataset(tmp_path, rng, helpers):
    src = helpers.write_store(tmp_path / "ds.zarr", {"a": helpers.small_case(rng)})
    plan = helpers.make_plan(helpers.make_config())
    reference = run_preprocess(src, plan, "3d_fullres", tmp_path / "threads.zarr", progress=False)
    return src, plan, reference


def test_processes_scheduler_gives_identical_store(tmp_path, dataset) -> None:
    src, plan, reference = dataset
    out = run_preprocess(src, plan, "3d_fullres", tmp_path / "proc.zarr", scheduler="processes", progress=False)
    _assert_same(reference, out)


@pytest.mark.slow
def test_local_cluster_gives_identical_store(tmp_path, dataset) -> None:
    src, plan, reference = dataset
    out = run_preprocess(
        src, plan, "3d_fullres", tmp_path / "local.zarr", scheduler="local:2", memory_limit="1GB", progress=False
    )
    _assert_same(reference, out)


@pytest.mark.slow
def test_tcp_cluster_of_two_worker_processes_gives_identical_store(tmp_path, dataset) -> None:
    src, plan, reference = dataset
    scheduler, address = start_dask_scheduler(tmp_path / "scheduler.json")
    procs = [scheduler]
    try:
        procs += [start_dask_worker(address, tmp_path / f"w{i}") for i in range(2)]
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        out = run_preprocess(src, plan, "3d_fullres", tmp_path / "tcp.zarr", scheduler=address, progress=False)
        _assert_same(reference, out)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
