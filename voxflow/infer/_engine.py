"""The one case pipeline of every model kind: stage -> predict -> write.

A model (:class:`PredictionModel`: voxflow's own folds of a configuration, an nnU-Net model folder)
says three things: how to preprocess a case (``prepare``, giving a :class:`CaseInput`: the lazy image
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

Several devices: one process per device predicts its share of the cases, each loading its models
through a picklable :data:`ModelLoader`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import dask.array as da
import numpy as np
import zarr

from voxflow.cluster import compute, scheduler_context, split_evenly
from voxflow.errors import VoxflowError
from voxflow.geometry import Geometry
from voxflow.infer._accumulator import DEFAULT_CACHE_BYTES
from voxflow.infer._chunks import clamp_chunks, grow_chunks, output_chunks
from voxflow.infer._export import export_labels
from voxflow.infer._inputs import cases_to_predict, input_signature, open_input
from voxflow.infer._memory import release_large_allocations, trim_heap
from voxflow.infer._undo import probabilities_to_label
from voxflow.store import DatasetMeta, Store
from voxflow.workspace import PREDICTION_STORE

__all__ = ["STORE_NAME", "CaseInput", "ModelLoader", "PredictOptions", "PredictionModel", "TileScorer",
           "resolve_postprocessing", "run_prediction"]

log = logging.getLogger(__name__)
STORE_NAME = PREDICTION_STORE


class TileScorer(Protocol):
    """A batch of (B, C, *patch) float32 tiles in, (B, K, *patch) float32 scores out (a torch tensor or
    numpy array): probabilities or logits, as the model's :attr:`CaseInput.restore` expects."""

    def __call__(self, tiles: np.ndarray) -> Any: ...


Restore = Callable[[da.Array, tuple[int, ...]], da.Array]


@dataclass(frozen=True)
class CaseInput:
    """One case on a model's grid.

    ``image``: (C, z, y, x) float32, lazy; ``geometry``: the case's original geometry; ``restore``:
    maps the accumulated tile scores (K, z, y, x) (lazy) and the output chunks (z, y, x) to
    probabilities (K, Z, Y, X) on the original grid, lazy and chunked ``(K, *out_chunks)``.
    """

    image: da.Array
    geometry: Geometry
    restore: Restore


class PredictionModel(Protocol):
    """What the case pipeline needs from a model: how to preprocess, a tile predictor, how to undo.

    ``name`` is recorded as the configuration, ``names`` as the models (e.g. its folds); ``dataset``
    gives the labels of the prediction; ``regions_class_order`` (None: argmax) turns region
    probabilities into labels; ``record`` holds extra attributes written with every prediction.
    """

    @property
    def name(self) -> str: ...

    @property
    def names(self) -> list[str]: ...

    @property
    def dataset(self) -> DatasetMeta: ...

    @property
    def n_outputs(self) -> int: ...

    @property
    def activation(self) -> str: ...

    @property
    def regions_class_order(self) -> tuple[int, ...] | None: ...

    @property
    def patch_size_vox(self) -> tuple[int, int, int]: ...

    @property
    def n_channels(self) -> int: ...

    @property
    def record(self) -> Mapping[str, Any]: ...

    def batch_size(self, requested: int | None) -> int:
        """Tiles per forward pass (``requested`` if given)."""
        ...

    def importance_map(self) -> np.ndarray | None:
        """Tile weights of the patch shape, or None for :func:`~voxflow.infer.gaussian_importance_map`."""
        ...

    def check_input(self, store: Store) -> None:
        """Raise a :class:`VoxflowError` if the model cannot predict from this input store."""
        ...

    def prepare(self, store: Store, case_id: str, *, out_chunks: Sequence[int],
                previous: Mapping[str, da.Array]) -> CaseInput:
        """The case on the model's grid (lazy, dask chunks ``out_chunks``; small computes allowed).

        ``previous``: outputs of earlier stages for this case by stage name (e.g. a cascade's
        low-resolution segmentation); empty for single-stage models."""
        ...

    def tile_predictor(self, *, device: str, tta: bool, amp: bool) -> TileScorer:
        """The tile predictor on ``device`` (mirroring when ``tta``)."""
        ...


