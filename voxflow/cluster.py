"""The one place where ``--scheduler`` becomes a Dask scheduler or client.

Accepted values:

* ``threads`` (default) -- the threaded scheduler; on few cores as fast as a cluster for
  codec-heavy work, since the Zarr codecs release the GIL;
* ``processes`` -- dask's multiprocessing scheduler;
* ``sync`` -- single-threaded, for debugging;
* ``local:N`` -- a ``distributed.LocalCluster`` with N single-threaded worker processes
  (``memory_limit`` per worker, e.g. ``"2GB"``); its dashboard address is logged;
* ``tcp://host:port`` -- an existing cluster started with ``dask scheduler`` / ``dask worker``.

Small and big cases: a case with fewer voxels than :data:`SMALL_CASE_VOXELS` (2**22, about 161^3)
is converted, preprocessed or evaluated whole by one task (its graph computed in memory by the
synchronous scheduler, each array written with one ``setitem``), all small cases of a stage in one
compute (:func:`compute_cases`), so many small cases keep every worker busy; the stores are the
same bytes as the chunked path writes. A bigger case keeps its chunked graph, whose memory is
bounded by its chunks. On the threaded scheduler the per-case work of small cases is mostly
Python holding the GIL, so :data:`POOL_MIN_CASES` or more of them run in worker processes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import dask
import dask.callbacks

from voxflow.errors import VoxflowError

__all__ = [
    "BIG_CASE_VOXELS",
    "POOL_MIN_CASES",
    "SMALL_CASE_VOXELS",
    "case_progress",
    "compute",
    "compute_cases",
    "is_small_case",
    "scheduler_context",
    "stage_bar",
    "validate_scheduler",
]

log = logging.getLogger(__name__)
_LOCAL = ("threads", "processes", "sync")
BIG_CASE_VOXELS = 2**25  # ~32 M voxels (about 320^3): a case this big takes seconds per stage
#: A case with fewer voxels than this (~4.2 M, about 161^3) is processed whole by one task of its stage
#: (convert, preprocess, evaluate), many such tasks in one compute so that small cases keep every core
#: busy; its arrays are then in the task's memory (tens of MB per channel and copy). A case this big or
#: bigger keeps its chunked graph, whose memory is bounded by the chunks whatever the volume.
SMALL_CASE_VOXELS = 2**22
#: With the threaded scheduler, this many small cases or more run in worker processes (compute_cases);
#: the pool costs ~2.5 s to start on 2 busy cores (one import of voxflow), measured a loss at 24
#: hippocampus cases and a gain at 150 small cases (benchmarks/small_cases.py)
POOL_MIN_CASES = 48


def stage_bar(total: int, *, desc: str, progress: bool = True, unit: str = "case") -> Any:
    """The one progress bar of a stage, over its cases (or trials): a tqdm to ``update()``.

    Per-case work shows its own bar only when :func:`case_progress` says the case is big."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress or total == 0)


def case_progress(progress: bool, n_voxels: int) -> bool:
    """Whether one case gets its own progress bars: only when it is big enough to take seconds."""
    return bool(progress) and int(n_voxels) >= BIG_CASE_VOXELS


def is_small_case(n_voxels: int) -> bool:
    """Whether a case of ``n_voxels`` (per channel) is computed whole by one task (see :data:`SMALL_CASE_VOXELS`)."""
    return int(n_voxels) < SMALL_CASE_VOXELS


def _local_get(spec: str) -> Any:
    """The scheduler function of a local spec: set as a callable, dask does not import ``distributed``
    (~1 s) on every compute just to look for a client."""
    import dask.threaded

    return dask.local.get_sync if spec == "sync" else dask.threaded.get


def validate_scheduler(spec: str) -> str:
    """Return ``spec`` if it names a scheduler voxflow knows; raise a helpful error otherwise."""
    if spec in _LOCAL or spec.startswith(("tcp://", "tls://", "inproc://")):
        return spec
    if spec.startswith("local:"):
        n = spec.split(":", 1)[1]
        if n.isdigit() and int(n) > 0:
            return spec
    raise VoxflowError(
        f"--scheduler must be one of threads, processes, sync, local:N (N workers) or tcp://host:port; got {spec!r}."
    )


@contextlib.contextmanager
def scheduler_context(
    spec: str = "threads", *, memory_limit: str | None = None, num_workers: int | None = None
) -> Iterator[Any]:
    """Run the enclosed ``dask.compute`` calls on the scheduler ``spec``.

    Yields the ``distributed.Client`` for cluster schedulers, else ``None``.
    """
    spec = validate_scheduler(spec)
    if spec in _LOCAL:
        cfg: dict[str, Any] = {"scheduler": spec if spec == "processes" else _local_get(spec)}
        if num_workers:
            cfg["num_workers"] = num_workers
        if spec == "processes":  # one worker pool for the whole block, not one per compute
            with _process_pool(num_workers) as pool, dask.config.set({**cfg, "pool": pool}):
                yield None
            return
        with dask.config.set(cfg):
            yield None
        return
    from distributed import Client, LocalCluster

    if spec.startswith("local:"):
        n = int(spec.split(":", 1)[1])
        with (
            LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                memory_limit=memory_limit or "auto",
                dashboard_address=":0",
            ) as cluster,
            Client(cluster) as client,
        ):
            log.info("Dask LocalCluster with %d workers; dashboard at %s", n, client.dashboard_link)
            yield client
        return
    with Client(spec) as client:
        log.info("connected to Dask scheduler %s; dashboard at %s", spec, client.dashboard_link)
        yield client


