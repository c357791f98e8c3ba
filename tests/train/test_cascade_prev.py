"""The cascade's ``prev_seg`` preparation: a changed 3d_lowres validation prediction rewrites exactly
the cases it feeds, and under DDP one rank writes while the others wait.

The workspace is real and small: the planner plans the cascade on volumes several times the
full-resolution patch (as in tests/pipeline/test_cascade.py), `voxflow run -c 3d_lowres` trains and
validates both lowres folds, and `voxflow preprocess` writes the cascade's store; no ``prev_seg`` yet.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.plan.schema import Plan
from voxflow.preprocess import previous_onto_grid
from voxflow.store import Store
from voxflow.synthetic import make_dataset
from voxflow.train.cascade import array_digest, ensure_previous_stage, stale_previous_stage
from voxflow.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]
CASCADE = "3d_cascade_fullres"
# gpu_memory_gb 0.02 (CPU preset): patch (16, 24, 24) for images of (48, 64, 64): 3d_lowres + cascade planned
LOWRES_RUN = ["--preset", "cpu", "--gpu-memory-gb", "0.02", "-c", "3d_lowres", "--folds", "0", "--folds", "1",
              "--no-tta", "--num-workers", "0", "--set", "train.epochs=1", "--set", "train.iters_per_epoch=2",
              "--set", "train.val_iters=1"]  # fmt: skip
SHORT = ["--epochs", "1", "--iters", "1", "--set", "train.val_iters=1", "--no-validation", "--num-workers", "0"]


@pytest.fixture(scope="module")
def lowres_done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with both 3d_lowres folds trained and validated and the cascade preprocessed."""
    raw = make_dataset(tmp_path_factory.mktemp("raw") / "ds", kind="mr", n_cases=2, shape_zyx=(48, 64, 64), seed=1)
    work = tmp_path_factory.mktemp("work")
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(raw), "--work", str(work), *LOWRES_RUN], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ws = Workspace(work)
    res = runner.invoke(main, ["preprocess", str(ws.dataset_store), "--work", str(work), "-c", CASCADE])
    assert res.exit_code == 0, res.output
    return work


def _copy(work: Path, dst: Path) -> Workspace:
    shutil.copytree(work, dst, symlinks=True)
    return Workspace(dst)


def _rewrite_prediction(store: Store, case_id: str, label: np.ndarray) -> None:
    """What re-validating a fold does to one case of its prediction store: the case written anew."""
    old = store.zarr_array(case_id, "label")
    attrs = {k: v for k, v in store.case_attrs(case_id).items() if k not in ("complete", "geometry")}
    geometry = store.geometry(case_id)
    store.begin_case(case_id, geometry=geometry, attrs=attrs)
    new = store.create_array(case_id, "label", shape=old.shape, dtype=old.dtype, chunks=old.chunks)
    new[...] = label
    store.mark_complete(case_id)


def test_a_changed_lowres_prediction_rewrites_exactly_its_case(
    lowres_done: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws = _copy(lowres_done, tmp_path / "w")
    cfg = Plan.load(ws.plans).configuration(CASCADE)
    splits = json.loads(ws.splits.read_text())
    store = Store.open(ws.preprocessed(CASCADE))
    cases = store.case_ids()
    assert sorted(ensure_previous_stage(ws, cfg, cases, splits=splits)) == cases  # none had prev_seg
    assert ensure_previous_stage(ws, cfg, cases, splits=splits) == []  # up to date: nothing rewritten

    changed, kept = splits[1]["val"][0], splits[0]["val"][0]
    val = Store.open(ws.fold("3d_lowres", 1).validation_predictions, mode="r+")
    old_label = val.label(changed).compute()
    new_label = old_label.copy()
    new_label[8:30, 10:40, 20:50] = 2  # lowres fold 1 "re-validated": another segmentation of its case
    assert not np.array_equal(new_label, old_label)
    _rewrite_prediction(val, changed, new_label)
    kept_files, kept_record = array_digest(store, kept, "prev_seg"), store.case_attrs(kept)["previous_stage"]
    old_prev = store.array(changed, "prev_seg").compute()
    assert set(stale_previous_stage(ws, cfg, cases, splits=splits)) == {changed}

    with caplog.at_level(logging.INFO, logger="voxflow.train.cascade"):
        assert ensure_previous_stage(ws, cfg, cases, splits=splits) == [changed]
    assert any(changed in r.getMessage() and "changed since" in r.getMessage() for r in caplog.records), caplog.text
    assert array_digest(store, kept, "prev_seg") == kept_files  # the other case: not a byte rewritten
    assert store.case_attrs(kept)["previous_stage"] == kept_record
    attrs = store.case_attrs(changed)
    expected = previous_onto_grid(
        da.from_array(new_label, chunks=(16, 32, 32)),
        cfg,
        crop_bbox_zyx=tuple(tuple(b) for b in attrs["crop_bbox_zyx"]),  # type: ignore[arg-type]
        out_shape_zyx=store.zarr_array(changed, "image").shape[1:],
        values=[1, 2],
    ).compute()
    got = store.array(changed, "prev_seg").compute()
    np.testing.assert_array_equal(got, expected)  # the new lowres segmentation brought onto the grid
    assert not np.array_equal(got, old_prev)
    assert attrs["previous_stage"]["source"] == {"array": "label", "digest": array_digest(val, changed, "label")}
    assert ensure_previous_stage(ws, cfg, cases, splits=splits) == []


def test_a_stale_record_from_before_source_digests_is_rewritten(lowres_done: Path, tmp_path: Path) -> None:
    """``prev_seg`` written before the source was recorded cannot be checked: it is written again."""
    ws = _copy(lowres_done, tmp_path / "w")
    cfg = Plan.load(ws.plans).configuration(CASCADE)
    splits = json.loads(ws.splits.read_text())
    store = Store.open(ws.preprocessed(CASCADE), mode="r+")
    cases = store.case_ids()
    ensure_previous_stage(ws, cfg, cases, splits=splits)
    rec = dict(store.case_attrs(cases[0])["previous_stage"])
    del rec["source"]
    store.update_case_attrs(cases[0], previous_stage=rec)
    stale = stale_previous_stage(ws, cfg, cases, splits=splits)
    assert list(stale) == [cases[0]]
    assert "not recorded" in stale[cases[0]][1]


@pytest.mark.ddp
def test_two_torchrun_ranks_write_prev_seg_once_then_train(lowres_done: Path, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m voxflow.train WORK -c 3d_cascade_fullres`: rank 0 writes every
    case's prev_seg (each exactly once) while rank 1 waits, then both ranks train (gloo, CPU)."""
    ws = _copy(lowres_done, tmp_path / "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "voxflow.train", str(ws.root), "-c", CASCADE, "-f", "0", *SHORT]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    summary = json.loads((ws.fold(CASCADE, 0).path / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    cases = Store.open(ws.preprocessed(CASCADE)).case_ids()
    for c in cases:  # one writer: one write per case (each rank writing would log every case twice)
        assert out.count(f"writing prev_seg of case {c} ") == 1, out[-4000:]
    cfg = Plan.load(ws.plans).configuration(CASCADE)
    assert stale_previous_stage(ws, cfg, cases, splits=json.loads(ws.splits.read_text())) == {}
