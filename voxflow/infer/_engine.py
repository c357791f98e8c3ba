"""The one case pipeline of every model kind: stage -> predict -> write.

A model (:class:`~voxflow.infer.PredictionModel`: voxflow's own folds of a configuration, an nnU-Net
model folder) says three things: how to preprocess a case (``prepare``, giving a
:class:`~voxflow.infer.CaseInput`: the lazy image
on the model's grid and how to undo), which tile predictor to run (``tile_predictor``: a batch of
tiles in, per-tile scores out) and with which tile weights. The engine does the rest, the same way
for every kind:

* stage: per case, each model's preprocessed image is written to a scratch Zarr store (one dask
  compute, bounded memory); the next case is staged in a background thread while one is predicted;
* predict: tiles are read from there and their Gaussian-weighted scores accumulate into a scratch
  Zarr array on the model's grid; each model's ``restore`` turns them into probabilities on the
  original grid (lazy: resample back, activation, uncrop);
* write: the models' probabilities are averaged, turned into labels (argmax or regions) and, with
  ``save_probabilities``, float16 probabilities; one more dask compute writes the case to the
  prediction store, postprocessing (optional) follows, then the completion marker.

Several stages (a cascade): a model whose ``previous_stage`` is another model gets that model's label
map of the case (original grid, lazy) as ``prepare(previous={stage name: label})``. The engine predicts the
previous stage first, through the same stage -> predict -> write steps, into a stage store
``<output>/stages/<stage name>.zarr`` (an ordinary prediction store, never postprocessed): finished cases
there are reused by a rerun, so a long two-stage job resumes per stage, and the low-resolution
segmentations stay inspectable.

Several devices: one process per device predicts its share of the cases, each loading its models
through a picklable :data:`~voxflow.infer.ModelLoader`. On a Dask cluster (``scheduler`` local:N or
tcp://) each volume is predicted by block tasks on the workers instead (:mod:`voxflow.infer._distributed`:
bit-identical to the single-process sliding window, resumable per block).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from voxflow.cluster import case_progress, compute, is_small_case, scheduler_context, split_evenly
from voxflow.errors import VoxflowError
from voxflow.infer._chunks import clamp_chunks, grow_chunks, output_chunks
from voxflow.infer._distributed import BlockRun, block_run
from voxflow.infer._export import check_dicom_sources, export_labels
from voxflow.infer._inputs import cases_to_predict, input_signature, open_input
from voxflow.infer._memory import release_large_allocations, tile_loop_allocations, trim_heap
from voxflow.infer._options import PredictOptions, resolve_postprocessing
from voxflow.infer._protocols import CaseInput, ModelLoader, PredictionModel, TileScorer
from voxflow.infer._undo import probabilities_to_label
from voxflow.store import DatasetMeta, Store
from voxflow.workspace import PREDICTION_STORE

__all__ = ["STAGES_DIR", "STORE_NAME", "previous_stage", "run_prediction", "stage_chain"]

log = logging.getLogger(__name__)
STORE_NAME = PREDICTION_STORE
STAGES_DIR = "stages"  # <output>/stages/<stage name>.zarr: the earlier stages' predictions


@dataclass
class _Staged:
    case_id: str
    inputs: list[CaseInput]
    images: list[zarr.Array]
    scratch: Path
    source_files: Any  # what the case was converted from (recorded with the prediction)


def _stage_case(
    src: Store,
    case_id: str,
    models: Sequence[PredictionModel],
    scratch_root: Path,
    previous: Sequence[Mapping[str, da.Array]] | None = None,
    *,
    resume: bool = False,
) -> _Staged:
    """Write each model's preprocessed image of a case to scratch Zarr (one compute).

    ``previous``: per model, the earlier stages' label maps of the case (see :func:`_previous_outputs`).
    ``resume``: keep a scratch staged completely from the same input by the same models (block-parallel
    prediction resumes its finished blocks there)."""
    scratch = scratch_root / case_id
    signature = json.loads(
        json.dumps(
            {"input": input_signature(src, case_id), "models": [n for m in models for n in m.names]}, default=str
        )
    )
    reuse = resume and _staged_with(scratch, signature)
    if scratch.exists() and not reuse:
        shutil.rmtree(scratch)
    group = zarr.open_group(str(scratch), mode="r+" if reuse else "w", zarr_format=3)
    inputs, images, sources = [], [], []
    for i, model in enumerate(models):
        case, big = _prepare(model, src, case_id, previous[i] if previous else {})
        shape = case.image.shape
        if reuse:
            inputs.append(case)
            staged_image = group[f"model{i}_image"]
            if not isinstance(staged_image, zarr.Array):
                raise VoxflowError(f"scratch {scratch} of case {case_id!r} is damaged; delete it and rerun.")
            images.append(staged_image)
            continue
        chunks = (shape[0], *clamp_chunks(model.patch_size_vox, shape[1:]))  # tiles read ~8 of these
        images.append(
            group.create_array(
                f"model{i}_image", shape=shape, chunks=chunks, dtype=np.float32, compressors=None, fill_value=0.0
            )
        )
        inputs.append(case)
        # dask chunks are whole multiples of the Zarr chunks: every task writes whole chunks, no lock
        sources.append(case.image.astype(np.float32).rechunk((shape[0], *clamp_chunks(big, shape[1:]))))
    if not reuse:
        staged = da.store(sources, images, lock=False, compute=False)  # type: ignore[arg-type]  # zarr targets
        compute(staged, desc=f"{case_id}: preprocess", progress=False)
        group.attrs["voxflow_staged"] = signature  # last: the staged images are complete
    trim_heap()
    return _Staged(case_id, inputs, images, scratch, input_signature(src, case_id))


def _prepare(
    model: PredictionModel, src: Store, case_id: str, previous: Mapping[str, da.Array]
) -> tuple[CaseInput, tuple[int, ...]]:
    """``model.prepare`` of a case in few, large dask chunks (~8 MB of float32 input each), and those
    chunks. Sized by the channels the input really has: a cascade's second stage appends one one-hot
    channel per previous-stage label to its ``n_channels`` image channels (chunks sized for the image
    alone held 8x the bytes per task with 7 labels: the staging peak of ``test_cascade_memory.py``)."""
    big = grow_chunks(model.patch_size_vox, 4 * model.n_channels)
    case = model.prepare(src, case_id, out_chunks=big, previous=previous)
    n_in = int(case.image.shape[0])
    if n_in > model.n_channels:  # the graph is lazy: building it again with smaller chunks costs nothing
        big = grow_chunks(model.patch_size_vox, 4 * n_in)
        case = model.prepare(src, case_id, out_chunks=big, previous=previous)
    return case, big


def _staged_with(scratch: Path, signature: dict[str, Any]) -> bool:
    """Whether ``scratch`` holds images staged completely with ``signature``."""
    try:
        return zarr.open_group(str(scratch), mode="r", zarr_format=3).attrs.get("voxflow_staged") == signature
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False


def _predict_model(
    st: _Staged,
    i: int,
    model: PredictionModel,
    predictor: TileScorer | None,
    opts: PredictOptions,
    out_chunks: tuple[int, ...],
    blocks: BlockRun | None = None,
) -> da.Array:
    """Sliding window of one model over its staged image; its probabilities on the original grid (lazy).

    ``blocks``: block tasks on the Dask cluster instead of the tile predictor here."""
    from voxflow.infer._sliding import sliding_window_predict

    image, k = st.images[i], model.n_outputs
    if blocks is not None:
        from voxflow.infer._distributed import predict_blocks

        scores = predict_blocks(image, st.scratch, i, model, opts, blocks, desc=f"{st.case_id} {model.name}")
        lazy = da.from_zarr(scores, chunks=(k, *output_chunks(image.shape[1:], k)))
        return st.inputs[i].restore(lazy, out_chunks)
    assert predictor is not None
    block = clamp_chunks([-(-p // 2) for p in model.patch_size_vox], image.shape[1:])  # half-patch blocks
    group = zarr.open_group(str(st.scratch), mode="r+", zarr_format=3)
    scores = group.create_array(
        f"model{i}_scores",
        shape=(k, *image.shape[1:]),
        chunks=(k, *block),
        dtype=np.float32,
        compressors=None,
        fill_value=0.0,
    )
    with tile_loop_allocations(opts.forward_bytes, enabled=is_small_case(int(np.prod(image.shape[1:])))):
        sliding_window_predict(
            image,
            predictor,
            patch_size_vox=model.patch_size_vox,
            n_classes=k,
            out=scores,
            step=opts.step,
            batch_size=model.batch_size(opts.batch_size),
            cache_bytes=opts.cache_bytes,
            scratch_dir=st.scratch,
            progress=opts.progress,
            desc=f"{st.case_id} {model.name}",
            importance_map=model.importance_map(),
            **_whole_image(predictor, opts),
        )
    trim_heap()  # the tile cache's blocks are free now; keep them from adding to the write phase's peak
    lazy = da.from_zarr(scores, chunks=(k, *output_chunks(image.shape[1:], k)))  # fewer, larger tasks
    return st.inputs[i].restore(lazy, out_chunks)


def _predict_staged(
    st: _Staged,
    models: Sequence[PredictionModel],
    predictors: Sequence[TileScorer | None],
    out: Store,
    opts: PredictOptions,
    blocks: BlockRun | None = None,
) -> None:
    """Predict a staged case with every model, average, write labels (+ probabilities), postprocess."""
    first = models[0]
    geom = st.inputs[0].geometry
    out_chunks = output_chunks(geom.shape_zyx, first.n_outputs)
    back = [
        _predict_model(st, i, m, p, opts, out_chunks, blocks)
        for i, (m, p) in enumerate(zip(models, predictors, strict=True))
    ]
    mean = back[0] if len(back) == 1 else sum(back[1:], back[0]) / len(back)
    out.begin_case(
        st.case_id,
        geometry=geom,
        attrs={
            "configurations": [m.name for m in models],
            "models": [n for m in models for n in m.names],
            "activation": first.activation,
            **_records(models),
            "input": st.source_files,
        },
    )
    name = "label_raw" if opts.postprocessing is not None else "label"
    label = out.create_array(
        st.case_id, name, shape=geom.shape_zyx, dtype=np.uint8, chunks=out_chunks, dimension_names=("z", "y", "x")
    )
    sources, targets = [probabilities_to_label(mean, regions_class_order=first.regions_class_order)], [label]
    if opts.save_probabilities:
        targets.append(
            out.create_array(st.case_id, "probs", shape=mean.shape, dtype=np.float16, chunks=(1, *out_chunks))
        )
        sources.append(mean.astype(np.float16).rechunk((1, *out_chunks)))
    writes = da.store(sources, targets, lock=False, compute=False)  # type: ignore[arg-type]  # zarr targets
    compute(writes, desc=f"{st.case_id}: write", progress=opts.progress)
    if opts.postprocessing is not None:
        _postprocess_case(out, st.case_id, label, geom.spacing_zyx, opts)
    out.mark_complete(st.case_id)
    shutil.rmtree(st.scratch, ignore_errors=True)


def _postprocess_case(
    out: Store, case_id: str, raw: zarr.Array, spacing_zyx: Sequence[float], opts: PredictOptions
) -> None:
    """Apply the model's postprocessing to the written ``label_raw`` and write ``label``.

    ``label_raw`` (the plain argmax) is kept beside it, so the effect of postprocessing stays visible."""
    from voxflow.postprocess import apply_postprocessing

    spec = resolve_postprocessing(opts.postprocessing, [])
    label = apply_postprocessing(da.from_zarr(raw, chunks=raw.chunks), spec, spacing=spacing_zyx)
    target = out.create_array(case_id, "label", shape=raw.shape, dtype=np.uint8, chunks=raw.chunks)
    write = da.store(label.astype(np.uint8), target, lock=False, compute=False)  # type: ignore[arg-type]
    compute(write, desc=f"{case_id}: postprocess", progress=opts.progress)
    out.update_case_attrs(case_id, postprocessing=spec.to_dict())


def previous_stage(model: PredictionModel) -> PredictionModel | None:
    """The model whose label map ``model`` takes as extra input (a cascade's first stage), or None."""
    return getattr(model, "previous_stage", None)


def stage_chain(models: Sequence[PredictionModel]) -> list[PredictionModel]:
    """Every earlier stage of ``models``, each once (by name), earliest first."""
    found: dict[str, PredictionModel] = {}

    def visit(model: PredictionModel) -> None:
        prev = previous_stage(model)
        if prev is None:
            return
        visit(prev)
        known = found.setdefault(prev.name, prev)
        if list(known.names) != list(prev.names):
            raise VoxflowError(
                f"two different models are both the earlier stage {prev.name!r} ({known.names} and "
                f"{prev.names}); predict them in separate runs."
            )

    for m in models:
        visit(m)
    return list(found.values())


@dataclass
class _Stages:
    """The earlier stages of a run on one device: their stores and their tile predictors (made once)."""

    root: Path
    scratch_root: Path
    device: str
    opts: PredictOptions
    stores: dict[str, Store] = field(default_factory=dict)
    predictors: dict[str, TileScorer] = field(default_factory=dict)

    def store(self, model: PredictionModel) -> Store:
        if model.name not in self.stores:
            self.stores[model.name] = Store.open(self.root / f"{model.name}.zarr", mode="r+")
        return self.stores[model.name]

    def predictor(self, model: PredictionModel) -> TileScorer:
        if model.name not in self.predictors:
            self.predictors[model.name] = _configured(
                model.tile_predictor(device=self.device, tta=self.opts.tta, amp=self.opts.amp), self.opts
            )
        return self.predictors[model.name]


def _stage_options(opts: PredictOptions) -> PredictOptions:
    """Earlier stages are written as plain label maps: no postprocessing, no probabilities, no export."""
    return replace(opts, postprocessing=None, save_probabilities=False, export=False)


def _previous_outputs(src: Store, model: PredictionModel, case_id: str, stages: _Stages) -> dict[str, da.Array]:
    """``model``'s earlier stage's label map of a case (lazy, original grid), predicted first if its stage
    store lacks the case (or holds it from other input files)."""
    prev = previous_stage(model)
    if prev is None:
        return {}
    store = stages.store(prev)
    if cases_to_predict(src, store, [case_id]):
        earlier = _previous_outputs(src, prev, case_id, stages)
        staged = _stage_case(src, case_id, [prev], stages.scratch_root / prev.name, [earlier])
        _predict_staged(staged, [prev], [stages.predictor(prev)], store, _case_opts(stages.opts, src, case_id))
        log.info("case %s: stage %s predicted", case_id, prev.name)
    return {prev.name: store.array(case_id, "label")}


def _predict_cases(
    src: Store,
    out: Store,
    models: Sequence[PredictionModel],
    case_ids: Sequence[str],
    *,
    device: str,
    opts: PredictOptions,
    scratch_root: Path,
    blocks: BlockRun | None = None,
) -> None:
    """Predict cases one after the other, staging the next one while the current one runs.

    With earlier stages (a cascade) each case is staged in turn instead: its earlier stages are
    predicted first, and predicting them in the background would compete with the current case.
    ``blocks``: each volume is predicted by block tasks on the Dask cluster (resumable; no cascades)."""
    if not case_ids:
        return
    predictors: list[TileScorer | None] = (
        [None] * len(models)
        if blocks is not None
        else [_configured(m.tile_predictor(device=device, tta=opts.tta, amp=opts.amp), opts) for m in models]
    )
    resume = blocks is not None and not opts.overwrite
    stages = _Stages(out.path.parent / STAGES_DIR, scratch_root / STAGES_DIR, device, _stage_options(opts))
    chained = bool(stage_chain(models))

    def stage(cid: str) -> _Staged:
        previous = [_previous_outputs(src, m, cid, stages) for m in models] if chained else None
        return _stage_case(src, cid, models, scratch_root, previous, resume=resume)

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxflow-stage") as pool:
        nxt = None if chained else pool.submit(stage, case_ids[0])
        for i, cid in enumerate(tqdm(case_ids, desc="cases", unit="case", disable=not opts.progress)):
            staged = stage(cid) if nxt is None else nxt.result()
            if not chained and i + 1 < len(case_ids):
                nxt = pool.submit(stage, case_ids[i + 1])
            _predict_staged(staged, models, predictors, out, _case_opts(opts, src, cid), blocks)
            log.info("predicted case %s (%d/%d) on %s", cid, i + 1, len(case_ids), device)


def _whole_image(predictor: TileScorer, opts: PredictOptions) -> dict[str, Any]:
    """The whole-image tile arguments of :func:`sliding_window_predict` (none unless ``opts.whole_image``
    and a :class:`~voxflow.infer.TilePredictor` that knows its network's stride and memory)."""
    from voxflow.infer._predictor import TilePredictor

    if not opts.whole_image or not isinstance(predictor, TilePredictor) or predictor.divisor_zyx is None:
        return {}
    return {"whole_image_voxels": predictor.max_tile_voxels() or 0, "divisor_zyx": predictor.divisor_zyx}


def _configured(scorer: TileScorer, opts: PredictOptions) -> TileScorer:
    """A :class:`~voxflow.infer.TilePredictor` set to the run's precision and forward-pass memory
    (other tile scorers as they are)."""
    from voxflow.infer._predictor import TilePredictor

    if isinstance(scorer, TilePredictor):
        scorer.configure(precision=opts.precision, forward_bytes=opts.forward_bytes)
    return scorer


def _case_opts(opts: PredictOptions, src: Store, case_id: str) -> PredictOptions:
    """Per-case progress bars only for cases big enough to take seconds (the stage bar counts cases)."""
    n_voxels = int(np.prod(src.zarr_array(case_id, "image").shape))
    return replace(opts, progress=case_progress(opts.progress, n_voxels))


def _device_worker(
    src_path: str,
    out_path: str,
    loader: ModelLoader,
    device: str,
    case_ids: list[str],
    opts: PredictOptions,
    scratch_root: str,
) -> None:
    """Entry point of one process per device (spawned)."""
    models = loader(device)
    with scheduler_context("threads"):
        _predict_cases(
            Store.open(src_path),
            Store.open(out_path, mode="r+"),
            models,
            case_ids,
            device=device,
            opts=replace(opts, progress=False),
            scratch_root=Path(scratch_root) / device.replace(":", "_"),
        )


def _run_on_devices(
    devices: list[str],
    src: Store,
    out: Store,
    loader: ModelLoader,
    todo: list[str],
    opts: PredictOptions,
    scratch_root: Path,
) -> None:
    ctx = mp.get_context("spawn")
    procs = []
    for dev, part in zip(devices, split_evenly(todo, len(devices)), strict=True):
        if part:
            p = ctx.Process(
                target=_device_worker, args=(str(src.path), str(out.path), loader, dev, part, opts, str(scratch_root))
            )
            p.start()
            procs.append((dev, p))
    failed = []
    for dev, p in procs:
        p.join()
        if p.exitcode != 0:
            failed.append(f"{dev} (exit {p.exitcode})")
    if failed:
        raise VoxflowError(
            f"prediction worker processes must succeed; failed: {failed}. Rerun to resume; completed cases are kept."
        )


def _pooled_cases(
    src: Store,
    models: Sequence[PredictionModel],
    todo: Sequence[str],
    device: str,
    opts: PredictOptions,
    loader: ModelLoader | None,
) -> list[str]:
    """The cases of ``todo`` to predict in worker processes (:mod:`voxflow.infer._case_pool`): the small
    ones, if there are at least ``CASE_POOL_MIN_CASES`` of them, on the CPU with several cores, the
    threaded scheduler, no cascade and models that ``loader`` can load again; otherwise none."""
    from voxflow.infer import _case_pool

    if loader is None or device != "cpu" or opts.scheduler != "threads" or _case_pool.cpu_count() < 2:
        return []
    if stage_chain(models):
        return []
    small = [c for c in todo if is_small_case(int(np.prod(src.zarr_array(c, "image").shape[1:])))]
    return small if len(small) >= _case_pool.CASE_POOL_MIN_CASES else []


def _predict_in_pool(
    src: Store, out: Store, loader: ModelLoader, case_ids: list[str], opts: PredictOptions, scratch_root: Path
) -> None:
    """Predict small cases in worker processes, one stage bar over them."""
    from voxflow.cluster import stage_bar
    from voxflow.infer._case_pool import predict_cases_in_pool

    with stage_bar(len(case_ids), desc="cases", progress=opts.progress) as bar:
        predict_cases_in_pool(src.path, out.path, loader, case_ids, opts, scratch_root / "pool", bar=bar)


def _records(models: Sequence[PredictionModel]) -> dict[str, Any]:
    return {k: v for m in models for k, v in m.record.items()}


def _check_models(models: Sequence[PredictionModel]) -> None:
    if not models:
        raise VoxflowError("predict needs at least one model (model_dir or models); got none.")
    first = models[0]
    for m in models[1:]:
        if (
            m.dataset.labels != first.dataset.labels
            or m.regions_class_order != first.regions_class_order
            or m.activation != first.activation
        ):
            raise VoxflowError(
                f"ensembled configurations must predict the same labels; {m.name!r} has "
                f"{m.dataset.labels}, {first.name!r} has {first.dataset.labels}."
            )


def _output_meta(src: Store, models: Sequence[PredictionModel], opts: PredictOptions) -> DatasetMeta:
    first = models[0].dataset
    return DatasetMeta(
        channel_names=src.meta.channel_names,
        labels=first.labels,
        regions_class_order=first.regions_class_order,
        file_ending=src.meta.file_ending,
        name=src.meta.name,
        kind="prediction",
        extra={
            "configurations": [m.name for m in models],
            "models": [n for m in models for n in m.names],
            **_records(models),
            "step": opts.step,
            "tta": opts.tta,
            **({"stages": [p.name for p in chain]} if (chain := stage_chain(models)) else {}),
        },
    )


def _create_stage_stores(src: Store, root: Path, models: Sequence[PredictionModel], opts: PredictOptions) -> None:
    """Create (or reopen, to resume) the store of every earlier stage, before any process writes to it."""
    for prev in stage_chain(models):
        prev.check_input(src)
        Store.create(
            root / f"{prev.name}.zarr", _output_meta(src, [prev], _stage_options(opts)), overwrite=opts.overwrite
        )


def run_prediction(
    source: Store | str | Path | Sequence[str | Path],
    output: str | Path,
    models: Sequence[PredictionModel],
    opts: PredictOptions,
    *,
    loader: ModelLoader | None = None,
    case_ids: Sequence[str] | None = None,
) -> Store:
    """Segment the cases of ``source`` with ``models`` (averaged) into ``output/prediction.zarr``.

    ``models`` are loaded on the first of ``opts.devices()``; with several devices (and more than one
    case to do) each device's process loads its own through ``loader`` (without one, ``"cuda"`` means
    the current GPU, and a list of devices is refused). Cases complete in the output
    (from unchanged inputs) are skipped. Exports label files unless ``opts.export`` is False. A model
    with a ``previous_stage`` (a cascade) has that stage predicted first, into ``output/stages/``.
    Fixes glibc's mmap threshold for the process (:func:`~voxflow.infer.release_large_allocations`).
    """
    _check_models(models)
    devices = opts.devices()
    if len(devices) > 1 and loader is None:
        if opts.device != "cuda":
            raise VoxflowError(
                "several devices need models each process can load (model_dir, an nnU-Net model "
                "folder); got models that are already loaded."
            )
        devices = ["cuda"]  # loaded models and every visible GPU: predict on the current one
    release_large_allocations()
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch_root = out_dir / ".scratch"
    with scheduler_context(opts.scheduler, memory_limit=opts.memory_limit) as client:
        src = open_input(source, out_dir / ".input", scheduler=opts.scheduler)
        for m in models:
            m.check_input(src)
        _create_stage_stores(src, out_dir / STAGES_DIR, models, opts)
        if opts.output_format == "dicom-seg" and opts.export:
            check_dicom_sources(src, list(case_ids) if case_ids is not None else src.case_ids())
        out = Store.create(out_dir / STORE_NAME, _output_meta(src, models, opts), overwrite=opts.overwrite)
        ids = list(case_ids) if case_ids is not None else src.case_ids()
        todo = cases_to_predict(src, out, ids)
        log.info(
            "predicting %d cases (%d already complete) with %s",
            len(todo),
            len(ids) - len(todo),
            ", ".join(n for m in models for n in m.names),
        )
        # on a Dask cluster: every volume as block tasks on its workers (resumable), see _distributed.py
        blocks = block_run(client, models, loader, opts) if client is not None and todo else None
        if blocks is None and len(devices) > 1 and len(todo) > 1 and loader is not None:
            _run_on_devices(devices, src, out, loader, todo, opts, scratch_root)
        else:
            pooled = _pooled_cases(src, models, todo, devices[0], opts, loader) if blocks is None else []
            if pooled and loader is not None:
                _predict_in_pool(src, out, loader, pooled, opts, scratch_root)
            in_pool = set(pooled)
            rest = [c for c in todo if c not in in_pool]
            _predict_cases(
                src, out, models, rest, device=devices[0], opts=opts, scratch_root=scratch_root, blocks=blocks
            )
    shutil.rmtree(scratch_root, ignore_errors=True)
    if opts.export:
        sched = opts.scheduler if opts.scheduler in ("threads", "processes", "sync") else "threads"
        export_labels(
            out,
            out_dir,
            ids,
            file_ending=opts.file_ending(src.meta.file_ending),
            scheduler=sched,
            source=src,
            model_name="+".join(n for m in models for n in m.names),
        )
    return out
