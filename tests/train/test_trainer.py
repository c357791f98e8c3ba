from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from voxflow.plan.schema import TrainSpec
from voxflow.train import load_model, lr_at, train_fold
from voxflow.train.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_fakes import fake_build_loader, make_workspace, tiny_network  # noqa: E402


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_smoke_loss_decreases_and_run_dir_is_complete(tmp_path: Path) -> None:
    work = make_workspace(tmp_path, epochs=3, iters_per_epoch=4)
    run_dir = train_fold(work, "tiny", 0, loader_factory=fake_build_loader, num_workers=0, validate_cases=False)
    m = _metrics(run_dir)
    assert [r["epoch"] for r in m] == [0, 1, 2]
    assert m[-1]["train_loss"] < 0.85 * m[0]["train_loss"]
    assert [r["lr"] for r in m] == pytest.approx([lr_at(e, TrainSpec(epochs=3)) for e in range(3)])
    for name in (
        "checkpoint_latest.pt",
        "checkpoint_best.pt",
        "checkpoint_final.pt",
        "progress.png",
        "training_log.txt",
        "training_summary.json",
    ):
        assert (run_dir / name).is_file(), name
    assert "epoch 2" in (run_dir / "training_log.txt").read_text()
    net, cfg, meta = load_model(run_dir / "checkpoint_final.pt")
    assert not net.training
    assert cfg.name == "tiny"
    assert meta.labels["lesion"] == 2
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
    assert json.loads(work.splits.read_text())  # splits made on first use


def test_2d_residual_config_and_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import voxflow.train.trainer as trainer

    # an EMA of momentum 1 keeps its first value exactly: no later epoch can improve on it, so
    # patience 1 must stop the run after its second epoch
    monkeypatch.setattr(trainer, "EMA_MOMENTUM", 1.0)
    work = make_workspace(
        tmp_path,
        patch=(1, 16, 16),
        network=tiny_network(dims=2, architecture="resenc_unet"),
        epochs=2,
        optimizer="adamw",
        lr=1e-3,
        schedule="cosine",
        warmup_epochs=1,
        class_weighted_ce=True,
        early_stopping_patience=1,
        loss="dice_ce",
    )
    run_dir = train_fold(
        work,
        "tiny",
        "all",
        loader_factory=fake_build_loader,
        num_workers=0,
        validate_cases=False,
        overrides={"train.epochs": 6},
    )
    ckpt = load_checkpoint(run_dir / "checkpoint_final.pt")
    state = ckpt["trainer_state"]
    assert len(state["class_weights"]) == 3
    assert state["class_weights"][2] > state["class_weights"][0]
    m = _metrics(run_dir)
    # early stopping: patience 1 stops at the first epoch without a new best EMA
    assert state["stopped_early"] is True
    assert [r["epoch"] for r in m] == [0, 1]
    assert [r["new_best"] for r in m] == [True, False]
    assert ckpt["configuration"]["train"]["epochs"] == 6