@contextlib.contextmanager
def _process_pool(num_workers: int | None) -> Iterator[Any]:
    """The process pool dask's ``processes`` scheduler would create per compute, kept for a block."""
    import functools
    import os
    from concurrent.futures import ProcessPoolExecutor

    import dask.multiprocessing as dmp

    if os.environ.get("PYTHONHASHSEED") in (None, "0"):
        os.environ["PYTHONHASHSEED"] = "6640"  # as dask does: consistent hashing in the workers
    pool = ProcessPoolExecutor(
        num_workers or dmp.CPU_COUNT,
        mp_context=dmp.get_context(),
        initializer=functools.partial(dmp.initialize_worker_process, user_initializer=None),
    )
    try:
        yield pool
    finally:
        pool.shutdown()


def compute(*collections: Any, desc: str = "computing", progress: bool = True) -> tuple[Any, ...]:
    """``dask.compute`` with a tqdm progress bar over tasks, on whatever scheduler is active.

    On the local schedulers the bar follows finished tasks; on a distributed client it follows
    finished futures.
    """
    if not progress:
        return dask.compute(*collections)
    client = _current_client()
    from tqdm.auto import tqdm

    if client is not None:
        from distributed import as_completed

        futures = client.compute(list(collections))
        with tqdm(total=len(futures), desc=desc, unit="part", leave=False) as bar:
            for _ in as_completed(futures):
                bar.update(1)
        return tuple(client.gather(futures))
    return dask.compute(*collections, callbacks=[_TqdmCallback(desc)._callback])


def compute_cases(
    tasks: Sequence[Any], *, bar: Any = None, preload: Sequence[str] = (), pool: bool = True
) -> list[Any]:
    """Compute one Delayed task per (small) case in one go, advancing the stage ``bar`` (a
    :func:`stage_bar`, or None) by one as each task finishes; results in task order.

    On a cluster or the ``processes``/``sync`` scheduler the tasks run there. On the threaded
    scheduler, :data:`POOL_MIN_CASES` or more tasks go to a pool of worker processes instead: a small
    case's work is mostly Python (graph building, Zarr metadata) that holds the GIL, so threads
    leave all but one core idle. The workers fork from a server that imported ``preload`` (the
    modules of the task functions) once, so a worker starts in milliseconds. ``pool=False``: never
    (for tasks whose work releases the GIL anyway).
    """
    if not tasks:
        return []
    client = _current_client()
    if client is not None:
        from distributed import as_completed

        futures = client.compute(list(tasks))
        for _ in as_completed(futures):
            if bar is not None:
                bar.update(1)
        return list(client.gather(futures))
    keys = {t.key for t in tasks}

    def _posttask(key: Any, *_: Any) -> None:
        if bar is not None and key in keys:
            bar.update(1)

    callbacks = [dask.callbacks.Callback(posttask=_posttask)._callback]
    n = int(dask.config.get("num_workers", None) or _cpu_count())
    if pool and _threaded() and n > 1 and len(tasks) >= POOL_MIN_CASES:
        from dask.multiprocessing import get as processes_get

        with _case_pool(min(n, len(tasks)), preload) as pool:
            return list(dask.compute(*tasks, scheduler=processes_get, pool=pool, callbacks=callbacks))
    return list(dask.compute(*tasks, callbacks=callbacks))


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _threaded() -> bool:
    """Whether the active local scheduler is dask's threaded one (set by name, by function or default)."""
    import dask.threaded

    spec = dask.config.get("scheduler", None)
    return spec is None or spec is dask.threaded.get or spec == "threads"


@contextlib.contextmanager
def _case_pool(n: int, preload: Sequence[str]) -> Iterator[Any]:
    """A process pool whose workers fork from a ``forkserver`` that imported ``preload`` once."""
    import functools
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    import dask.multiprocessing as dmp

    if os.environ.get("PYTHONHASHSEED") in (None, "0"):
        os.environ["PYTHONHASHSEED"] = "6640"  # as dask does: consistent hashing in the workers
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    pool = ProcessPoolExecutor(
        n, mp_context=ctx, initializer=functools.partial(dmp.initialize_worker_process, user_initializer=None)
    )
    try:
        yield pool
    finally:
        pool.shutdown()


def _current_client() -> Any:
    """The active ``distributed`` client, or None; without importing ``distributed`` when no one has."""
    import sys

    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


class _TqdmCallback(dask.callbacks.Callback):  # type: ignore[misc]
    def __init__(self, desc: str):
        super().__init__()
        self._desc = desc
        self._bar: Any = None

    def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self._bar = tqdm(total=total, desc=self._desc, unit="task", leave=False)

    def _posttask(self, key: Any, result: Any, dsk: Any, state: dict[str, Any], worker_id: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def _finish(self, dsk: Any, state: dict[str, Any], errored: bool) -> None:
        if self._bar is not None:
            self._bar.close()


def split_evenly(items: Sequence[Any], n: int) -> list[list[Any]]:
    """Split ``items`` into ``n`` contiguous, nearly equal parts (for per-rank/device work)."""
    k, m = divmod(len(items), n)
    return [list(items[i * k + min(i, m) : (i + 1) * k + min(i + 1, m)]) for i in range(n)]
