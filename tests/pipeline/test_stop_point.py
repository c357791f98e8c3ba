"""`run_workflow` with a stop point: the first steps only, and what `plan-and-preprocess` relies on."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxflow.errors import VoxflowError
from voxflow.pipeline import RunOptions, run_workflow
from voxflow.plan.schema import Plan
from voxflow.workspace import Workspace


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from voxflow.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("stop") / "raw", kind="ct", n_cases=2, shape_zyx=(12, 24, 24), seed=3)


def test_stop_after_plan_writes_the_plan_and_nothing_after_it(raw: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "work")
    lines: list[str] = []
    out = run_workflow(raw, ws, RunOptions(preset="cpu", stop_after="plan"), report=lines.append)
    assert out["stopped_after"] == "plan"
    assert ws.fingerprint.is_file()
    assert ws.plans.is_file()
    assert out["configurations"]
    assert set(out["configurations"]) <= set(Plan.load(ws.plans).configurations)
    assert not (ws.root / "preprocessed").exists()
    assert not ws.summary.exists()  # summary.json marks a finished run
    assert [line.split("]")[0] for line in lines] == ["[convert", "[fingerprint", "[plan"]


def test_redo_replans_with_the_new_preset_and_without_it_the_plan_is_kept(raw: Path, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "work")
    run_workflow(raw, ws, RunOptions(preset="cpu", stop_after="plan"), report=lambda _: None)
    run_workflow(raw, ws, RunOptions(preset="default", stop_after="plan"), report=lambda _: None)
    assert Plan.load(ws.plans).preset == "cpu"  # skipped: plans.json exists
    run_workflow(
        raw, ws, RunOptions(preset="default", stop_after="plan", redo=frozenset({"plan"})), report=lambda _: None
    )
    assert Plan.load(ws.plans).preset == "default"


def test_bad_stop_point_and_redo_step_are_clear_errors() -> None:
    with pytest.raises(VoxflowError, match=r"stop_after must be one of .*'preprocess'.*Did you mean 'preprocess'"):
        RunOptions(stop_after="preprocessing")  # type: ignore[arg-type]
    with pytest.raises(VoxflowError, match="redo must be one of"):
        RunOptions(redo=frozenset({"train"}))  # type: ignore[arg-type]
