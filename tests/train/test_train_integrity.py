"""Issue 19: no training on a partly preprocessed store, stale generated splits, or a locked fold."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

from voxflow._lock import dir_lock_file
from voxflow.errors import IncompleteStoreError, LockedError, PlanError
from voxflow.geometry import Geometry
from voxflow.store import Store
from voxflow.train import load_or_create_splits, make_splits, train_fold

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_fakes import fake_build_loader, make_workspace  # noqa: E402


def _train(work):  # noqa: ANN001, ANN202
    return train_fold(work, "tiny", 0, loader_factory=fake_build_loader, num_workers=0, validate_cases=False)


def test_refuses_a_store_with_an_incomplete_case(tmp_path: Path) -> None:
    work = make_workspace(tmp_path, n_cases=3)
    store = Store.open(work.preprocessed("tiny"), mode="r+")
    store.begin_case("case_003", geometry=Geometry(shape_zyx=(16, 20, 20), spacing_zyx=(1.0, 1.0, 1.0)))
    with pytest.raises(IncompleteStoreError, match=r"case_003.*voxflow preprocess .* -c tiny"):
        _train(work)
    assert not work.splits.exists()  # no splits made from the partial case list


def test_refuses_a_store_whose_preprocessing_stopped_before_some_cases(tmp_path: Path) -> None:
    work = make_workspace(tmp_path, n_cases=3)
    Store.open(work.preprocessed("tiny"), mode="r+").expect_cases(["case_000", "case_007"])
    with pytest.raises(IncompleteStoreError, match="case_007"):
        _train(work)


def test_generated_splits_must_cover_the_store(tmp_path: Path) -> None:
    work = make_workspace(tmp_path, n_cases=4)
    ids = [f"case_{i:03d}" for i in range(4)]
    work.splits.write_text(json.dumps(make_splits(ids[:3])))  # voxflow made it while case_003 was missing
    with pytest.raises(PlanError, match=r"made from 3 cases.*case_003.*Delete"):
        load_or_create_splits(work, ids)
    hand = [{"train": ["case_000", "case_001"], "val": ["case_002"]}]  # written by a person: honoured
    work.splits.write_text(json.dumps(hand))
    assert load_or_create_splits(work, ids) == hand


def test_a_second_trainer_of_the_same_fold_fails_naming_the_holder(tmp_path: Path) -> None:
    work = make_workspace(tmp_path, n_cases=3)
    lock = dir_lock_file(work.run_dir("tiny", 0))
    lock.parent.mkdir(parents=True)
    # pid 1 is alive and older than this lock: a live holder on this host
    lock.write_text(
        json.dumps(
            {
                "pid": 1,
                "host": socket.gethostname(),
                "command": "train",
                "started": "just now",
                "started_unix": time.time(),
            }
        )
    )
    with pytest.raises(LockedError, match="pid 1 .*'train'"):
        _train(work)
    assert not (work.run_dir("tiny", 0) / "checkpoint_latest.pt").exists()
