"""One volume predicted by block tasks on a real cluster -- a `dask scheduler` and two `dask worker`
subprocesses -- equals the threaded single-process prediction bit for bit (mirroring TTA, 2-fold
ensemble); a worker killed with SIGKILL mid-task and a killed client both recover to the same bytes."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import voxflow
from voxflow.infer import predict
from voxflow.store import Store
from voxflow.testing import start_dask_scheduler, start_dask_worker

SHAPE = (17, 40, 36)  # cropped and resampled to (16, 39, 35): 1 x 3 x 3 blocks of (16, 16, 16), tile (8, 16, 16)
BLOCK_BYTES = 4 * 4 * 16 * 16 * 16  # (3 classes + weight) float32
# The client of the cluster runs: voxflow's engine with a model loader that sleeps per batch (so tasks
# last long enough to be killed in), defined in __main__ so that it travels to the workers by value.
CLIENT = r"""
import dataclasses, logging, sys, time
from pathlib import Path
from voxflow.infer import PredictOptions, run_prediction
from voxflow.infer._models import CheckpointLoader

class Slow:
    def __init__(self, model, delay):
        self.model, self.delay = model, delay
    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)
    def tile_predictor(self, **kw):
        inner = self.model.tile_predictor(**kw)
        def slow(tiles):
            time.sleep(self.delay)
            return inner(tiles)
        return slow

@dataclasses.dataclass(frozen=True)
class SlowLoader:
    inner: CheckpointLoader
    delay: float
    def __call__(self, device):
        return [Slow(m, self.delay) for m in self.inner(device)]

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(message)s")
src, out, runs, address, delay, block_bytes = sys.argv[1:7]
loader = SlowLoader(CheckpointLoader(tuple(sorted(Path(runs).glob("fold_*")))), float(delay))
opts = PredictOptions(scheduler=address, save_probabilities=True, progress=False, export=False,
                      block_bytes=int(block_bytes))
run_prediction(src, out, loader("cpu"), opts, loader=loader)
print("DONE")
"""


def _env() -> dict[str, str]:
    root = str(Path(voxflow.__file__).resolve().parents[1])
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "PYTHONUTF8": "1",
    }


class Cluster:
    """A `dask scheduler` and `dask worker` subprocesses on this machine."""

    def __init__(self, tmp: Path):
        self.tmp, self.workers, self.n = tmp, [], 0
        self.scheduler, self.address = start_dask_scheduler(tmp / "scheduler.json", env=_env())

    def ensure_workers(self, n: int = 2) -> None:
        self.workers = [w for w in self.workers if w.poll() is None]
        while len(self.workers) < n:
            self.n += 1
            self.workers.append(
                start_dask_worker(self.address, self.tmp / f"w{self.n}", memory_limit="2GB", env=_env())
            )
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(n, timeout=60)

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            p.terminate()
        for p in [*self.workers, self.scheduler]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):  # noqa: ANN001, ANN201
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(autouse=True)
def _one_torch_thread():  # noqa: ANN202  # tiny convolutions: threads only contend on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def case(tmp_path, meta, make_config, write_store):  # noqa: ANN001, ANN201
    """A dataset store of one case, two folds of a tiny network, and the threaded reference prediction."""
    from voxflow.nets import build_network
    from voxflow.train.checkpoint import save_checkpoint

    tmp = tmp_path / "case"
    src = write_store(tmp / "ds.zarr", meta, [SHAPE], spacing=(2.0, 1.0, 1.0))
    cfg = make_config(mirror_axes=(1, 2))  # 4 mirrorings x 2 folds per tile
    runs = tmp / "runs" / cfg.name
    for fold in (0, 1):
        torch.manual_seed(fold)
        save_checkpoint(
            runs / f"fold_{fold}" / "checkpoint_final.pt",
            {
                "network": build_network(cfg.network, 1, 3).state_dict(),
                "configuration": dataclasses.asdict(cfg),
                "dataset": meta.to_dict(),
                "in_channels": 1,
                "num_outputs": 3,
                "epoch": 1,
            },
        )
    ref = predict(src, tmp / "ref", model_dir=runs, save_probabilities=True, progress=False, export=False)
    return src, runs, ref


def _client(args: list[str], **kw: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
        encoding="utf-8",
        errors="replace",
        **kw,
    )  # type: ignore[call-overload]


def _assert_identical(out: Path, ref: Store) -> None:
    got = Store.open(out / "prediction.zarr")
    cid = ref.case_ids()[0]
    assert got.is_complete(cid)
    for name in ("label", "probs"):
        np.testing.assert_array_equal(got.zarr_array(cid, name)[...], ref.zarr_array(cid, name)[...])


def _done(out: Path) -> np.ndarray | None:
    path = out / ".scratch" / "case_000" / "model0_done"
    try:
        return np.asarray(zarr.open_array(str(path), mode="r")[...])
    except (FileNotFoundError, ValueError, KeyError, zarr.errors.NodeTypeValidationError):
        return None


def _wait_blocks(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 120) -> np.ndarray:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        done = _done(out)
        if done is not None and done.sum() >= at_least:
            return done
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} blocks done (client exit {proc.poll()}): {proc.stdout.read()}")


def _executing(dask_worker) -> int:  # noqa: ANN001
    return int(dask_worker.state.executing_count)


def _settled(cluster: Cluster, out: Path, timeout: float = 120) -> np.ndarray | None:
    """The done marks once no worker runs a task any more: tasks running when their client died
    (cancelled, but a running thread cannot be stopped) still finish and mark their blocks."""
    from distributed import Client

    deadline = time.monotonic() + timeout
    with Client(cluster.address, timeout=60) as client:
        while time.monotonic() < deadline:
            if not any(client.run(_executing).values()):
                return _done(out)
            time.sleep(0.2)
    raise TimeoutError(f"workers still busy after {timeout} s")


def test_cluster_equals_threaded_bit_for_bit_with_a_worker_killed_mid_task(cluster, case, tmp_path) -> None:  # noqa: ANN001
    """Several blocks over two workers, one SIGKILLed with a task in flight: the scheduler runs its
    tasks again on the other, and labels and probabilities equal the threaded prediction's bytes."""
    src, runs, ref = case
    cluster.ensure_workers(2)
    out = tmp_path / "out"
    proc = _client([str(src.path), str(out), str(runs), cluster.address, "0.05", str(BLOCK_BYTES)])
    done = _wait_blocks(out, proc, 1)
    victim = cluster.workers[0]
    victim.send_signal(signal.SIGKILL)  # both workers are busy while blocks remain (one task each)
    victim.wait()
    assert done.sum() < done.size - 1
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert "9 of 9 blocks of (16, 16, 16) to predict (0 already complete)" in log, log
    _assert_identical(out, ref)
    assert not (out / ".scratch").exists()


def test_killed_client_resumes_only_missing_blocks(cluster, case, tmp_path) -> None:  # noqa: ANN001
    src, runs, ref = case
    cluster.ensure_workers(2)
    out = tmp_path / "out"
    args = [str(src.path), str(out), str(runs), cluster.address, "0.05", str(BLOCK_BYTES)]
    proc = _client(args)
    _wait_blocks(out, proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _settled(cluster, out)  # tasks running when the client died still finish (and mark their blocks)
    assert before is not None
    assert 2 <= before.sum() < before.size
    rerun = _client(args)
    log, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, log
    n_before = int(before.sum())
    assert (
        f"{before.size - n_before} of {before.size} blocks of (16, 16, 16) to predict ({n_before} already "
        f"complete)" in log
    ), log
    _assert_identical(out, ref)
