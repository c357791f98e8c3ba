"""Test helpers shipped with voxflow: laziness guards, small synthetic arrays, RSS measurement."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import dask
import numpy as np

__all__ = [
    "ComputeError",
    "import_path",
    "raise_if_computes",
    "run_with_memory_cap",
    "start_dask_scheduler",
    "start_dask_worker",
    "synthetic_case",
    "wait_for_json",
    "write_nnunet_model_folder",
]


def import_path(path: str | os.PathLike[str], name: str) -> Any:
    """The Python file at ``path`` as a module named ``name`` (a sibling test file, a benchmark script),
    for tests that reuse its helpers without it being a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class ComputeError(RuntimeError):
    """Raised when a graph was computed inside :func:`raise_if_computes`."""


@contextlib.contextmanager
def raise_if_computes() -> Iterator[None]:
    """Fail if anything inside the block triggers a dask compute (graph building must be lazy)."""

    def _scheduler(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        raise ComputeError("a dask graph was computed where only building it was expected")

    with dask.config.set(scheduler=_scheduler):
        yield


def synthetic_case(
    shape: Sequence[int], *, n_labels: int = 2, rng: np.random.Generator | None = None, n_channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """A small (C, Z, Y, X) float32 image with blob-shaped labels 0..n_labels (Z, Y, X uint8)."""
    rng = rng or np.random.default_rng(0)
    shape = tuple(int(s) for s in shape)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    label = np.zeros(shape, np.uint8)
    for k in range(1, n_labels + 1):
        centre = rng.uniform(-0.5, 0.5, size=3)[:, None, None, None]
        radius = rng.uniform(0.2, 0.4) / k
        label[((grid - centre) ** 2).sum(0) < radius**2] = k
    image = np.stack(
        [(label * (50.0 + 10 * c) + rng.normal(0, 10, size=shape)).astype(np.float32) for c in range(n_channels)]
    )
    return image, label


#: stack of each Python thread in :func:`run_with_memory_cap`'s child: ample for the recursion limit
CHILD_THREAD_STACK_BYTES = 4 * 2**20


def run_with_memory_cap(
    code: str, *, cap_bytes: int | None = None, timeout: float = 900, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run ``python -c code`` in a subprocess; return (peak RSS in bytes, its stdout).

    The peak is the child's own high-water RSS (``VmHWM``, not inflated by the parent's RSS at fork)
    plus the ``ru_maxrss`` of its children (worker processes).
    ``cap_bytes`` optionally sets RLIMIT_DATA so that an allocation beyond it fails outright,
    which proves the stage never *needed* more than the cap.

    RLIMIT_DATA counts address space, not memory: every thread's stack reservation counts in full
    (glibc reserves RLIMIT_STACK, 8 MiB here, and a thread touches tens of KiB of it). A prediction has
    about 20 Python threads (dask's pools, zarr's event loop and its executor, voxflow's readers), so
    the child's Python threads get :data:`CHILD_THREAD_STACK_BYTES` stacks: measured on the 33.5 M-voxel
    prediction under its 900 MiB cap (``tests/infer/test_infer_memory.py``), data 881 MiB with 8 MiB
    stacks (where CI once failed at the cap) and 801 MiB with 4 MiB, at the same peak RSS (624 MiB).
    """
    import resource

    def _limit() -> None:
        if cap_bytes is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (cap_bytes, cap_bytes))

    # The child's own peak is VmHWM (reset by exec); ru_maxrss of RUSAGE_SELF would include the RSS the
    # parent had when it forked (Linux keeps the larger maxrss across execve).
    wrapped = (
        f"import threading as _t\n_t.stack_size({CHILD_THREAD_STACK_BYTES})\n" + code + "\nimport resource as _r\n"
        "def _own_peak_kib():\n"
        "    try:\n"
        "        with open('/proc/self/status') as _f:\n"
        "            return int(_f.read().split('VmHWM:')[1].split()[0])\n"
        "    except (OSError, IndexError, ValueError):\n"
        "        return _r.getrusage(_r.RUSAGE_SELF).ru_maxrss\n"
        "print('__PEAK_RSS__', (_own_peak_kib()"
        " + _r.getrusage(_r.RUSAGE_CHILDREN).ru_maxrss) * 1024)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", wrapped],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    peak = 0
    lines = []
    for line in proc.stdout.splitlines():
        if line.startswith("__PEAK_RSS__"):
            peak = int(line.split()[1])
        else:
            lines.append(line)
    return peak, "\n".join(lines)


def wait_for_json(path: str | os.PathLike[str], timeout: float) -> Any:
    """The JSON that another process writes to ``path`` (e.g. a ``dask scheduler --scheduler-file``),
    once it exists and parses; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return json.load(f)
            except json.JSONDecodeError:
                pass  # still being written
        time.sleep(0.2)
    raise TimeoutError(f"no JSON at {path} after {timeout} s")


def start_dask_scheduler(
    scheduler_file: str | os.PathLike[str], *, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[subprocess.Popen[bytes], str]:
    """A ``dask scheduler`` subprocess on localhost (any free port, no dashboard) and its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        return proc, str(wait_for_json(scheduler_file, timeout)["address"])
    except BaseException:
        proc.kill()
        raise


def start_dask_worker(
    address: str,
    local_directory: str | os.PathLike[str],
    *,
    memory_limit: str = "1GB",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A one-thread ``dask worker`` subprocess (no dashboard) connected to ``address``."""
    return subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard",
         "--memory-limit", memory_limit, "--local-directory", str(local_directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip


def write_nnunet_model_folder(
    folder: str | os.PathLike[str],
    weights: dict[int, Any],
    *,
    plans: dict[str, Any],
    dataset: dict[str, Any],
    configuration: str,
    trainer: str = "nnUNetTrainer",
    mirror_axes: Sequence[int] = (0, 1, 2),
) -> None:
    """An nnU-Net v2 model folder as nnU-Net's trainer leaves it: ``plans.json``, ``dataset.json`` and
    ``fold_<k>/checkpoint_final.pth`` with the state dict ``weights[k]`` (for tests and benchmarks)."""
    import torch  # only here: the other helpers work without it

    root = os.fspath(folder)
    for fold, state in weights.items():
        os.makedirs(os.path.join(root, f"fold_{fold}"), exist_ok=True)
        init_args = {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": dataset,
                     "device": "cpu"}  # fmt: skip
        checkpoint = {"network_weights": state, "optimizer_state": None, "grad_scaler_state": None, "logging": {},
                      "_best_ema": None, "current_epoch": 0, "init_args": init_args, "trainer_name": trainer,
                      "inference_allowed_mirroring_axes": tuple(mirror_axes)}  # fmt: skip
        torch.save(checkpoint, os.path.join(root, f"fold_{fold}", "checkpoint_final.pth"))
    for name, content in (("plans.json", plans), ("dataset.json", dataset)):
        with open(os.path.join(root, name), "w", encoding="utf-8") as f:
            json.dump(content, f)