ModelLoader = Callable[[str], Sequence[PredictionModel]]
"""Loads the models on a device (``"cuda:1"``); picklable, so that each device's process loads its own."""


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """How to run a prediction (see :func:`voxflow.infer.predict`); every field is also a keyword of it.

    ``postprocessing`` is the resolved :class:`~voxflow.postprocess.PostprocessingSpec` applied to
    each label, or None (``predict`` resolves its ``postprocessing`` argument into it).
    """

    step: float = 0.5
    tta: bool = True
    save_probabilities: bool = False
    batch_size: int | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    amp: bool = True
    progress: bool = True
    postprocessing: Any = None
    device: str | tuple[str, ...] = "cpu"
    scheduler: str = "threads"
    memory_limit: str | None = None
    export: bool = True
    overwrite: bool = False

    @classmethod
    def build(cls, options: PredictOptions | None = None, **overrides: Any) -> PredictOptions:
        """``options`` (default: the defaults) with ``overrides`` replaced; unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown prediction option(s) {unknown}; known: {sorted(known)}.")
        if isinstance(overrides.get("device"), (list, tuple)):
            overrides["device"] = tuple(str(d) for d in overrides["device"])
        return replace(options or cls(), **overrides)

    def devices(self) -> list[str]:
        """``device`` as a list: several for ``"cuda:0,cuda:1"``, a list, or ``"cuda"`` with several GPUs."""
        if not isinstance(self.device, str):
            return [str(d) for d in self.device]
        if "," in self.device:
            return [d.strip() for d in self.device.split(",") if d.strip()]
        if self.device == "cuda":
            import torch

            n = torch.cuda.device_count()
            if n > 1:
                return [f"cuda:{i}" for i in range(n)]
        return [self.device]


def resolve_postprocessing(postprocessing: Any, configuration_dirs: Sequence[Path]) -> Any:
    """``"auto"``: the ``postprocessing.json`` of the (single) configuration dir the models come from;
    ``None``: none; a spec, dict or path: that one."""
    from voxflow.postprocess import PostprocessingSpec
    from voxflow.workspace import ConfigurationDir

    if postprocessing is None:
        return None
    if isinstance(postprocessing, str) and postprocessing == "auto":
        dirs = set(configuration_dirs)
        if len(dirs) != 1:
            if dirs:
                log.info("no postprocessing applied: it is chosen per configuration, and %d are ensembled",
                         len(dirs))
            return None
        path = ConfigurationDir(next(iter(dirs))).postprocessing
        return PostprocessingSpec.load(path) if path.is_file() else None
    if isinstance(postprocessing, PostprocessingSpec):
        return postprocessing
    if isinstance(postprocessing, dict):
        return PostprocessingSpec.from_dict(postprocessing)
    return PostprocessingSpec.load(Path(postprocessing))


@dataclass
class _Staged:
    case_id: str
    inputs: list[CaseInput]
    images: list[zarr.Array]
    scratch: Path
    source_files: Any  # what the case was converted from (recorded with the prediction)


def _stage_case(src: Store, case_id: str, models: Sequence[PredictionModel], scratch_root: Path) -> _Staged:
    """Write each model's preprocessed image of a case to scratch Zarr (one compute)."""
    scratch = scratch_root / case_id
    if scratch.exists():
        shutil.rmtree(scratch)
    group = zarr.open_group(str(scratch), mode="w", zarr_format=3)
    inputs, images, sources = [], [], []
    for i, model in enumerate(models):
        big = grow_chunks(model.patch_size_vox, 4 * model.n_channels)  # compute in few, large tasks
        case = model.prepare(src, case_id, out_chunks=big, previous={})
        shape = case.image.shape
        chunks = (shape[0], *clamp_chunks(model.patch_size_vox, shape[1:]))  # tiles read ~8 of these
        images.append(group.create_array(f"model{i}_image", shape=shape, chunks=chunks, dtype=np.float32,
                                         compressors=None, fill_value=0.0))
        inputs.append(case)
        # dask chunks are whole multiples of the Zarr chunks: every task writes whole chunks, no lock
        sources.append(case.image.astype(np.float32).rechunk((shape[0], *clamp_chunks(big, shape[1:]))))
    staged = da.store(sources, images, lock=False, compute=False)  # type: ignore[arg-type]  # zarr targets
    compute(staged, desc=f"{case_id}: preprocess", progress=False)
    trim_heap()
    return _Staged(case_id, inputs, images, scratch, input_signature(src, case_id))


