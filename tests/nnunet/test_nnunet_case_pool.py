"""nnU-Net models go through the same case pool as voxflow's: small cases in worker processes give the
sequential path's bytes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from voxflow.geometry import Geometry
from voxflow.infer import _case_pool as case_pool
from voxflow.store import DatasetMeta, Store
from voxflow.testing import import_path, synthetic_case


def _cascade_tests() -> Any:
    return import_path(Path(__file__).with_name("test_nnunet_cascade.py"), "nnunet_cascade_tests")


def _ct_store(path: Path, shapes: list[tuple[int, int, int]]) -> Store:
    store = Store.create(path, DatasetMeta(channel_names=("CT",), labels={"background": 0, "organ": 1, "lesion": 2}))
    for i, shape in enumerate(shapes):
        img, _ = synthetic_case(shape, rng=np.random.default_rng(i))
        cid = f"case_{i:03d}"
        store.begin_case(cid, geometry=Geometry(shape_zyx=shape, spacing_zyx=(2.5, 0.8, 0.7)))
        store.create_array(cid, "image", shape=img.shape, dtype=img.dtype, chunks=img.shape)[...] = img * 300.0
        store.mark_complete(cid)
    return store


@pytest.mark.nnunet
def test_nnunet_small_cases_in_worker_processes_write_the_sequential_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("dynamic_network_architectures")
    if case_pool.cpu_count() < 2:
        pytest.skip("the case pool needs at least 2 cores")
    from voxflow.nnunet import predict_nnunet

    mod = _cascade_tests()
    folder = mod._model_folder(tmp_path / "results", "3d_fullres", mod.plans(), mod.DATASET, [0])
    src = _ct_store(tmp_path / "ds.zarr", [(9, 20, 26), (8, 18, 30), (10, 22, 24)])
    kw: dict[str, Any] = {"save_probabilities": True, "progress": False, "export": False}
    _, threads = case_pool.pool_shape(3, case_pool.cpu_count())
    monkeypatch.setattr(case_pool, "CASE_POOL_MIN_CASES", 10**9)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = predict_nnunet(src, tmp_path / "ref", folder, **kw)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(case_pool, "CASE_POOL_MIN_CASES", 2)
    with caplog.at_level(logging.INFO, logger="voxflow.infer._case_pool"):
        pooled = predict_nnunet(src, tmp_path / "pool", folder, **kw)
    assert any("small cases in" in r.getMessage() for r in caplog.records), "the pool did not run"
    for cid in src.case_ids():
        for name in ("label", "probs"):
            np.testing.assert_array_equal(
                np.asarray(pooled.zarr_array(cid, name)[...]), np.asarray(ref.zarr_array(cid, name)[...])
            )
