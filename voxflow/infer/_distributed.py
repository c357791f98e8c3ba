"""Block-parallel prediction of one volume on a Dask cluster: block tasks, worker model cache, resume.

With ``--scheduler local:N`` or ``tcp://host:port`` the engine sends one task per block of a model's
scores (:mod:`voxflow.infer._blocks`) to the workers. Each worker process loads the models once (a
module-level cache keyed by the picklable :data:`~voxflow.infer.ModelLoader`, or by the key of
models scattered once when there is no loader) on ``device`` -- start one single-threaded worker per
GPU (``CUDA_VISIBLE_DEVICES=i dask worker ... --nthreads 1`` and ``--device cuda``). Each task reads
the tiles it needs from the staged image, writes its block of scores and then marks the block done
in a small ``model<i>_done`` array beside them; a rerun (after a killed client) submits only the
blocks not marked, and a task on a killed worker is run again by the scheduler on another one: a
block is a pure function of the staged image, so writing it twice writes the same bytes. The
scratch folder (in the output folder) must be on storage every worker can reach.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from voxflow.errors import VoxflowError
from voxflow.infer._blocks import (
    DEFAULT_BLOCK_BYTES,
    TileSchedule,
    block_boxes,
    block_grid,
    block_shape,
    predict_block,
)
from voxflow.infer._chunks import clamp_chunks
from voxflow.infer._options import PredictOptions
from voxflow.infer._protocols import ModelLoader, PredictionModel

__all__ = ["BlockRun", "block_run", "predict_blocks"]

log = logging.getLogger(__name__)
Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class BlockRun:
    """What block tasks need besides their block: the model source on the cluster and how to run it.

    ``source`` is a picklable :data:`ModelLoader` or the future of the scattered models; ``key``
    names it in the workers' model cache."""

    source: Any
    key: str
    device: str
    tta: bool
    amp: bool
    block_bytes: int = DEFAULT_BLOCK_BYTES
    precision: str = "auto"
    forward_bytes: int | None = None


@dataclass(frozen=True)
class _Preloaded:
    """Already loaded models as a model source (pickled once per worker through ``scatter``)."""

    models: tuple[PredictionModel, ...]

    def __call__(self, device: str) -> list[PredictionModel]:
        return list(self.models)


def block_run(
    client: Any, models: Sequence[PredictionModel], loader: ModelLoader | None, opts: PredictOptions
) -> BlockRun:
    """The :class:`BlockRun` of a prediction on ``client``'s cluster (checks the device and models)."""
    from dask.base import tokenize

    if not isinstance(opts.device, str) or "," in opts.device:
        raise VoxflowError(
            f"on a Dask cluster each worker predicts on one device: pass --device cpu or cuda "
            f"(and start one worker per GPU, CUDA_VISIBLE_DEVICES=i); got {opts.device!r}."
        )
    staged = [m.name for m in models if getattr(m, "previous_stage", None) is not None]
    if staged:
        raise VoxflowError(
            f"block-parallel prediction on a Dask cluster does not run cascades yet; "
            f"{staged} have a previous stage. Use --scheduler threads for cascades."
        )
    if opts.whole_image:
        raise VoxflowError(
            "whole-image tiles (--whole-image) are not block-parallel; drop --whole-image or use --scheduler threads."
        )
    if loader is not None:
        source, key = loader, f"loader-{tokenize(loader)}"
    else:
        source = client.scatter(_Preloaded(tuple(models)), broadcast=True, hash=False)
        key = f"scattered-{source.key}"
    return BlockRun(
        source,
        key,
        opts.device,
        opts.tta,
        opts.amp,
        block_bytes=opts.block_bytes,
        precision=opts.precision,
        forward_bytes=opts.forward_bytes,
    )


#: worker process cache: (source key, device, tta, amp) -> [(tile predictor, tile weights) per model]
_MODELS: dict[tuple[Any, ...], list[tuple[Any, np.ndarray]]] = {}


def _predictors(run: BlockRun, source: Any) -> list[tuple[Any, np.ndarray]]:
    """The models' tile predictors and weights in this worker process, loaded on first use."""
    from voxflow.infer._gaussian import gaussian_importance_map
    from voxflow.infer._predictor import TilePredictor

    key = (run.key, run.device, run.tta, run.amp, run.precision, run.forward_bytes)
    if key not in _MODELS:
        _MODELS.clear()  # one model set per worker: a long-lived worker does not pile up old runs
        models = source(run.device)
        entries = []
        for m in models:
            scorer = m.tile_predictor(device=run.device, tta=run.tta, amp=run.amp)
            if isinstance(scorer, TilePredictor):  # as the single-process path configures it
                scorer.configure(precision=run.precision, forward_bytes=run.forward_bytes)
            weights = m.importance_map()
            entries.append((scorer, weights if weights is not None else gaussian_importance_map(m.patch_size_vox)))
        _MODELS[key] = entries
    return _MODELS[key]


@dataclass(frozen=True)
class _BlockTask:
    image_path: str
    scores_path: str
    done_path: str
    model_index: int
    schedule: TileSchedule
    index: tuple[int, int, int]
    core: Box


