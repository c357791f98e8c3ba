"""Every CUDA path, on the planner's own plans (``planned_workspace``): ``make gpu-check``.

Marked ``gpu``: the default suite deselects them and they skip without CUDA. Figures (memory-estimate
ratio, CPU/GPU agreement) are printed; run with ``-s`` (``make gpu-check`` does) to see them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHORT = {"train.epochs": 1, "train.iters_per_epoch": 3, "train.val_iters": 1}


def _copy(planned_workspace: Path, tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(planned_workspace, work)
    return work


def _precisions() -> list[str]:
    out = ["fp32", "fp16"]
    if torch.cuda.is_bf16_supported():
        out.append("bf16")
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "auto"])
def test_training_on_cuda_with_each_precision(planned_workspace: Path, tmp_path: Path, precision: str) -> None:
    from voxflow.train import train_fold
    from voxflow.train.checkpoint import load_checkpoint
    from voxflow.workspace import Workspace

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    work = Workspace(_copy(planned_workspace, tmp_path))
    run = train_fold(
        work, "3d_fullres", 0, device="cuda", overrides={**SHORT, "train.precision": precision}, validate_cases=False
    )
    ckpt = load_checkpoint(run / "checkpoint_final.pt")
    expected = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if precision == "auto" else precision
    assert ckpt["precision"] == expected
    m = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(m[-1]["train_loss"])
    print(
        f"\n[gpu-check] precision {expected}: {m[-1]['seconds_per_iter']:.3f} s/iter, "
        f"data wait {m[-1]['data_wait_fraction']:.1%}"
    )


def test_augmentation_runs_on_the_device(planned_workspace: Path) -> None:
    from voxflow.data import build_loader
    from voxflow.nets import deep_supervision_scales
    from voxflow.plan import Plan
    from voxflow.store import Store
    from voxflow.workspace import Workspace

    work = Workspace(planned_workspace)
    cfg = Plan.load(work.plans).configuration("3d_fullres")
    store = Store.open(work.preprocessed("3d_fullres"))
    with build_loader(
        store,
        store.case_ids(),
        cfg,
        device="cuda",
        num_workers=2,
        seed=1,
        ds_scales=deep_supervision_scales(cfg.network),
    ) as loader:
        batch = next(iter(loader))
    assert batch.image.is_cuda
    assert all(t.is_cuda for t in batch.target)
    assert batch.image.shape[0] == cfg.batch_size


def test_planner_memory_estimate_against_cuda_peak(planned_workspace: Path) -> None:
    from voxflow.nets import build_network, deep_supervision_scales
    from voxflow.plan import Plan, estimate_memory_bytes
    from voxflow.store import Store
    from voxflow.train import LabelSpec, build_optimizer
    from voxflow.train.trainer import build_losses
    from voxflow.workspace import Workspace

    work = Workspace(planned_workspace)
    cfg = Plan.load(work.plans).configuration("3d_fullres")
    k = LabelSpec.from_meta(Store.open(work.preprocessed("3d_fullres")).meta).num_outputs
    net = build_network(cfg.network, cfg.n_channels, k).cuda().train()
    opt = build_optimizer(net.parameters(), cfg.train)
    loss_fn, _ = build_losses(
        LabelSpec.from_meta(Store.open(work.preprocessed("3d_fullres")).meta),
        cfg.train,
        len(deep_supervision_scales(cfg.network)),
    )
    x = torch.randn(cfg.batch_size, cfg.n_channels, *cfg.patch_size_vox, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16):
            outs = net(x)
            tgts = [torch.randint(0, k, (o.shape[0], 1, *o.shape[2:]), device="cuda") for o in outs]
            loss = loss_fn(outs, tgts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    estimated = estimate_memory_bytes(cfg.network, cfg.patch_size_vox, cfg.batch_size, cfg.n_channels, k, amp=True)
    ratio = estimated / measured
    print(
        f"\n[gpu-check] planner memory estimate {estimated / 2**20:.0f} MiB vs max_memory_allocated "
        f"{measured / 2**20:.0f} MiB: ratio {ratio:.2f}"
    )
    assert 0.5 < ratio < 4.0


def test_prediction_on_cuda_agrees_with_cpu(planned_workspace: Path, tmp_path: Path) -> None:
    from voxflow.infer import predict
    from voxflow.store import Store
    from voxflow.train import train_fold
    from voxflow.workspace import Workspace

    work = Workspace(_copy(planned_workspace, tmp_path))
    train_fold(work, "3d_fullres", 0, device="cuda", overrides=SHORT, validate_cases=False)
    cases = Store.open(work.dataset_store).case_ids()[:2]
    labels = {}
    for device in ("cpu", "cuda"):
        out = predict(
            work.dataset_store,
            tmp_path / f"pred_{device}",
            model_dir=work.root / "runs" / "3d_fullres",
            folds=[0],
            device=device,
            case_ids=cases,
            tta=False,
            progress=False,
            export=False,
        )
        labels[device] = [np.asarray(out.zarr_array(c, "label")[...]) for c in cases]
    agree = np.mean(np.concatenate([(a == b).ravel() for a, b in zip(labels["cpu"], labels["cuda"], strict=True)]))
    print(f"\n[gpu-check] CUDA vs CPU prediction: {agree:.4%} of voxels agree")
    assert agree >= 0.999


def _torchrun(work: Path, nproc: int) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "voxflow.train",
        str(work),
        "-c",
        "3d_fullres",
        "-f",
        "0",
        "--device",
        "cuda",
        "--epochs",
        "1",
        "--iters",
        "3",
        "--set",
        "train.val_iters=1",
        "--no-validation",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))


@pytest.mark.parametrize("nproc", [1, 2])
def test_ddp_with_nccl(planned_workspace: Path, tmp_path: Path, nproc: int) -> None:
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    work = _copy(planned_workspace, tmp_path)
    res = _torchrun(work, nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((work / "runs/3d_fullres/fold_0/training_summary.json").read_text())
    assert summary["world_size"] == nproc
    assert summary["ddp_max_param_diff"] == 0.0


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_tile_predictor_precisions_on_cuda(precision: str) -> None:
    """Batched mirrored TTA under each inference precision: float32 scores close to the CPU's fp32."""
    from torch import nn

    from voxflow.infer import TilePredictor

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 8, 3, padding=1), nn.GroupNorm(8, 8), nn.LeakyReLU(), nn.Conv3d(8, 3, 3, padding=1)
    )
    x = np.random.default_rng(0).normal(size=(2, 1, 16, 16, 16)).astype(np.float32)
    ref = TilePredictor(net, mirror_axes=(0, 1, 2)).predict(x).numpy()
    pred = TilePredictor(net, mirror_axes=(0, 1, 2), device="cuda", precision=precision)
    expected = {"auto": "bf16" if torch.cuda.is_bf16_supported() else "fp16"}.get(precision, precision)
    assert pred.precision == expected
    out = pred.predict(x)
    assert out.dtype == torch.float32
    assert out.device.type == "cuda"
    np.testing.assert_allclose(out.cpu().numpy(), ref, atol=0.03 if expected != "fp32" else 2e-3)  # TF32 convs
