"""One optimiser step of a planned configuration on a fixed global batch, as rank RANK of WORLD.

Run as a script (one process per rank, gloo on localhost) by ``test_ddp.py``::

    python ddp_step.py WORK CFG RANK WORLD PORT OUT

Every process draws the same global batch (the real loader, rank 0's stream, fixed seed) and takes
its slice of it (rank r of N gets samples r*B/N .. (r+1)*B/N), builds the network from the plan with
the plan's seed, and runs :func:`voxflow.train._steps.train_epoch` for one step with the trainer's
losses, optimiser and gradient clipping (DDP-wrapped when WORLD > 1). Rank 0 saves the global-batch
loss and the updated weights to OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


def main(work_root: str, cfg_name: str, rank: int, world: int, port: int, out: str) -> None:
    from voxflow.data import build_loader
    from voxflow.nets import build_network, deep_supervision_scales
    from voxflow.plan import Plan
    from voxflow.store import Store
    from voxflow.train import LabelSpec, build_optimizer
    from voxflow.train import distributed as D
    from voxflow.train._steps import epoch_loss, train_epoch
    from voxflow.train.schedules import lr_at, set_lr
    from voxflow.train.trainer import build_losses
    from voxflow.workspace import Workspace

    torch.set_num_threads(1)
    work = Workspace(work_root)
    config = Plan.load(work.plans).configuration(cfg_name)
    store = Store.open(work.preprocessed(cfg_name))
    scales = deep_supervision_scales(config.network)
    b = config.batch_size
    with build_loader(store, store.case_ids(), config, train=True, seed=3, num_workers=0, ds_scales=scales) as loader:
        batch = next(iter(loader))
    lo, hi = rank * b // world, (rank + 1) * b // world
    batch.image, batch.target = batch.image[lo:hi], [t[lo:hi] for t in batch.target]

    info = D.setup_process_group("cpu", rank=rank, world_size=world, port=port)
    try:
        torch.manual_seed(config.train.seed)
        net = build_network(config.network, config.n_channels, LabelSpec.from_meta(store.meta).num_outputs)
        initial = {k: v.clone() for k, v in net.state_dict().items()}
        optimizer = build_optimizer(net.parameters(), config.train)
        set_lr(optimizer, lr_at(0, config.train))
        loss_fn, _ = build_losses(
            LabelSpec.from_meta(store.meta), config.train, len(scales), distributed=info.distributed
        )
        model: nn.Module = nn.parallel.DistributedDataParallel(net) if info.distributed else net
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        progress = train_epoch(
            model,
            loss_fn,
            optimizer,
            scaler,
            iter([batch]),
            n_iters=1,
            info=info,
            amp_dtype=None,
            grad_clip=config.train.grad_clip,
            desc="step",
        )
        loss = epoch_loss(progress, info)
        if info.is_main:
            torch.save({"loss": loss, "state": net.state_dict(), "initial": initial, "local_batch": hi - lo}, out)
    finally:
        D.cleanup(info)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), str(Path(a[5])))