def _run_block(task: _BlockTask, run: BlockRun, source: Any) -> int:
    """One block task (on a worker): predict the block's core, write it, mark it done; tiles predicted."""
    from voxflow.infer._memory import trim_heap

    predictor, weights = _predictors(run, source)[task.model_index]
    image = zarr.open_array(task.image_path, mode="r")
    values, n_tiles = predict_block(image, predictor, task.schedule, task.core, weights)
    scores = zarr.open_array(task.scores_path, mode="r+")
    # No write can race (STACK.md's sharded-Zarr corruption): the scores array is not sharded, its
    # chunks are the write unit, and a block's core is a union of whole chunks (blocks are whole
    # multiples of the chunk shape; at the volume's end both are clipped alike) that no other block
    # covers; zarr writes each chunk as one file (written to a temporary name, then renamed). A
    # task run twice (a retried or orphaned task) writes the same bytes to the same chunks.
    region = (slice(None), *(slice(lo, hi) for lo, hi in task.core))
    scores[region] = values
    zarr.open_array(task.done_path, mode="r+")[task.index] = 1  # its own chunk: after the scores
    del values
    trim_heap()
    return n_tiles


def _open_or_create(group: zarr.Group, name: str, signature: dict[str, Any], **kw: Any) -> tuple[zarr.Array, bool]:
    """The array ``name`` if it exists with ``signature`` (resume), else a new one; (array, reused)."""
    if name in group:
        arr = group[name]
        if isinstance(arr, zarr.Array) and arr.attrs.get("voxflow_blocks") == signature:
            return arr, True
    return group.create_array(name, overwrite=True, attributes={"voxflow_blocks": signature}, **kw), False


def _schedule(image: zarr.Array, model: PredictionModel, opts: PredictOptions) -> TileSchedule:
    """The single-process path's tile schedule of a staged image (same grid, tile order and batches)."""
    shape = tuple(int(s) for s in image.shape[1:])
    chunk = clamp_chunks([-(-p // 2) for p in model.patch_size_vox], shape)  # as the single-process path
    return TileSchedule(
        shape,  # type: ignore[arg-type]
        model.patch_size_vox,
        float(opts.step),
        chunk,  # type: ignore[arg-type]
        model.n_outputs,
        int(opts.cache_bytes),
        int(model.batch_size(opts.batch_size)),
    )


def _signature(schedule: TileSchedule, block: Sequence[int], model: PredictionModel, run: BlockRun) -> Any:
    """What the stored scores and done marks were computed with (JSON round trip: as stored, lists)."""
    sig = {
        "schedule": asdict(schedule),
        "block": block,
        "models": list(model.names),
        "tta": run.tta,
        "amp": run.amp,
        "device": run.device,
    }
    return json.loads(json.dumps(sig))


def predict_blocks(
    image: zarr.Array, scratch: Path, i: int, model: PredictionModel, opts: PredictOptions, run: BlockRun, *, desc: str
) -> zarr.Array:
    """Scores (K, z, y, x) of model ``i`` over its staged ``image``, block tasks on the active cluster.

    Blocks marked done in ``scratch/model<i>_done`` by an earlier run with the same schedule are kept."""
    shape = tuple(int(s) for s in image.shape[1:])
    k = model.n_outputs
    schedule = _schedule(image, model, opts)
    chunk = clamp_chunks([-(-p // 2) for p in model.patch_size_vox], shape)
    block = block_shape(shape, chunk, k, max_bytes=run.block_bytes)
    sig = _signature(schedule, block, model, run)
    group = zarr.open_group(str(scratch), mode="r+", zarr_format=3)
    scores, reused = _open_or_create(
        group,
        f"model{i}_scores",
        sig,
        shape=(k, *shape),
        chunks=(k, *chunk),
        dtype=np.float32,
        compressors=None,
        fill_value=0.0,
    )
    done, _ = _open_or_create(
        group, f"model{i}_done", sig, shape=block_grid(shape, block), chunks=(1, 1, 1), dtype=np.uint8, fill_value=0
    )
    if not reused:  # new scores: no block of an older schedule counts
        done[...] = 0
    marks = np.asarray(done[...])
    todo = [(idx, core) for idx, core in block_boxes(shape, block) if not marks[idx]]
    n_blocks = math.prod(done.shape)
    log.info(
        "%s: %d of %d blocks of %s to predict (%d already complete)",
        desc,
        len(todo),
        n_blocks,
        block,
        n_blocks - len(todo),
    )
    image_path, scores_path, done_path = (str(scratch / f"model{i}_{name}") for name in ("image", "scores", "done"))
    tasks = [_BlockTask(image_path, scores_path, done_path, i, schedule, idx, core) for idx, core in todo]
    n_tiles = _submit_and_wait(tasks, run, desc=desc, progress=opts.progress)
    if todo:
        log.info(
            "%s: %d tiles predicted for the blocks done now (whole volume: %d tiles)",
            desc,
            n_tiles,
            len(schedule.grid()),
        )
    return scores


def _submit_and_wait(tasks: Sequence[_BlockTask], run: BlockRun, *, desc: str, progress: bool) -> int:
    """Run the block tasks on the active client; tiles predicted. A failed task stops the case."""
    if not tasks:
        return 0
    from distributed import as_completed, get_client
    from tqdm.auto import tqdm

    client = get_client()
    futures = [
        client.submit(
            _run_block,
            t,
            run,
            run.source,
            pure=False,
            key=f"voxflow-block-{t.model_index}-{'-'.join(map(str, t.index))}-{_uid()}",
        )
        for t in tasks
    ]
    total = 0
    with tqdm(total=len(futures), desc=f"{desc} blocks", unit="block", leave=False, disable=not progress) as bar:
        for fut in as_completed(futures):
            if fut.status == "error":
                client.cancel(futures)
                exc = fut.exception()
                raise VoxflowError(
                    f"{desc}: a block task failed ({type(exc).__name__}: {exc}); finished blocks "
                    f"are kept, rerun to predict the rest."
                ) from exc
            total += int(fut.result())
            bar.update(1)
    return total


def _uid() -> str:
    import uuid

    return uuid.uuid4().hex[:12]