def _predict_model(st: _Staged, i: int, model: PredictionModel, predictor: TileScorer, opts: PredictOptions,
                   out_chunks: tuple[int, ...]) -> da.Array:
    """Sliding window of one model over its staged image; its probabilities on the original grid (lazy)."""
    from voxflow.infer._sliding import sliding_window_predict

    image, k = st.images[i], model.n_outputs
    block = clamp_chunks([-(-p // 2) for p in model.patch_size_vox], image.shape[1:])  # half-patch blocks
    group = zarr.open_group(str(st.scratch), mode="r+", zarr_format=3)
    scores = group.create_array(f"model{i}_scores", shape=(k, *image.shape[1:]), chunks=(k, *block),
                                dtype=np.float32, compressors=None, fill_value=0.0)
    sliding_window_predict(image, predictor, patch_size_vox=model.patch_size_vox, n_classes=k, out=scores,
                           step=opts.step, batch_size=model.batch_size(opts.batch_size),
                           cache_bytes=opts.cache_bytes, scratch_dir=st.scratch, progress=opts.progress,
                           desc=f"{st.case_id} {model.name}", importance_map=model.importance_map())
    trim_heap()  # the tile cache's blocks are free now; keep them from adding to the write phase's peak
    lazy = da.from_zarr(scores, chunks=(k, *output_chunks(image.shape[1:], k)))  # fewer, larger tasks
    return st.inputs[i].restore(lazy, out_chunks)


def _predict_staged(st: _Staged, models: Sequence[PredictionModel], predictors: Sequence[TileScorer], out: Store,
                    opts: PredictOptions) -> None:
    """Predict a staged case with every model, average, write labels (+ probabilities), postprocess."""
    first = models[0]
    geom = st.inputs[0].geometry
    out_chunks = output_chunks(geom.shape_zyx, first.n_outputs)
    back = [_predict_model(st, i, m, p, opts, out_chunks) for i, (m, p) in enumerate(zip(models, predictors, strict=True))]
    mean = back[0] if len(back) == 1 else sum(back[1:], back[0]) / len(back)
    out.begin_case(st.case_id, geometry=geom, attrs={
        "configurations": [m.name for m in models], "models": [n for m in models for n in m.names],
        "activation": first.activation, **_records(models), "input": st.source_files})
    name = "label_raw" if opts.postprocessing is not None else "label"
    label = out.create_array(st.case_id, name, shape=geom.shape_zyx, dtype=np.uint8, chunks=out_chunks,
                             dimension_names=("z", "y", "x"))
    sources, targets = [probabilities_to_label(mean, regions_class_order=first.regions_class_order)], [label]
    if opts.save_probabilities:
        targets.append(out.create_array(st.case_id, "probs", shape=mean.shape, dtype=np.float16,
                                        chunks=(1, *out_chunks)))
        sources.append(mean.astype(np.float16).rechunk((1, *out_chunks)))
    writes = da.store(sources, targets, lock=False, compute=False)  # type: ignore[arg-type]  # zarr targets
    compute(writes, desc=f"{st.case_id}: write", progress=opts.progress)
    if opts.postprocessing is not None:
        _postprocess_case(out, st.case_id, label, geom.spacing_zyx, opts)
    out.mark_complete(st.case_id)
    shutil.rmtree(st.scratch, ignore_errors=True)


def _postprocess_case(out: Store, case_id: str, raw: zarr.Array, spacing_zyx: Sequence[float],
                      opts: PredictOptions) -> None:
    """Apply the model's postprocessing to the written ``label_raw`` and write ``label``.

    ``label_raw`` (the plain argmax) is kept beside it, so the effect of postprocessing stays visible."""
    from voxflow.postprocess import apply_postprocessing

    spec = resolve_postprocessing(opts.postprocessing, [])
    label = apply_postprocessing(da.from_zarr(raw, chunks=raw.chunks), spec, spacing=spacing_zyx)
    target = out.create_array(case_id, "label", shape=raw.shape, dtype=np.uint8, chunks=raw.chunks)
    write = da.store(label.astype(np.uint8), target, lock=False, compute=False)  # type: ignore[arg-type]
    compute(write, desc=f"{case_id}: postprocess", progress=opts.progress)
    out.update_case_attrs(case_id, postprocessing=spec.to_dict())


def _predict_cases(src: Store, out: Store, models: Sequence[PredictionModel], case_ids: Sequence[str], *,
                   device: str, opts: PredictOptions, scratch_root: Path) -> None:
    """Predict cases one after the other, staging the next one while the current one runs."""
    if not case_ids:
        return
    predictors = [m.tile_predictor(device=device, tta=opts.tta, amp=opts.amp) for m in models]
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxflow-stage") as pool:
        nxt = pool.submit(_stage_case, src, case_ids[0], models, scratch_root)
        for i, cid in enumerate(tqdm(case_ids, desc="cases", unit="case", disable=not opts.progress)):
            staged = nxt.result()
            if i + 1 < len(case_ids):
                nxt = pool.submit(_stage_case, src, case_ids[i + 1], models, scratch_root)
            _predict_staged(staged, models, predictors, out, opts)
            log.info("predicted case %s (%d/%d) on %s", cid, i + 1, len(case_ids), device)


def _device_worker(src_path: str, out_path: str, loader: ModelLoader, device: str, case_ids: list[str],
                   opts: PredictOptions, scratch_root: str) -> None:
    """Entry point of one process per device (spawned)."""
    models = loader(device)
    with scheduler_context("threads"):
        _predict_cases(Store.open(src_path), Store.open(out_path, mode="r+"), models, case_ids, device=device,
                       opts=replace(opts, progress=False), scratch_root=Path(scratch_root) / device.replace(":", "_"))


def _run_on_devices(devices: list[str], src: Store, out: Store, loader: ModelLoader, todo: list[str],
                    opts: PredictOptions, scratch_root: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = []
    for dev, part in zip(devices, split_evenly(todo, len(devices)), strict=True):
        if part:
            p = ctx.Process(target=_device_worker, args=(str(src.path), str(out.path), loader, dev, part, opts,
                                                          str(scratch_root)))
            p.start()
            procs.append((dev, p))
    failed = []
    for dev, p in procs:
        p.join()
        if p.exitcode != 0:
            failed.append(f"{dev} (exit {p.exitcode})")
    if failed:
        raise VoxflowError(f"prediction worker processes must succeed; failed: {failed}. Rerun to resume; "
                           f"completed cases are kept.")


def _records(models: Sequence[PredictionModel]) -> dict[str, Any]:
    return {k: v for m in models for k, v in m.record.items()}


def _check_models(models: Sequence[PredictionModel]) -> None:
    if not models:
        raise VoxflowError("predict needs at least one model (model_dir or models); got none.")
    first = models[0]
    for m in models[1:]:
        if (m.dataset.labels != first.dataset.labels or m.regions_class_order != first.regions_class_order
                or m.activation != first.activation):
            raise VoxflowError(f"ensembled configurations must predict the same labels; {m.name!r} has "
                               f"{m.dataset.labels}, {first.name!r} has {first.dataset.labels}.")


def _output_meta(src: Store, models: Sequence[PredictionModel], opts: PredictOptions) -> DatasetMeta:
    first = models[0].dataset
    return DatasetMeta(channel_names=src.meta.channel_names, labels=first.labels,
                       regions_class_order=first.regions_class_order, file_ending=src.meta.file_ending,
                       name=src.meta.name, kind="prediction",
                       extra={"configurations": [m.name for m in models],
                              "models": [n for m in models for n in m.names], **_records(models),
                              "step": opts.step, "tta": opts.tta})


def run_prediction(source: Store | str | Path | Sequence[str | Path], output: str | Path,
                   models: Sequence[PredictionModel], opts: PredictOptions, *, loader: ModelLoader | None = None,
                   case_ids: Sequence[str] | None = None) -> Store:
    """Segment the cases of ``source`` with ``models`` (averaged) into ``output/prediction.zarr``.

    ``models`` are loaded on the first of ``opts.devices()``; with several devices (and more than one
    case to do) each device's process loads its own through ``loader``. Cases complete in the output
    (from unchanged inputs) are skipped. Exports label files unless ``opts.export`` is False.
    Fixes glibc's mmap threshold for the process (:func:`~voxflow.infer.release_large_allocations`).
    """
    _check_models(models)
    devices = opts.devices()
    if len(devices) > 1 and loader is None:
        raise VoxflowError("several devices need models each process can load (model_dir, an nnU-Net model "
                           "folder); got models that are already loaded.")
    release_large_allocations()
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch_root = out_dir / ".scratch"
    with scheduler_context(opts.scheduler, memory_limit=opts.memory_limit):
        src = open_input(source, out_dir / ".input", scheduler=opts.scheduler)
        for m in models:
            m.check_input(src)
        out = Store.create(out_dir / STORE_NAME, _output_meta(src, models, opts), overwrite=opts.overwrite)
        ids = list(case_ids) if case_ids is not None else src.case_ids()
        todo = cases_to_predict(src, out, ids)
        log.info("predicting %d cases (%d already complete) with %s", len(todo), len(ids) - len(todo),
                 ", ".join(n for m in models for n in m.names))
        if len(devices) > 1 and len(todo) > 1 and loader is not None:
            _run_on_devices(devices, src, out, loader, todo, opts, scratch_root)
        else:
            _predict_cases(src, out, models, todo, device=devices[0], opts=opts, scratch_root=scratch_root)
    shutil.rmtree(scratch_root, ignore_errors=True)
    if opts.export:
        sched = opts.scheduler if opts.scheduler in ("threads", "processes", "sync") else "threads"
        export_labels(out, out_dir, ids, file_ending=src.meta.file_ending, scheduler=sched)
    return out
