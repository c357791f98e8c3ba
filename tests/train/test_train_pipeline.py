from __future__ import annotations

import json
from pathlib import Path

import pytest

from voxflow.workspace import Workspace


@pytest.mark.slow
def test_synthetic_ct_reaches_organ_dice_above_0_8(tmp_path: Path) -> None:
    """The whole path on CPU (a few minutes): synthetic CT -> convert -> fingerprint -> plan (cpu preset)
    -> preprocess -> train fold 0 with the real loader -> predict and score its validation cases."""
    from voxflow.fingerprint import compute_fingerprint
    from voxflow.io import convert
    from voxflow.plan import plan_experiment
    from voxflow.preprocess import run_preprocess
    from voxflow.synthetic import make_dataset
    from voxflow.train import train_fold

    work = Workspace(tmp_path / "work").ensure()
    raw = make_dataset(tmp_path / "raw", kind="ct", n_cases=6, shape_zyx=(24, 48, 48))
    store = convert(raw, work.dataset_store, progress=False)
    fp = compute_fingerprint(store)
    plan = plan_experiment(fp, preset="cpu")
    plan.save(work.plans)
    run_preprocess(work.dataset_store, plan, "3d_fullres", work.preprocessed("3d_fullres"))
    run_dir = train_fold(
        work,
        "3d_fullres",
        0,
        num_workers=1,
        overrides={"train.epochs": 6, "train.iters_per_epoch": 25, "train.val_iters": 2},
    )
    summary = json.loads((run_dir / "validation" / "summary.json").read_text())
    organ = str(plan.labels["organ"])
    assert summary["mean"][organ]["dice"] > 0.8
    metrics = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
