"""Many small cases predicted in worker processes: the same bytes as the sequential path, resumable."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from voxflow.infer import _case_pool as case_pool
from voxflow.infer import predict
from voxflow.infer._engine import _pooled_cases
from voxflow.infer._options import PredictOptions
from voxflow.store import Store

SHAPES = [(6, 10, 12), (7, 9, 11), (5, 12, 10), (8, 11, 9)]


def _save_fold(run_dir: Path, cfg, meta) -> None:  # noqa: ANN001
    from voxflow.nets import build_network
    from voxflow.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = build_network(cfg.network, 1, 3)
    payload = {"network": net.state_dict(), "configuration": dataclasses.asdict(cfg), "dataset": meta.to_dict()}
    save_checkpoint(run_dir / "checkpoint_final.pt", {**payload, "in_channels": 1, "num_outputs": 3, "epoch": 1})


def _chunk_bytes(store: Store, case_id: str, name: str) -> dict[str, bytes]:
    """Every stored chunk file of one array, by its path inside the array."""
    root = Path(store.path) / "cases" / case_id / name
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pool_shape_splits_the_cores() -> None:
    assert case_pool.pool_shape(24, 2) == (2, 1)
    assert case_pool.pool_shape(3, 8) == (3, 2)
    assert case_pool.pool_shape(1, 1) == (1, 1)


def test_no_pool_on_a_gpu_without_a_loader_or_for_few_cases(tmp_path: Path, meta, write_store, monkeypatch) -> None:  # noqa: ANN001
    src = write_store(tmp_path / "ds.zarr", meta, SHAPES)
    ids = src.case_ids()
    opts = PredictOptions()
    monkeypatch.setattr(case_pool, "cpu_count", lambda: 2)
    monkeypatch.setattr(case_pool, "CASE_POOL_MIN_CASES", 2)
    loader = lambda device: []  # noqa: E731
    assert _pooled_cases(src, [], ids, "cpu", opts, loader) == ids
    assert _pooled_cases(src, [], ids, "cuda", opts, loader) == []
    assert _pooled_cases(src, [], ids, "cpu", opts, None) == []
    assert _pooled_cases(src, [], ids, "cpu", PredictOptions(scheduler="sync"), loader) == []
    assert _pooled_cases(src, [], ids[:1], "cpu", opts, loader) == []
    monkeypatch.setattr(case_pool, "cpu_count", lambda: 1)
    assert _pooled_cases(src, [], ids, "cpu", opts, loader) == []


def test_small_cases_in_worker_processes_write_the_sequential_bytes_and_resume(
    tmp_path: Path,
    meta,  # noqa: ANN001
    make_config,  # noqa: ANN001
    write_store,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if case_pool.cpu_count() < 2:
        pytest.skip("the case pool needs at least 2 cores")
    src = write_store(tmp_path / "ds.zarr", meta, SHAPES)
    cfg = make_config()
    _save_fold(tmp_path / "runs" / cfg.name / "fold_0", cfg, meta)
    kw = {"model_dir": tmp_path / "runs" / cfg.name, "save_probabilities": True, "progress": False, "export": False}
    # the sequential path with the workers' torch thread count (torch's 1x1x1 convolutions round
    # differently with another thread count, in the last bit of float32)
    _, threads = case_pool.pool_shape(len(SHAPES), case_pool.cpu_count())
    monkeypatch.setattr(case_pool, "CASE_POOL_MIN_CASES", 10**9)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = predict(src, tmp_path / "ref", **kw)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(case_pool, "CASE_POOL_MIN_CASES", 2)
    with caplog.at_level(logging.INFO, logger="voxflow.infer._case_pool"):
        pooled = predict(src, tmp_path / "pool", **kw)
    assert any("small cases in" in r.getMessage() for r in caplog.records), "the pool did not run"
    assert pooled.case_ids() == ref.case_ids() == src.case_ids()
    for cid in src.case_ids():
        for name in ("label", "probs"):
            assert _chunk_bytes(pooled, cid, name) == _chunk_bytes(ref, cid, name), (cid, name)
        assert pooled.case_attrs(cid) == ref.case_attrs(cid)
    assert not (tmp_path / "pool" / ".scratch").exists()
    # a case lost (as if the run had been killed) is predicted again on the next run, the rest kept
    pooled.delete_case("case_002")
    again = predict(src, tmp_path / "pool", **kw)
    assert again.case_ids() == src.case_ids()
    np.testing.assert_array_equal(again.array("case_002", "probs").compute(), ref.array("case_002", "probs").compute())
