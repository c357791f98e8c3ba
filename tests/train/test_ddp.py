"""Multi-process training on the planner's own plans (``planned_workspace``: default preset of the real
hippocampus data, 4 stages, 32-256 features): equivalence of 2 ranks with 1 process, ``--nproc 2``,
two torchrun "nodes", preemption by a real signal and exact resume. gloo on CPU; every test here
runs in the default suite (and so in CI)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from voxflow.train import distributed as D
from voxflow.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.ddp
HERE = Path(__file__).resolve().parent
SHORT = ["--epochs", "1", "--iters", "2", "--set", "train.val_iters=1", "--no-validation", "--num-workers", "0"]


def _env() -> dict[str, str]:
    repo = str(HERE.parents[1])
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p),
    }


def _voxflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "voxflow", *args]


def _run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout, env=_env()
    )


def _one_step(work: Path, cfg: str, world: int, out: Path) -> dict:
    port = D.free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "ddp_step.py"), str(work), cfg, str(r), str(world), str(port), str(out)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        for r in range(world)
    ]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("cfg", ["3d_fullres", "2d"])
def test_two_ranks_take_the_step_of_one_process_with_the_whole_batch(
    planned_workspace: Path, tmp_path: Path, cfg: str
) -> None:
    """Same weights, same samples: 2 ranks x batch b/2 give the loss and updated weights of 1 x batch b."""
    single = _one_step(planned_workspace, cfg, 1, tmp_path / "single.pt")
    ddp = _one_step(planned_workspace, cfg, 2, tmp_path / "ddp.pt")
    assert ddp["local_batch"] * 2 == single["local_batch"]  # rank 0 saw half the batch
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    a, b = single["state"], ddp["state"]
    for k in a:  # relative 1e-5; zero-initialised norm biases hold only the update: absolute 1e-7 there
        assert float((a[k] - b[k]).abs().max()) <= 1e-5 * float(a[k].abs().max()) + 1e-7, k
    # and the updates themselves agree: float32 sums in another order, not another optimisation
    step_a = torch.cat([(a[k] - single["initial"][k]).flatten() for k in a])
    step_b = torch.cat([(b[k] - single["initial"][k]).flatten() for k in a])
    assert float((step_a - step_b).norm() / step_a.norm()) < 1e-3
    # both started from the same weights, and the step moved them (well beyond the tolerance)
    assert all(torch.equal(single["initial"][k], ddp["initial"][k]) for k in a)
    moved = max(float((a[k] - single["initial"][k]).abs().max()) for k in a)
    assert moved > 1e-4


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "training_summary.json").read_text())


@pytest.mark.parametrize("cfg", ["3d_fullres", "2d"])
def test_train_nproc_2_on_the_planned_configuration(planned_workspace: Path, tmp_path: Path, cfg: str) -> None:
    """`voxflow train WORK -c CFG -f 0 --nproc 2` on the planner's plan runs to the end (it crashed on the
    second iteration before: the unsupervised lowest head received no gradient)."""
    work = tmp_path / "work"
    shutil.copytree(planned_workspace, work)
    res = _run(_voxflow("train", str(work), "-c", cfg, "-f", "0", "--nproc", "2", *SHORT))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = _summary(work / "runs" / cfg / "fold_0")
    assert summary["world_size"] == 2
    assert summary["ddp_max_param_diff"] == 0.0


def test_two_torchrun_nodes(planned_workspace: Path, tmp_path: Path) -> None:
    """Two torchrun agents as two nodes of one process each (c10d rendezvous on localhost), as on a cluster."""
    work = tmp_path / "work"
    shutil.copytree(planned_workspace, work)
    endpoint = f"127.0.0.1:{D.free_port()}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                endpoint,
                "--rdzv-id",
                "vf",
                "-m",
                "voxflow.train",
                str(work),
                "-c",
                "2d",
                "-f",
                "0",
                *SHORT,
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        for node in (0, 1)
    ]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(s[-3000:] for s in logs)
    summary = _summary(work / "runs" / "2d" / "fold_0")
    assert summary["world_size"] == 2
    assert summary["ddp_max_param_diff"] == 0.0  # all-reduced max difference of every weight over the ranks


PREEMPT = [
    "--epochs",
    "2",
    "--iters",
    "4",
    "--set",
    "train.val_iters=1",
    "--set",
    "batch_size=4",
    "--set",
    "train.checkpoint_every=1",
    "--no-validation",
    "--num-workers",
    "0",
]


def test_sigterm_on_a_two_rank_run_checkpoints_and_resume_is_exact(planned_workspace: Path, tmp_path: Path) -> None:
    ref, work = tmp_path / "ref", tmp_path / "work"
    shutil.copytree(planned_workspace, ref)
    shutil.copytree(planned_workspace, work)
    run_dir = work / "runs" / "2d" / "fold_0"
    cmd = _voxflow("train", str(work), "-c", "2d", "-f", "0", "--nproc", "2", *PREEMPT)
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before the signal; make it longer"
    time.sleep(1.0)  # into epoch 1
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by SIGTERM" in err
    assert "--resume" in err
    ckpt = load_checkpoint(run_dir / "checkpoint_latest.pt")
    assert not (run_dir / "checkpoint_final.pt").exists()
    assert ckpt["world_size"] == 2
    assert len(ckpt["rank_states"]) == 2
    state = ckpt["trainer_state"]
    assert (state["epoch"], state["epoch_steps"]) != (0, 0)

    # a copy resumed with one process works and says the streams differ
    other = tmp_path / "other"
    shutil.copytree(work, other)
    res1 = _run(_voxflow("train", str(other), "-c", "2d", "-f", "0", "--resume", *PREEMPT))
    assert res1.returncode == 0, res1.stderr[-3000:]
    assert "resuming a run of 2 processes with 1" in res1.stderr

    res = _run(_voxflow("train", str(work), "-c", "2d", "-f", "0", "--nproc", "2", "--resume", *PREEMPT))
    assert res.returncode == 0, res.stderr[-3000:]
    full = _run(_voxflow("train", str(ref), "-c", "2d", "-f", "0", "--nproc", "2", *PREEMPT))
    assert full.returncode == 0, full.stderr[-3000:]
    a = load_checkpoint(run_dir / "checkpoint_final.pt")
    b = load_checkpoint(ref / "runs" / "2d" / "fold_0" / "checkpoint_final.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in b["network"]:
        assert torch.allclose(a["network"][k], b["network"][k], rtol=0, atol=1e-6), k
    ma = [json.loads(s)["train_loss"] for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(s)["train_loss"] for s in (ref / "runs/2d/fold_0/metrics.jsonl").read_text().splitlines()]
    assert ma == pytest.approx(mb, rel=1e-5)
