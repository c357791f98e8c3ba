from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, store_path: str, out_dir: str) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_config  # type: ignore[import-not-found]

    from voxflow.data import build_loader
    from voxflow.store import Store

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        store = Store.open(store_path)
        with build_loader(
            store,
            store.case_ids(),
            make_config((8, 8, 8)),
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            seed=5,
            num_workers=2,
        ) as loader:
            it = iter(loader)
            images = torch.stack([next(it).image for _ in range(3)])
        gathered = [torch.zeros_like(images) for _ in range(world)]
        dist.all_gather(gathered, images)
        if rank == 0:
            np.save(Path(out_dir) / "images.npy", torch.stack(gathered).numpy())
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ranks_of_a_process_group_draw_different_batches(preprocessed_store, tmp_path) -> None:
    store = preprocessed_store()
    mp.spawn(_rank_main, args=(2, _free_port(), str(store.path), str(tmp_path)), nprocs=2, join=True)
    images = np.load(tmp_path / "images.npy")  # (rank, batch, B, C, Z, Y, X)
    assert images.shape[:2] == (2, 3)
    assert not any(np.array_equal(images[0, k], images[1, k]) for k in range(3))
