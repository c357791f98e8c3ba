"""Many small cases on every CPU core: whole cases predicted in worker processes.

A small case (fewer voxels than :data:`~voxflow.cluster.SMALL_CASE_VOXELS`, e.g. the ~70 k-voxel
hippocampus cases) takes a fraction of a second per forward pass; with one process, torch's intra-op
threads run its small convolutions far below what the cores give, and the per-case Python (dask graphs,
Zarr metadata, staging) holds the GIL. So on the CPU, :data:`CASE_POOL_MIN_CASES` or more small cases are
predicted by one worker process per core, each with its own models (loaded once per worker through the
:data:`~voxflow.infer.ModelLoader`) and ``cores // workers`` torch threads, each worker taking the next
case when it finishes one. A worker runs a case through exactly the engine's sequential steps (stage,
sliding window, write, completion marker), so the stores are the bytes the sequential path writes with
the same torch thread count, and a rerun skips completed cases. Large cases keep the sequential, tiled,
bounded-memory path. No pool (the sequential path) on a GPU, with one core, few cases, a cascade, or
models that cannot be loaded again in another process.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from voxflow.errors import VoxflowError
from voxflow.infer._options import PredictOptions
from voxflow.infer._protocols import ModelLoader

__all__ = ["CASE_POOL_MIN_CASES", "cpu_count", "pool_shape", "predict_cases_in_pool"]

log = logging.getLogger(__name__)

#: this many small cases or more are predicted in worker processes (fewer: the pool's start, one
#: import of torch and voxflow in a forkserver plus a model load per worker, ~3 s on 2 busy cores,
#: would not pay back; benchmarks/small_cases.py --stages predict)
CASE_POOL_MIN_CASES = 6

_WORKER: dict[str, Any] = {}  # per worker process: its models, predictors, stores and options


def cpu_count() -> int:
    """The cores this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pool_shape(n_cases: int, cores: int) -> tuple[int, int]:
    """(worker processes, torch threads per worker) for ``n_cases`` small cases on ``cores`` cores."""
    workers = max(1, min(int(cores), int(n_cases)))
    return workers, max(1, int(cores) // workers)


def _init_worker(
    loader: ModelLoader, src_path: str, out_path: str, opts: PredictOptions, scratch_root: str, threads: int
) -> None:
    """Initializer of a worker process: torch threads, allocator setting, models loaded once."""
    import torch

    from voxflow.infer._engine import _configured
    from voxflow.infer._memory import release_large_allocations
    from voxflow.store import Store

    torch.set_num_threads(threads)
    release_large_allocations()
    models = list(loader("cpu"))
    _WORKER.update(
        models=models,
        predictors=[_configured(m.tile_predictor(device="cpu", tta=opts.tta, amp=opts.amp), opts) for m in models],
        src=Store.open(src_path),
        out=Store.open(out_path, mode="r+"),
        opts=opts,
        scratch_root=Path(scratch_root) / f"worker{multiprocessing.current_process().pid}",
    )


def _predict_case(case_id: str) -> str:
    """Predict one case in a worker (the engine's sequential steps, dask's synchronous scheduler)."""
    import dask

    from voxflow.infer._engine import _case_opts, _predict_staged, _stage_case

    w = _WORKER
    with dask.config.set(scheduler="sync"):
        staged = _stage_case(w["src"], case_id, w["models"], w["scratch_root"])
        _predict_staged(staged, w["models"], w["predictors"], w["out"], _case_opts(w["opts"], w["src"], case_id))
    return case_id


def predict_cases_in_pool(
    src_path: Path,
    out_path: Path,
    loader: ModelLoader,
    case_ids: Sequence[str],
    opts: PredictOptions,
    scratch_root: Path,
    *,
    bar: Any = None,
) -> None:
    """Predict ``case_ids`` (small cases) on the CPU in one worker process per core (see the module
    docstring), advancing ``bar`` per finished case. Raises :class:`VoxflowError` naming the cases that
    failed once the others are done; the completed ones stay complete (a rerun resumes)."""
    workers, threads = pool_shape(len(case_ids), cpu_count())
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "voxflow.infer"])
    worker_opts = PredictOptions.build(opts, progress=False)
    init = (loader, str(src_path), str(out_path), worker_opts, str(scratch_root), threads)
    log.info("predicting %d small cases in %d processes (%d torch threads each)", len(case_ids), workers, threads)
    failed: list[str] = []
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init) as pool:
        futures: dict[Future[str], str] = {pool.submit(_predict_case, cid): cid for cid in case_ids}
        for fut in as_completed(futures):
            try:
                fut.result()
            except (BrokenProcessPool, VoxflowError, OSError, ValueError, RuntimeError) as exc:
                log.error("case %s failed in a prediction worker: %s", futures[fut], exc)
                failed.append(f"{futures[fut]} ({type(exc).__name__}: {exc})")
            if bar is not None:
                bar.update(1)
    if failed:
        raise VoxflowError(
            f"every case must be predicted; {len(failed)} failed in the worker processes: {'; '.join(failed[:5])}. "
            "Rerun to resume (completed cases are kept), or see the log of the first failure."
        )
