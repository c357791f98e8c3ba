"""``distributed.main_first`` on 2 real gloo ranks (CPU): rank 0 works while rank 1 waits, and an
error on rank 0 stops rank 1 with a clear error instead of a hang."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from voxflow.train import distributed as D

pytestmark = pytest.mark.ddp


def _rank(rank: int, port: int, out: str) -> None:
    from voxflow.errors import IncompleteStoreError, VoxflowError

    info = D.setup_process_group("cpu", rank=rank, world_size=2, port=port)
    marker = Path(out) / "written"

    def work() -> str:
        time.sleep(1.0)  # rank 1 must not get past main_first before this is done
        marker.write_text("done")
        return "result"

    def broken() -> str:
        time.sleep(0.5)
        raise IncompleteStoreError("no lowres fold")

    record: dict[str, object] = {}
    try:
        record["result"] = D.main_first(info, work, what="preparing")
        record["saw_marker"] = marker.is_file()
        try:
            D.main_first(info, broken, what="preparing")
        except VoxflowError as e:
            record["error"] = f"{type(e).__name__}: {e}"
    finally:
        D.cleanup(info)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


def test_rank_0_works_while_the_others_wait_and_its_error_stops_them(tmp_path: Path) -> None:
    mp.start_processes(_rank, args=(D.free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["result"] == "result"
    assert r1["result"] is None
    assert r0["saw_marker"]
    assert r1["saw_marker"]  # rank 1 went on only after rank 0 had written
    assert r0["error"] == "IncompleteStoreError: no lowres fold"  # rank 0's own error, re-raised
    assert str(r1["error"]).startswith("VoxflowError: rank 0 failed while preparing")
