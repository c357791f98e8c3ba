"""The cascade end to end: the planner plans 3d_lowres + 3d_cascade_fullres on volumes several times
the full-resolution patch, `voxflow run` trains both (lowres folds first, the cascade on their
cross-validation segmentations), selects among them, and `voxflow predict` / model packages run
both stages."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from voxflow.cli import main
from voxflow.errors import IncompleteStoreError
from voxflow.plan.schema import Plan
from voxflow.store import Store
from voxflow.synthetic import make_dataset
from voxflow.workspace import Workspace

# one `voxflow run` of the whole cascade (1.5-10 min on 2 cores, by load): the default suite's most expensive
# module, so it runs with the slow tests (`make test-slow`, which CI runs too)
pytestmark = pytest.mark.slow

# gpu_memory_gb 0.02 (CPU preset): patch (16, 24, 24) for a median image of (48, 64, 64), i.e. the
# patch covers 4.7% of the image (< 25%): the planner adds 3d_lowres (27, 36, 36) and the cascade.
RUN_ARGS = [
    "--preset",
    "cpu",
    "--gpu-memory-gb",
    "0.02",
    "-c",
    "3d_cascade_fullres",
    "--folds",
    "0",
    "--folds",
    "1",
    "--no-tta",
    "--num-workers",
    "0",
    "--set",
    "train.epochs=1",
    "--set",
    "train.iters_per_epoch=4",
    "--set",
    "train.val_iters=1",
]


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(
        tmp_path_factory.mktemp("raw") / "ds", kind="mr", n_cases=2, n_test_cases=1, shape_zyx=(48, 64, 64), seed=1
    )


@pytest.fixture(scope="module")
def finished(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("work")
    result = CliRunner().invoke(main, ["run", str(raw), "--work", str(work), *RUN_ARGS], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return work, result.output


def test_run_plans_trains_and_selects_the_cascade(finished: tuple[Path, str]) -> None:
    work, _ = finished
    plan = Plan.load(work / "plans.json")
    full, low = plan.configuration("3d_cascade_fullres"), plan.configuration("3d_lowres")
    assert full.previous_stage == "3d_lowres"
    assert low.next_stage == "3d_cascade_fullres"
    assert np.prod(full.patch_size_vox) / np.prod(full.median_shape_vox) < 0.25
    summary = json.loads((work / "summary.json").read_text())
    assert summary["configurations"] == ["3d_lowres", "3d_cascade_fullres"]  # lowres first
    cv = summary["cv_dice"]
    assert set(cv) == {"3d_lowres", "3d_cascade_fullres", "3d_lowres+3d_cascade_fullres"}
    assert all(v is not None and 0.0 <= v <= 1.0 for v in cv.values()), cv
    assert summary["best"] in (["3d_lowres"], ["3d_cascade_fullres"], ["3d_lowres", "3d_cascade_fullres"])
    ws = Workspace(work)
    for f in ("0", "1"):
        ckpt = torch.load(ws.fold("3d_cascade_fullres", f).checkpoint_final, weights_only=False)
        assert ckpt["in_channels"] == 2 + 2  # T1, T2 + one-hot edema, tumour of the previous stage


def test_training_cases_get_the_lowres_segmentation_of_the_fold_that_validated_them(finished: tuple[Path, str]) -> None:
    work, _ = finished
    ws = Workspace(work)
    splits = json.loads(ws.splits.read_text())
    store = Store.open(ws.preprocessed("3d_cascade_fullres"))
    for k, split in enumerate(splits):
        for cid in split["val"]:
            rec = store.case_attrs(cid)["previous_stage"]
            expected = {"configuration": "3d_lowres", "fold": str(k), "labels": [1, 2], "complete": True}
            assert {n: v for n, v in rec.items() if n != "source"} == expected  # source: tests/train/test_cascade_prev
            prev = store.array(cid, "prev_seg").compute()
            assert prev.shape == store.zarr_array(cid, "image").shape[1:]
            # the same label map the lowres fold wrote for its validation case, brought onto this grid
            low = Store.open(ws.fold("3d_lowres", k).validation_predictions).label(cid).compute()
            assert set(np.unique(prev)) <= {0, 1, 2}
            assert abs(float((prev > 0).mean()) - float((low > 0).mean())) < 0.05


def test_cascade_network_reads_the_previous_stage_channels(finished: tuple[Path, str]) -> None:
    """Zeroing the previous-stage channels changes the trained cascade's output on a validation case."""
    from voxflow.models import load_model

    work, _ = finished
    ws = Workspace(work)
    net, _cfg, _ = load_model(ws.fold("3d_cascade_fullres", 0).checkpoint_final)
    store = Store.open(ws.preprocessed("3d_cascade_fullres"))
    cid = json.loads(ws.splits.read_text())[0]["val"][0]
    image = torch.from_numpy(store.zarr_array(cid, "image")[...])
    prev = torch.from_numpy(store.zarr_array(cid, "prev_seg")[...].astype(np.int64))
    onehot = torch.stack([prev == 1, prev == 2]).float()
    with torch.no_grad():
        real = torch.softmax(net(torch.cat([image, onehot])[None])[0], 0)
        zero = torch.softmax(net(torch.cat([image, torch.zeros_like(onehot)])[None])[0], 0)
    assert float((real - zero).abs().mean()) > 1e-3


