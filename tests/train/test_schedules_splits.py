from __future__ import annotations

import json
import math

import pytest
import torch

from voxflow.errors import PlanError
from voxflow.plan.schema import TrainSpec
from voxflow.train.schedules import build_optimizer, lr_at
from voxflow.train.splits import fold_cases, load_or_create_splits, make_splits
from voxflow.workspace import Workspace


def test_poly_schedule_is_nnunets() -> None:
    spec = TrainSpec(epochs=10)
    assert lr_at(0, spec) == pytest.approx(1e-2)
    assert lr_at(5, spec) == pytest.approx(1e-2 * 0.5**0.9)
    assert lr_at(9, spec) == pytest.approx(1e-2 * 0.1**0.9)


def test_cosine_with_warmup() -> None:
    spec = TrainSpec(epochs=12, schedule="cosine", warmup_epochs=2, lr=1.0)
    assert [lr_at(e, spec) for e in (0, 1)] == pytest.approx([0.5, 1.0])
    assert lr_at(2, spec) == pytest.approx(1.0)
    assert lr_at(7, spec) == pytest.approx(0.5)
    assert lr_at(11, spec) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))


def test_optimizers_by_name() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(params, TrainSpec())
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"]
    assert sgd.defaults["momentum"] == 0.99
    assert sgd.defaults["weight_decay"] == 3e-5
    assert isinstance(build_optimizer(params, TrainSpec(optimizer="adamw", lr=1e-3)), torch.optim.AdamW)


def test_splits_are_seeded_disjoint_and_grouped() -> None:
    ids = [f"c{i}" for i in range(11)]
    a, b = make_splits(ids), make_splits(ids)
    assert a == b
    assert len(a) == 5
    assert sorted(c for f in a for c in f["val"]) == sorted(ids)
    for f in a:
        assert set(f["train"]).isdisjoint(f["val"])
        assert set(f["train"]) | set(f["val"]) == set(ids)
    groups = {c: f"patient{i // 3}" for i, c in enumerate(ids)}
    for f in make_splits(ids, groups=groups):
        val_groups = {groups[c] for c in f["val"]}
        assert val_groups.isdisjoint(groups[c] for c in f["train"])
    assert len(make_splits(ids[:3])) == 3
    with pytest.raises(PlanError, match="at least 2"):
        make_splits(ids[:1])


def test_splits_file_written_once_and_user_file_honoured(tmp_path) -> None:
    work = Workspace(tmp_path)
    ids = ["a", "b", "c", "d"]
    first = load_or_create_splits(work, ids)
    assert json.loads(work.splits.read_text()) == first
    user = [{"train": ["a", "b"], "val": ["c"]}]
    work.splits.write_text(json.dumps(user))
    assert load_or_create_splits(work, ids) == user
    assert fold_cases(user, 0, ids) == (["a", "b"], ["c"])
    assert fold_cases(user, "all", ids) == (ids, ids)
    with pytest.raises(PlanError, match="fold must be"):
        fold_cases(user, 3, ids)
    work.splits.write_text(json.dumps([{"train": ["zz"], "val": ["a"]}]))
    with pytest.raises(PlanError, match="zz"):
        load_or_create_splits(work, ids)
