"""The preprocessing orchestrator: dataset store -> preprocessed store, resumable, any scheduler."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import dask.local
import numpy as np

from voxflow._lock import locked, store_lock_file
from voxflow._types import PathLikeStr
from voxflow.cluster import case_progress, compute, compute_cases, is_small_case, scheduler_context, stage_bar
from voxflow.errors import VoxflowError
from voxflow.plan.schema import Configuration, Plan
from voxflow.preprocess._case import PreprocessedCase, preprocess_case
from voxflow.preprocess._crop import BBox, bbox_from_projections, nonzero_projections
from voxflow.store import Store

__all__ = ["run_preprocess"]

log = logging.getLogger(__name__)
_BBOX_BATCH = 16  # cases whose bounding boxes are reduced in one compute


def _configuration_dict(config: Configuration) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


def _bboxes(src: Store, case_ids: Sequence[str], progress: bool) -> dict[str, BBox]:
    """Nonzero bounding boxes of ``case_ids``, reduced a batch of cases per compute (one bar)."""
    out: dict[str, BBox] = {}
    with stage_bar(len(case_ids), desc="nonzero boxes", progress=progress) as bar:
        for i in range(0, len(case_ids), _BBOX_BATCH):
            batch = case_ids[i : i + _BBOX_BATCH]
            projections = [nonzero_projections(src.image(c)) for c in batch]
            results = compute(*projections, desc="nonzero boxes", progress=False)
            out.update({c: bbox_from_projections(r) for c, r in zip(batch, results, strict=False)})
            bar.update(len(batch))
    return out


def _box_fits(box: BBox, shape_zyx: Sequence[int]) -> bool:
    return len(box) == 3 and all(0 <= lo < hi <= n for (lo, hi), n in zip(box, shape_zyx, strict=False))


def _write_small_case(
    src_path: str, out_path: str, case_id: str, config: Configuration, bbox: BBox | None, seed: int
) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """One small case start to finish in one task: its graph (the same as :func:`_write_case`'s, so the
    same values) computed in memory by the synchronous scheduler and each array written with one
    ``setitem``. Returns (case id, original shape, preprocessed shape) for the log."""
    src, out = Store.open(src_path), Store.open(out_path, mode="r+")
    with dask.config.set({"scheduler": dask.local.get_sync, "array.slicing.split_large_chunks": False}):
        if bbox is None:
            bbox = bbox_from_projections(dask.compute(nonzero_projections(src.image(case_id)))[0])
        pc = preprocess_case(
            src.image(case_id),
            src.geometry(case_id),
            config,
            label=src.label(case_id),
            seed=seed,
            bbox_zyx=bbox,
            label_values=src.meta.label_values,
            case_id=case_id,
        )
        # unoptimised: fusing this small graph costs more than it saves; the values are the same
        image, label, fg = dask.compute(pc.image, pc.label, pc.fg_index, optimize_graph=False)
    out.begin_case(case_id, geometry=pc.geometry, attrs={**pc.attrs(), "source_store": str(src.path)})
    out.create_array(
        case_id, "image", shape=image.shape, dtype=np.float32, chunks=tuple(max(c) for c in pc.image.chunks)
    )[...] = image
    if pc.label is not None:
        out.create_array(
            case_id, "label", shape=label.shape, dtype=np.uint8, chunks=tuple(max(c) for c in pc.label.chunks)
        )[...] = label
    _finish_case(out, case_id, fg)
    return case_id, pc.original_geometry.shape_zyx, pc.geometry.shape_zyx


def _finish_case(out: Store, case_id: str, fg: tuple[np.ndarray, list[int]] | None) -> None:
    """Foreground index, classes present, NGFF view, then the completion marker (last)."""
    present: list[int] = []
    if fg is not None:
        index, present = fg
        arr = out.create_array(
            case_id,
            "fg_index",
            shape=index.shape,
            dtype=np.int32,
            chunks=(max(1, len(index)), 4),
            dimension_names=("sample", "field"),
        )
        if len(index):
            arr[...] = index
    out.update_case_attrs(case_id, classes_present=present)
    out.mark_complete(case_id)


def _write_small_cases(
    src: Store,
    out: Store,
    case_ids: Sequence[str],
    config: Configuration,
    known: Mapping[str, BBox],
    *,
    seed: int,
    bar: Any,
) -> None:
    """Small cases in parallel: one task per case (see :func:`_write_small_case`), one compute."""
    tasks = [
        dask.delayed(_write_small_case, pure=False)(str(src.path), str(out.path), cid, config, known.get(cid), seed)
        for cid in case_ids
    ]
    for cid, before, after in compute_cases(tasks, bar=bar, preload=[__name__]):
        log.info("%s: %s -> %s voxels", cid, before, after)


def _write_case(
    src: Store, out: Store, case_id: str, config: Configuration, bbox: BBox, *, seed: int, progress: bool
) -> PreprocessedCase:
    pc = preprocess_case(
        src.image(case_id),
        src.geometry(case_id),
        config,
        label=src.label(case_id),
        seed=seed,
        bbox_zyx=bbox,
        label_values=src.meta.label_values,
        case_id=case_id,
    )
    out.begin_case(case_id, geometry=pc.geometry, attrs={**pc.attrs(), "source_store": str(src.path)})
    image_chunks = tuple(max(c) for c in pc.image.chunks)
    target: Any = out.create_array(case_id, "image", shape=pc.image.shape, dtype=np.float32, chunks=image_chunks)
    writes = [da.store(pc.image, target, lock=False, compute=False)]
    if pc.label is not None:
        label_chunks = tuple(max(c) for c in pc.label.chunks)
        target_l: Any = out.create_array(case_id, "label", shape=pc.label.shape, dtype=np.uint8, chunks=label_chunks)
        writes.append(da.store(pc.label, target_l, lock=False, compute=False))
    results = compute(
        *writes, *([pc.fg_index] if pc.fg_index is not None else []), desc=f"preprocess {case_id}", progress=progress
    )
    _finish_case(out, case_id, results[-1] if pc.fg_index is not None else None)
    return pc


@locked(lambda a: store_lock_file(a["out_path"]), command="preprocess")
def run_preprocess(
    store_path: Store | PathLikeStr,
    plan: Plan | PathLikeStr,
    configuration: str,
    out_path: PathLikeStr,
    *,
    scheduler: str | None = "threads",
    overwrite: bool = False,
    memory_limit: str | None = None,
    case_ids: Sequence[str] | None = None,
    seed: int = 0,
    bboxes: Mapping[str, BBox] | None = None,
    progress: bool = True,
) -> Store:
    """Preprocess every complete case of a dataset store for one configuration of the plan.

    Writes a store with ``meta.kind == "preprocessed"``: per case ``image`` (C, Z, Y, X) float32,
    ``label`` (Z, Y, X) uint8 and ``fg_index`` (N, 4) int32 rows (class, z, y, x), chunked at half
    the patch size, and case attributes ``geometry`` (target grid), ``original_geometry``,
    ``crop_bbox_zyx``, ``shape_after_crop_zyx`` and ``classes_present``. A rerun skips complete
    cases and redoes incomplete ones (and ones with damaged metadata); ``overwrite`` starts afresh.
    Small cases (fewer voxels than :data:`~voxflow.cluster.SMALL_CASE_VOXELS`) are done one task each,
    in parallel, in one compute; each bigger case is one chunked compute of its own (bounded memory),
    on the scheduler ``scheduler`` (see :mod:`voxflow.cluster`). Both give the same store. Per case the
    completion marker is written last. The cases asked for are recorded first (:meth:`Store.expect_cases`), so
    training refuses a store whose preprocessing stopped early. Holds the lock ``<out_path>.lock``.
    """
    src = store_path if isinstance(store_path, Store) else Store.open(store_path)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    config = plan.configuration(configuration)
    if src.meta.kind != "dataset":
        raise VoxflowError(
            f"preprocessing reads a dataset store (kind 'dataset'); got kind {src.meta.kind!r} "
            f"for {src.path}. Pass the store written by `voxflow convert`."
        )
    if config.n_channels != len(src.meta.channel_names):
        raise VoxflowError(
            f"configuration {configuration!r} normalises {config.n_channels} channels; the store {src.path} "
            f"has {len(src.meta.channel_names)} ({list(src.meta.channel_names)}). Use the plan made for this dataset."
        )
    meta = replace(
        src.meta,
        kind="preprocessed",
        extra={"configuration": configuration, "configuration_plan": _configuration_dict(config)},
    )
    out = Store.create(out_path, meta, overwrite=overwrite)
    wanted = list(case_ids) if case_ids is not None else src.case_ids()
    missing = sorted(set(wanted) - set(src.case_ids()))
    if missing:
        raise VoxflowError(f"cases {missing} are not complete cases of {src.path}; run `voxflow convert` first.")
    out.expect_cases(wanted, source=src.path if case_ids is None else None)
    resumable = set(out.resumable_case_ids())
    todo = [c for c in wanted if c not in resumable]
    log.info(
        "preprocess %s -> %s (%s): %d cases to do, %d already complete",
        src.path,
        Path(out_path),
        configuration,
        len(todo),
        len(wanted) - len(todo),
    )
    if not todo:
        return out
    context = (
        scheduler_context(scheduler, memory_limit=memory_limit) if scheduler is not None else contextlib.nullcontext()
    )
    with context, dask.config.set({"array.slicing.split_large_chunks": False}):
        known = {c: b for c, b in (bboxes or {}).items() if c in todo and _box_fits(b, src.geometry(c).shape_zyx)}
        small = [c for c in todo if is_small_case(math.prod(src.geometry(c).shape_zyx))]
        big = [c for c in todo if c not in set(small)]
        boxes = {**_bboxes(src, [c for c in big if c not in known], progress), **known} if big else {}
        with stage_bar(len(todo), desc="preprocess", progress=progress) as bar:
            _write_small_cases(src, out, small, config, known, seed=seed, bar=bar)
            for k, cid in enumerate(big, 1):
                own_bars = case_progress(progress, math.prod(src.zarr_array(cid, "image").shape))
                pc = _write_case(src, out, cid, config, boxes[cid], seed=seed, progress=own_bars)
                log.info(
                    "[%d/%d] %s: %s -> %s voxels",
                    k,
                    len(big),
                    cid,
                    pc.original_geometry.shape_zyx,
                    pc.geometry.shape_zyx,
                )
                bar.update(1)
    return out