def test_predict_runs_both_stages_and_packages_carry_them(
    raw: Path, finished: tuple[Path, str], tmp_path: Path
) -> None:
    work, _ = finished
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["export-model", str(work), "-c", "3d_cascade_fullres", "-o", str(tmp_path / "m.zip")],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    names = zipfile.ZipFile(tmp_path / "m.zip").namelist()
    assert {"3d_lowres/fold_0/checkpoint_final.pt", "3d_cascade_fullres/fold_1/checkpoint_final.pt"} <= set(names)
    images = str(raw / "imagesTs")
    for out, model in (
        (tmp_path / "a", str(work / "runs" / "3d_cascade_fullres")),
        (tmp_path / "b", str(tmp_path / "m.zip")),
    ):
        res = runner.invoke(
            main, ["predict", "-i", images, "-o", str(out), "-m", model, "--no-tta"], catch_exceptions=False
        )
        assert res.exit_code == 0, res.output
        stage = Store.open(out / "stages" / "3d_lowres.zarr")
        assert stage.case_ids() == ["synmr_002"]
    a, b = Store.open(tmp_path / "a" / "prediction.zarr"), Store.open(tmp_path / "b" / "prediction.zarr")
    np.testing.assert_array_equal(a.label("synmr_002").compute(), b.label("synmr_002").compute())
    assert a.meta.extra["stages"] == ["3d_lowres"]


def test_cascade_without_its_first_stage_is_a_clear_error(
    finished: tuple[Path, str], tmp_path: Path, raw: Path
) -> None:
    from voxflow.infer import predict

    work, _ = finished
    alone = tmp_path / "runs"
    shutil.copytree(work / "runs" / "3d_cascade_fullres", alone / "3d_cascade_fullres")
    with pytest.raises(IncompleteStoreError, match=r"3d_lowres.*voxflow train WORK -c 3d_lowres"):
        predict(raw / "imagesTs", tmp_path / "out", model_dir=alone / "3d_cascade_fullres", progress=False)


def test_training_the_cascade_before_its_first_stage_names_the_command(
    finished: tuple[Path, str], tmp_path: Path
) -> None:
    from voxflow.train.cascade import ensure_previous_stage

    work, _ = finished
    copy = tmp_path / "w"
    shutil.copytree(work, copy, symlinks=True)
    ws = Workspace(copy)
    cfg = Plan.load(ws.plans).configuration("3d_cascade_fullres")
    splits = json.loads(ws.splits.read_text())
    cid = splits[1]["val"][0]
    Store.open(ws.preprocessed(cfg.name), mode="r+").update_case_attrs(cid, previous_stage=None)
    shutil.rmtree(ws.fold("3d_lowres", 1).validation)
    with pytest.raises(IncompleteStoreError, match=r"validation of 3d_lowres fold 1.*-c 3d_lowres -f 1 --resume"):
        ensure_previous_stage(ws, cfg, [cid], splits=splits)
    ws.fold("3d_lowres", 1).checkpoint_final.unlink()
    with pytest.raises(IncompleteStoreError, match=r"not trained.*voxflow train .* -c 3d_lowres -f 1`"):
        ensure_previous_stage(ws, cfg, [cid], splits=splits)


def test_training_batches_carry_the_previous_stage_aligned_with_the_label(finished: tuple[Path, str]) -> None:
    """The loader appends the previous stage's one-hot channels, on the label's voxels (not zeros)."""
    from voxflow.data import build_loader

    work, _ = finished
    ws = Workspace(work)
    cfg = Plan.load(ws.plans).configuration("3d_cascade_fullres")
    with build_loader(
        ws.preprocessed(cfg.name),
        Store.open(ws.preprocessed(cfg.name)).case_ids(),
        cfg,
        train=False,
        num_workers=0,
        n_batches=4,
        batch_size=4,
    ) as loader:
        batches = list(loader)
    image = torch.cat([b.image for b in batches])
    target = torch.cat([b.target[0] for b in batches])[:, 0]
    assert image.shape[1] == 4
    prev = image[:, 2:]
    assert set(torch.unique(prev).tolist()) <= {0.0, 1.0}
    assert float((prev[:, 0] * prev[:, 1]).max()) == 0.0  # one-hot: at most one class per voxel
    fg_prev, fg_ref = prev.sum(1) > 0, target > 0
    dice = 2 * float((fg_prev & fg_ref).sum()) / max(1.0, float(fg_prev.sum() + fg_ref.sum()))
    assert dice > 0.2, dice  # the lowres CV segmentation overlaps the reference of the same patch