def test_cli_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import voxflow.train.trainer as trainer
    from voxflow.cli import main

    work = make_workspace(tmp_path)
    monkeypatch.setattr(trainer, "_default_loader", lambda: fake_build_loader)
    res = CliRunner().invoke(
        main,
        [
            "train",
            str(work.root),
            "-c",
            "tiny",
            "-f",
            "1",
            "--epochs",
            "1",
            "--iters",
            "1",
            "--num-workers",
            "0",
            "--no-validation",
            "--set",
            "train.val_iters=1",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(_metrics(work.run_dir("tiny", 1))) == 1
    res = CliRunner().invoke(main, ["train", str(work.root), "-c", "tiny", "--set", "train.epoch=3"])
    assert res.exit_code != 0
    assert "Did you mean 'epochs'" in res.output


_CHILD = """
import sys, logging
sys.path.insert(0, {here!r})
from train_fakes import fake_build_loader
from voxflow.train import train_fold
from voxflow.workspace import Workspace
train_fold(Workspace({root!r}), "tiny", 0, loader_factory=fake_build_loader, num_workers=0, validate_cases=False,
           resume={resume})
"""


def test_sigkill_then_resume_finishes_with_the_right_schedule(tmp_path: Path) -> None:
    epochs = 5
    work = make_workspace(tmp_path, epochs=epochs, iters_per_epoch=3)
    run_dir = work.run_dir("tiny", 0)
    code = _CHILD.format(here=str(HERE), root=str(work.root), resume=False)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the training finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run_dir / "checkpoint_latest.pt")["epoch"]
    assert 1 <= killed_at < epochs
    assert not (run_dir / "checkpoint_final.pt").exists()

    resume = {"loader_factory": fake_build_loader, "num_workers": 0, "validate_cases": False, "resume": True}
    train_fold(work, "tiny", 0, **resume)
    final = load_checkpoint(run_dir / "checkpoint_final.pt")
    assert final["epoch"] == epochs
    assert final["trainer_state"]["epoch"] == epochs
    m = _metrics(run_dir)
    assert [r["epoch"] for r in m] == list(range(epochs))
    spec = TrainSpec(epochs=epochs)
    assert [r["lr"] for r in m] == pytest.approx([lr_at(e, spec) for e in range(epochs)])
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_at(epochs - 1, spec))
    assert not list(run_dir.glob(".checkpoint_*.tmp"))
    # resuming a finished run is a no-op
    train_fold(work, "tiny", 0, **resume)
    assert len(_metrics(run_dir)) == epochs
    # and the resumed run ends with the weights of an uninterrupted one (deterministic loader, CPU)
    ref_work = make_workspace(tmp_path / "ref", epochs=epochs, iters_per_epoch=3)
    ref = train_fold(ref_work, "tiny", 0, loader_factory=fake_build_loader, num_workers=0, validate_cases=False)
    a, b = final["network"], load_checkpoint(ref / "checkpoint_final.pt")["network"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert [r["train_loss"] for r in m] == pytest.approx([r["train_loss"] for r in _metrics(ref)], rel=1e-5)


@pytest.mark.ddp
def test_ddp_two_cpu_processes_keep_weights_identical(tmp_path: Path) -> None:
    work = make_workspace(tmp_path, epochs=2, iters_per_epoch=3, batch_size=2)
    run_dir = train_fold(
        work, "tiny", 0, nproc=2, loader_factory=fake_build_loader, num_workers=0, validate_cases=False
    )
    summary = json.loads((run_dir / "training_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["ddp_max_param_diff"] == 0.0
    assert len(_metrics(run_dir)) == 2
    # the ranks saw different data: a single-process run of the same plan ends with other weights
    single = train_fold(
        make_workspace(tmp_path / "single", epochs=2, iters_per_epoch=3, batch_size=2),
        "tiny",
        0,
        loader_factory=fake_build_loader,
        num_workers=0,
        validate_cases=False,
    )
    a = load_checkpoint(run_dir / "checkpoint_final.pt")["network"]
    b = load_checkpoint(single / "checkpoint_final.pt")["network"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_validation_is_skipped_with_a_warning_without_dataset_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from voxflow.train._steps import amp_dtype_for, resolve_precision
    from voxflow.train.validation import validate_fold

    work = make_workspace(tmp_path, n_cases=2)
    with caplog.at_level("WARNING", logger="voxflow"):
        assert validate_fold(work, "tiny", 0, ["case_000"]) is None
    assert "no dataset store" in caplog.text
    assert amp_dtype_for(resolve_precision("auto", torch.device("cpu"))) is None


def _as_written_before_unused_heads_were_dropped(path: Path) -> None:
    """Rewrite a checkpoint as the previous version wrote it: one more (unsupervised) head, heads.1,
    whose weights are the last parameters, with SGD momentum for them."""
    ckpt = torch.load(path, weights_only=False)
    net = ckpt["network"]
    n_before = sum(1 for k in net if k.startswith("heads.0."))
    assert n_before == 2
    assert "heads.1.weight" not in net
    f1 = net["encoder.stages.1.0.conv.weight"].shape[0]
    k = net["heads.0.weight"].shape[0]
    net["heads.1.weight"] = torch.randn(k, f1, 1, 1, 1)
    net["heads.1.bias"] = torch.randn(k)
    opt = ckpt["optimizer"]
    n = len(opt["param_groups"][0]["params"])
    opt["param_groups"][0]["params"] += [n, n + 1]
    opt["state"][n] = {"momentum_buffer": torch.randn(k, f1, 1, 1, 1)}
    opt["state"][n + 1] = {"momentum_buffer": torch.randn(k)}
    torch.save(ckpt, path)


def test_checkpoints_with_the_old_unsupervised_head_load_and_resume(tmp_path: Path) -> None:
    """Checkpoints written before the zero-weight lowest head was dropped still load (the head's weights
    and optimiser state are discarded) and resume to the weights of an uninterrupted run."""
    net_spec = tiny_network(features=(4, 8, 8))  # 3 stages: nnU-Net supervises 2 decoder outputs, one with weight 0
    kw = {"loader_factory": fake_build_loader, "num_workers": 0, "validate_cases": False}
    work = make_workspace(tmp_path / "a", network=net_spec, epochs=2, iters_per_epoch=2)
    run_dir = train_fold(work, "tiny", 0, overrides={"train.epochs": 1}, **kw)
    for name in ("checkpoint_latest.pt", "checkpoint_final.pt"):
        _as_written_before_unused_heads_were_dropped(run_dir / name)
    (run_dir / "checkpoint_final.pt").unlink()
    net, _, _ = load_model(run_dir / "checkpoint_latest.pt")
    assert len(net.heads) == 1
    train_fold(work, "tiny", 0, resume=True, **kw)
    ref = train_fold(make_workspace(tmp_path / "b", network=net_spec, epochs=2, iters_per_epoch=2), "tiny", 0, **kw)
    a = load_checkpoint(run_dir / "checkpoint_final.pt")["network"]
    b = load_checkpoint(ref / "checkpoint_final.pt")["network"]
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in b)


def test_precision_is_a_choice_recorded_in_the_checkpoint(tmp_path: Path) -> None:
    from voxflow.errors import PlanError
    from voxflow.train._steps import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", torch.device("cuda"), amp=False) == "fp32"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(PlanError, match="precision"):
        TrainSpec(precision="fp8")
    kw = {"loader_factory": fake_build_loader, "num_workers": 0, "validate_cases": False}
    work = make_workspace(tmp_path, epochs=1, iters_per_epoch=2)
    conv_dtypes: set[torch.dtype] = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, _i, o: conv_dtypes.add(o.dtype) if isinstance(m, torch.nn.Conv3d) else None
    )
    try:  # 2 iterations under a real CPU bf16 autocast (a slow fallback here, fine for a tiny net)
        run_dir = train_fold(work, "tiny", 0, overrides={"train.precision": "bf16"}, **kw)
    finally:
        hook.remove()
    assert torch.bfloat16 in conv_dtypes
    ckpt = load_checkpoint(run_dir / "checkpoint_final.pt")
    assert ckpt["precision"] == "bf16"
    assert ckpt["configuration"]["train"]["precision"] == "bf16"
    assert all(math.isfinite(m["train_loss"]) for m in _metrics(run_dir))
    assert all(torch.isfinite(v).all() for v in ckpt["network"].values() if v.is_floating_point())
    with pytest.raises(PlanError, match="fp16 needs a CUDA device"):
        train_fold(work, "tiny", 1, overrides={"train.precision": "fp16"}, **kw)


def test_single_case_dataset_trains_with_fold_all_and_cross_validation_says_so(tmp_path: Path) -> None:
    from voxflow.errors import PlanError

    work = make_workspace(tmp_path, n_cases=1, epochs=1, iters_per_epoch=1)
    kw = {"loader_factory": fake_build_loader, "num_workers": 0, "validate_cases": False}
    with pytest.raises(PlanError, match="at least 2 cases.*--fold all"):
        train_fold(work, "tiny", 0, **kw)
    run_dir = train_fold(work, "tiny", "all", **kw)
    assert (run_dir / "checkpoint_final.pt").is_file()


def test_rerun_without_resume_or_restart_is_refused_and_restart_starts_afresh(tmp_path: Path) -> None:
    from voxflow.errors import PlanError

    work = make_workspace(tmp_path, epochs=1, iters_per_epoch=1)
    kw = {"loader_factory": fake_build_loader, "num_workers": 0, "validate_cases": False}
    run_dir = train_fold(work, "tiny", 0, **kw)
    before = (run_dir / "checkpoint_final.pt").stat().st_mtime_ns
    with pytest.raises(PlanError, match="--resume.*--restart"):
        train_fold(work, "tiny", 0, **kw)
    assert (run_dir / "checkpoint_final.pt").stat().st_mtime_ns == before  # nothing was discarded
    (run_dir / "stale.txt").write_text("from the earlier run")
    train_fold(work, "tiny", 0, restart=True, **kw)
    assert not (run_dir / "stale.txt").exists()
    assert len(_metrics(run_dir)) == 1
    with pytest.raises(PlanError, match="give one of them"):
        train_fold(work, "tiny", 0, restart=True, resume=True, **kw)


def test_resume_after_a_kill_during_the_final_validation_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import voxflow.train.trainer as trainer

    calls: list[tuple] = []

    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt  # the process dies while predicting the validation cases

    def validates(work, cfg, fold, val_ids, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append((cfg, fold))
        summary = work.fold(cfg, fold).validation_summary
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text("{}")

    work = make_workspace(tmp_path, epochs=1, iters_per_epoch=1)
    kw = {"loader_factory": fake_build_loader, "num_workers": 0}
    monkeypatch.setattr(trainer, "validate_fold", killed)
    with pytest.raises(KeyboardInterrupt):
        train_fold(work, "tiny", 0, **kw)
    monkeypatch.setattr(trainer, "validate_fold", validates)
    train_fold(work, "tiny", 0, resume=True, **kw)
    assert calls == [("tiny", 0)]
    train_fold(work, "tiny", 0, resume=True, **kw)  # validated now: nothing more to do
    assert calls == [("tiny", 0)]
