"""`voxflow run` end to end on a tiny synthetic dataset, resume after interruption, model packaging."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.store import Store
from voxflow.synthetic import make_dataset

RUN_ARGS = [
    "--preset",
    "cpu",
    "-c",
    "3d_fullres",
    "--folds",
    "0",
    "--no-tta",
    "--set",
    "train.epochs=1",
    "--set",
    "train.iters_per_epoch=2",
    "--set",
    "train.val_iters=1",
    "--num-workers",
    "0",
]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("raw") / "ds", kind="ct", n_cases=5, n_test_cases=1, shape_zyx=(16, 32, 32), seed=3
    )


def _run(raw: Path, work: Path, *extra: str) -> str:
    result = CliRunner().invoke(main, ["run", str(raw), "--work", str(work), *RUN_ARGS, *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def finished(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("work")
    return work, _run(raw, work)


def test_run_writes_every_output_and_a_sane_summary(finished: tuple[Path, str]) -> None:
    work, output = finished
    for rel in [
        "dataset.zarr/zarr.json",
        "fingerprint.json",
        "plans.json",
        "splits.json",
        "preprocessed/3d_fullres.zarr/zarr.json",
        "runs/3d_fullres/fold_0/checkpoint_final.pt",
        "runs/3d_fullres/fold_0/validation/summary.json",
        "runs/3d_fullres/postprocessing.json",
        "best_configuration.json",
        "summary.json",
    ]:
        assert (work / rel).exists(), rel
    summary = json.loads((work / "summary.json").read_text())
    assert summary["best"] == ["3d_fullres"]
    assert 0.0 <= summary["best_dice"] <= 1.0
    assert "voxflow predict" in summary["predict_command"]
    assert str(work / "runs" / "3d_fullres") in output
    assert Store.open(work / "dataset.zarr").case_ids() == [f"synct_{i:03d}" for i in range(5)]


def test_rerun_skips_every_step(raw: Path, finished: tuple[Path, str]) -> None:
    work, _ = finished
    before = (work / "runs/3d_fullres/fold_0/checkpoint_final.pt").stat().st_mtime_ns
    output = _run(raw, work)
    for step in ("convert", "fingerprint", "plan", "preprocess", "train", "postprocess", "select"):
        assert f"[{step}] skipped" in output, step
    assert (work / "runs/3d_fullres/fold_0/checkpoint_final.pt").stat().st_mtime_ns == before


def test_interrupted_run_resumes_to_the_same_result(
    raw: Path, finished: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import voxflow.train as train_pkg

    work_ref, _ = finished
    work = tmp_path / "work"

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train_pkg, "train_fold", interrupted)
        result = CliRunner().invoke(main, ["run", str(raw), "--work", str(work), *RUN_ARGS])
        assert result.exit_code != 0
    assert (work / "preprocessed/3d_fullres.zarr").exists()
    assert not (work / "summary.json").exists()
    _run(raw, work)
    ref = json.loads((work_ref / "summary.json").read_text())
    got = json.loads((work / "summary.json").read_text())
    assert got["cv_dice"] == pytest.approx(ref["cv_dice"])
    assert json.loads((work / "plans.json").read_text()) == json.loads((work_ref / "plans.json").read_text())


def test_model_package_reproduces_workdir_prediction(raw: Path, finished: tuple[Path, str], tmp_path: Path) -> None:
    work, _ = finished
    runner = CliRunner()
    res = runner.invoke(main, ["export-model", str(work), "-o", str(tmp_path / "model.zip")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    images = str(raw / "imagesTs")
    for out, model in (
        (tmp_path / "a", str(work / "runs" / "3d_fullres")),
        (tmp_path / "b", str(tmp_path / "model.zip")),
    ):
        res = runner.invoke(
            main, ["predict", "-i", images, "-o", str(out), "-m", model, "-f", "0", "--no-tta"], catch_exceptions=False
        )
        assert res.exit_code == 0, res.output
    a, b = Store.open(tmp_path / "a" / "prediction.zarr"), Store.open(tmp_path / "b" / "prediction.zarr")
    assert a.case_ids() == b.case_ids() == ["synct_005"]
    np.testing.assert_array_equal(a.label("synct_005").compute(), b.label("synct_005").compute())
    assert sorted(p.name for p in (tmp_path / "b").glob("*.nii.gz")) == ["synct_005.nii.gz"]


def test_export_model_without_training_is_a_clear_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["export-model", str(tmp_path), "-o", str(tmp_path / "m.zip")])
    assert res.exit_code != 0
    assert "plans.json" in res.output
