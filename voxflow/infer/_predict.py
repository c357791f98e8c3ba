"""Predict whole cases: preprocess -> sliding window per configuration -> undo preprocessing ->
ensemble -> prediction store (+ exported files).

Per case, the preprocessed image of each configuration is first written to a scratch Zarr store
(one dask compute, bounded memory); tiles are read from there and their probabilities accumulate
into a scratch Zarr array on the preprocessed grid; undoing the preprocessing, averaging the
configurations, argmax and the writes to the prediction store form one more dask compute. While a
case is being predicted, the next one is already being preprocessed in a background thread.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from voxflow._lock import dir_lock_file, locked
from voxflow.cluster import compute, scheduler_context, split_evenly
from voxflow.errors import VoxflowError
from voxflow.infer._accumulator import DEFAULT_CACHE_BYTES
from voxflow.infer._chunks import clamp_chunks, grow_chunks, output_chunks
from voxflow.infer._export import export_labels
from voxflow.infer._inputs import PreparedCase, cases_to_predict, input_signature, open_input, prepare_case
from voxflow.infer._memory import release_large_allocations, trim_heap
from voxflow.infer._models import Ensemble, find_checkpoints, group_models
from voxflow.infer._undo import probabilities_to_label, undo_preprocessing
from voxflow.store import DatasetMeta, Store

__all__ = ["PredictOptions", "predict"]

log = logging.getLogger(__name__)
STORE_NAME = "prediction.zarr"


@dataclass(frozen=True)
class PredictOptions:
    """Knobs of one prediction run (see :func:`predict`)."""

    step: float = 0.5
    tta: bool = True
    save_probabilities: bool = False
    batch_size: int | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    amp: bool = True
    progress: bool = True
    postprocessing: Any = None  # a voxflow.postprocess.PostprocessingSpec applied to the label, or None


@dataclass
class _Staged:
    case_id: str
    images: list[zarr.Array]
    prepared: list[PreparedCase]
    scratch: Path
    input: Any = None  # the files the case was converted from (recorded with the prediction)


def _label_outputs(meta: DatasetMeta) -> tuple[int, str, tuple[int, ...] | None]:
    """(number of network outputs, activation, regions_class_order) of a dataset's labels."""
    from voxflow.train.labels import LabelSpec

    spec = LabelSpec.from_meta(meta)
    if not spec.uses_regions:
        return spec.num_outputs, "softmax", None
    if meta.regions_class_order is None or len(meta.regions_class_order) != spec.num_outputs:
        raise VoxflowError(f"a region-based dataset needs regions_class_order with one value per region "
                           f"({spec.num_outputs}); got {meta.regions_class_order!r}. Fix dataset.json.")
    return spec.num_outputs, "sigmoid", meta.regions_class_order


def _predictor(ens: Ensemble, device: str, opts: PredictOptions) -> Any:
    from voxflow.infer._predictor import TilePredictor

    cfg = ens.configuration
    mirror = [a for a in cfg.train.mirror_axes if cfg.patch_size_vox[a] > 1] if opts.tta else []
    _, activation, _ = _label_outputs(ens.dataset)
    return TilePredictor(ens.networks, mirror_axes=mirror, activation=activation,
                         spatial_dims=cfg.network.spatial_dims, device=device, amp=opts.amp)


def _stage_case(src: Store, case_id: str, ensembles: Sequence[Ensemble], scratch_root: Path,
                progress: bool) -> _Staged:
    """Write each configuration's preprocessed image of a case to scratch Zarr (one compute)."""
    scratch = scratch_root / case_id
    if scratch.exists():
        shutil.rmtree(scratch)
    group = zarr.open_group(str(scratch), mode="w", zarr_format=3)
    images, prepared, sources = [], [], []
    for ens in ensembles:
        cfg = ens.configuration
        big = grow_chunks(cfg.patch_size_vox, 4 * cfg.n_channels)
        prep = prepare_case(src, case_id, cfg, out_chunks=big)
        shape = prep.image.shape
        chunks = (shape[0], *clamp_chunks(cfg.patch_size_vox, shape[1:]))  # tiles read ~8 of these
        z = group.create_array(f"{cfg.name}_image", shape=shape, chunks=chunks, dtype=np.float32,
                               compressors=None, fill_value=0.0)
        images.append(z)
        prepared.append(prep)
        # dask chunks are whole multiples of the Zarr chunks: every task writes whole chunks, no lock
        sources.append(prep.image.astype(np.float32).rechunk((shape[0], *clamp_chunks(big, shape[1:]))))
    compute(da.store(sources, images, lock=False, compute=False), desc=f"{case_id}: preprocess",
            progress=progress)
    trim_heap()
    return _Staged(case_id, images, prepared, scratch, input_signature(src, case_id))


def _predict_staged(st: _Staged, ensembles: Sequence[Ensemble], predictors: Sequence[Any], out: Store,
                    opts: PredictOptions) -> None:
    """Sliding window per configuration, then undo preprocessing, ensemble and write the case."""
    from voxflow.infer._sliding import sliding_window_predict

    n_out, activation, regions_order = _label_outputs(ensembles[0].dataset)
    group = zarr.open_group(str(st.scratch), mode="r+", zarr_format=3)
    geom = st.prepared[0].original_geometry
    out_chunks = output_chunks(geom.shape_zyx, n_out)
    back = []
    for ens, pred, image, prep in zip(ensembles, predictors, st.images, st.prepared):
        cfg = ens.configuration
        block = clamp_chunks([-(-p // 2) for p in cfg.patch_size_vox], image.shape[1:])  # half-patch blocks
        probs = group.create_array(f"{cfg.name}_probs", shape=(n_out, *image.shape[1:]), chunks=(n_out, *block),
                                   dtype=np.float32, compressors=None, fill_value=0.0)
        batch = opts.batch_size or (cfg.batch_size if cfg.is_2d else 1)
        sliding_window_predict(image, pred, patch_size_vox=cfg.patch_size_vox, n_classes=n_out, out=probs,
                               step=opts.step, batch_size=batch, cache_bytes=opts.cache_bytes,
                               scratch_dir=st.scratch, progress=opts.progress, desc=f"{st.case_id} {cfg.name}")
        trim_heap()  # the tile cache's blocks are free now; keep them from adding to the write phase's peak
        sep = cfg.resampling.separate_axis if cfg.resampling.separate_z else None
        lazy = da.from_zarr(probs, chunks=(n_out, *output_chunks(image.shape[1:], n_out)))  # fewer, larger tasks
        back.append(undo_preprocessing(lazy, shape_after_crop_zyx=prep.shape_after_crop_zyx,
                                       crop_bbox_zyx=prep.crop_bbox_zyx, original_shape_zyx=geom.shape_zyx,
                                       activation=activation, separate_axis=sep, out_chunks_zyx=out_chunks))
    mean = back[0] if len(back) == 1 else sum(back[1:], back[0]) / len(back)
    out.begin_case(st.case_id, geometry=geom, attrs={
        "configurations": [e.configuration.name for e in ensembles],
        "models": [n for e in ensembles for n in e.names], "activation": activation, "input": st.input})
    first = "label_raw" if opts.postprocessing is not None else "label"
    label_z = out.create_array(st.case_id, first, shape=geom.shape_zyx, dtype=np.uint8, chunks=out_chunks,
                               dimension_names=("z", "y", "x"))
    sources, targets = [probabilities_to_label(mean, regions_class_order=regions_order)], [label_z]
    if opts.save_probabilities:
        targets.append(out.create_array(st.case_id, "probs", shape=mean.shape, dtype=np.float16,
                                        chunks=(1, *out_chunks)))
        sources.append(mean.astype(np.float16).rechunk((1, *out_chunks)))
    compute(da.store(sources, targets, lock=False, compute=False), desc=f"{st.case_id}: write",
            progress=opts.progress)
    if opts.postprocessing is not None:
        _postprocess_case(out, st.case_id, label_z, geom.spacing_zyx, opts)
    out.mark_complete(st.case_id)
    shutil.rmtree(st.scratch, ignore_errors=True)


def _postprocess_case(out: Store, case_id: str, raw: zarr.Array, spacing_zyx: Sequence[float],
                      opts: PredictOptions) -> None:
    """Apply the model's postprocessing to the written ``label_raw`` and write ``label``.

    ``label_raw`` (the plain argmax) is kept beside it, so the effect of postprocessing stays visible."""
    from voxflow.postprocess import apply_postprocessing

    spec = _resolve_postprocessing(opts.postprocessing, [])  # a dict after crossing to a device worker
    lazy = da.from_zarr(raw, chunks=raw.chunks)
    label = apply_postprocessing(lazy, spec, spacing=spacing_zyx)
    target = out.create_array(case_id, "label", shape=raw.shape, dtype=np.uint8, chunks=raw.chunks)
    compute(da.store(label.astype(np.uint8), target, lock=False, compute=False), desc=f"{case_id}: postprocess",
            progress=opts.progress)
    out.update_case_attrs(case_id, postprocessing=spec.to_dict())


def _resolve_postprocessing(postprocessing: Any, checkpoints: Sequence[Path]) -> Any:
    """``"auto"``: the ``postprocessing.json`` of the (single) configuration dir the checkpoints come from;
    ``None``: none; a spec, dict or path: that one."""
    from voxflow.postprocess import PostprocessingSpec

    if postprocessing is None:
        return None
    if isinstance(postprocessing, str) and postprocessing == "auto":
        cfg_dirs = {c.parent.parent for c in checkpoints}
        if len(cfg_dirs) != 1:
            if cfg_dirs:
                log.info("no postprocessing applied: it is chosen per configuration, and %d are ensembled",
                         len(cfg_dirs))
            return None
        path = next(iter(cfg_dirs)) / "postprocessing.json"
        return PostprocessingSpec.load(path) if path.is_file() else None
    if isinstance(postprocessing, PostprocessingSpec):
        return postprocessing
    if isinstance(postprocessing, dict):
        return PostprocessingSpec.from_dict(postprocessing)
    return PostprocessingSpec.load(Path(postprocessing))


def _unpack_packages(dirs: Sequence[str | Path], configs: Sequence[str] | None
                     ) -> tuple[list[str | Path], Sequence[str] | None]:
    """Replace model packages (``voxflow export-model`` zips) by their unpacked folders; the
    package's configurations become the default selection."""
    from voxflow.pipeline._package import is_model_package, unpack_model

    out: list[str | Path] = []
    for d in dirs:
        if is_model_package(d):
            root = unpack_model(d)
            out.append(root)
            if configs is None:
                configs = json.loads((root / "voxflow_model.json").read_text())["configurations"]
        else:
            out.append(d)
    return out, configs


def _predict_cases(src: Store, out: Store, ensembles: Sequence[Ensemble], case_ids: Sequence[str], *,
                   device: str, opts: PredictOptions, scratch_root: Path) -> None:
    """Predict cases one after the other, preprocessing the next one while the current one runs."""
    if not case_ids:
        return
    predictors = [_predictor(e, device, opts) for e in ensembles]
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxflow-stage") as pool:
        nxt = pool.submit(_stage_case, src, case_ids[0], ensembles, scratch_root, False)
        for i, cid in enumerate(tqdm(case_ids, desc="cases", unit="case", disable=not opts.progress)):
            staged = nxt.result()
            if i + 1 < len(case_ids):
                nxt = pool.submit(_stage_case, src, case_ids[i + 1], ensembles, scratch_root, False)
            _predict_staged(staged, ensembles, predictors, out, _case_opts(opts, src, cid))
            log.info("predicted case %s (%d/%d) on %s", cid, i + 1, len(case_ids), device)


def _case_opts(opts: PredictOptions, src: Store, case_id: str) -> PredictOptions:
    """Per-case progress bars only for cases big enough to take seconds (the stage bar counts cases)."""
    from voxflow.cluster import case_progress

    return replace(opts, progress=case_progress(opts.progress, int(np.prod(src.zarr_array(case_id, "image").shape))))


def _load_ensembles(checkpoints: Sequence[Path], device: str) -> list[Ensemble]:
    try:
        from voxflow.train import load_model
    except ImportError:
        from voxflow.train.checkpoint import load_model
    models = [load_model(p, device=device) for p in checkpoints]
    return group_models(models, [f"{p.parent.parent.name}/{p.parent.name}" for p in checkpoints])


def _devices(device: str | Sequence[str]) -> list[str]:
    if not isinstance(device, str):
        return [str(d) for d in device]
    if "," in device:
        return [d.strip() for d in device.split(",") if d.strip()]
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if n > 1:
            return [f"cuda:{i}" for i in range(n)]
    return [device]


def _device_worker(src_path: str, out_path: str, checkpoints: list[str], device: str, case_ids: list[str],
                   opts: dict[str, Any], scratch_root: str) -> None:
    """Entry point of one process per device (spawned)."""
    ensembles = _load_ensembles([Path(p) for p in checkpoints], device)
    with scheduler_context("threads"):
        _predict_cases(Store.open(src_path), Store.open(out_path, mode="r+"), ensembles, case_ids,
                       device=device, opts=PredictOptions(**{**opts, "progress": False}),
                       scratch_root=Path(scratch_root) / device.replace(":", "_"))


def _run_on_devices(devices: list[str], src: Store, out: Store, checkpoints: list[Path], todo: list[str],
                    opts: PredictOptions, scratch_root: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = []
    for dev, part in zip(devices, split_evenly(todo, len(devices))):
        if part:
            p = ctx.Process(target=_device_worker, args=(str(src.path), str(out.path), [str(c) for c in checkpoints],
                                                          dev, part, asdict(opts), str(scratch_root)))
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


@locked(lambda a: dir_lock_file(a["output"]), command="predict")
def predict(source: Store | str | Path | Sequence[str | Path], output: str | Path, *,
            model_dir: str | Path | Sequence[str | Path] | None = None,
            models: Sequence[tuple[Any, Any, DatasetMeta]] | None = None,
            configuration: str | Sequence[str] | None = None, folds: Sequence[int | str] | None = None,
            step: float = 0.5, tta: bool = True, device: str | Sequence[str] = "cpu",
            save_probabilities: bool = False, scheduler: str = "threads", memory_limit: str | None = None,
            batch_size: int | None = None,
            cache_bytes: int = DEFAULT_CACHE_BYTES, export: bool = True, overwrite: bool = False,
            case_ids: Sequence[str] | None = None, progress: bool = True,
            postprocessing: Any = "auto") -> Store:
    """Segment every case of ``source`` and write ``output/prediction.zarr`` (+ files in ``output``).

    Parameters
    ----------
    source : a voxflow store (dataset or matching preprocessed store), a folder of images, or files
        (nnU-Net ``<case>_<channel:04d>`` names give multi-channel cases).
    output : output folder: the prediction store (kind "prediction"; per case ``label`` uint8 in the
        original geometry, and ``probs`` float16 (K, Z, Y, X) with ``save_probabilities``), exported
        ``<case><file_ending>`` label files and (while running) scratch data.
    model_dir : ``WORK/runs/<cfg>`` (or ``WORK/runs`` with ``configuration``); one or several, whose
        configurations are ensembled. Alternatively ``models``: ``(network, Configuration,
        DatasetMeta)`` triples as returned by ``voxflow.train.load_model``.
    folds : folds to ensemble (default: every ``fold_<k>`` with ``checkpoint_final.pt``).
    step : sliding-window step as a fraction of the patch size.
    tta : mirror test-time augmentation over the configuration's ``train.mirror_axes``.
    device : ``cpu``, ``cuda``, ``cuda:1``; several (``"cuda:0,cuda:1"`` or a list, or ``cuda`` with
        several GPUs) predict different cases in one process per device.
    scheduler, memory_limit : dask scheduler for preprocessing and writing (see :mod:`voxflow.cluster`).
    cache_bytes : memory for partial accumulator blocks before they spill to a scratch file.
    overwrite : redo cases already complete in the output store (else they are skipped: resume).
    postprocessing : ``"auto"`` applies the model dir's ``postprocessing.json`` (chosen by
        cross-validation; single configuration only), ``None`` disables it, or give a spec / path.
        With postprocessing, the plain argmax is kept as ``label_raw`` beside ``label``.

    Memory is bounded by ``cache_bytes``, the patch and the store chunks, not by the volume; this
    fixes glibc's mmap threshold for the process (:func:`release_large_allocations`). One writer per
    output folder: holds ``output/.voxflow.lock`` (:class:`~voxflow.errors.LockedError` for a second).
    """
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    release_large_allocations()
    opts = PredictOptions(step=step, tta=tta, save_probabilities=save_probabilities, batch_size=batch_size,
                          cache_bytes=cache_bytes, progress=progress)
    devices = _devices(device)
    configs = [configuration] if isinstance(configuration, str) else configuration
    checkpoints: list[Path] = []
    if models is not None:
        if len(devices) > 1:
            raise VoxflowError("several devices need model_dir (each process loads its models); got models=.")
        ensembles = group_models(models)
    elif model_dir is not None:
        dirs = [model_dir] if isinstance(model_dir, (str, Path)) else list(model_dir)
        dirs, configs = _unpack_packages(dirs, configs)
        checkpoints = find_checkpoints(dirs, configurations=configs, folds=folds)
        ensembles = _load_ensembles(checkpoints, devices[0])
    else:
        raise VoxflowError("predict needs model_dir (WORK/runs/<configuration>) or models; got neither.")
    opts = replace(opts, postprocessing=_resolve_postprocessing(postprocessing, checkpoints))
    scratch_root = out_dir / ".scratch"
    with scheduler_context(scheduler, memory_limit=memory_limit):
        src = open_input(source, out_dir / ".input", scheduler=scheduler)
        meta = DatasetMeta(channel_names=src.meta.channel_names, labels=ensembles[0].dataset.labels,
                           regions_class_order=ensembles[0].dataset.regions_class_order,
                           file_ending=src.meta.file_ending, name=src.meta.name, kind="prediction",
                           extra={"configurations": [e.configuration.name for e in ensembles],
                                  "models": [n for e in ensembles for n in e.names], "step": step, "tta": tta})
        out = Store.create(out_dir / STORE_NAME, meta, overwrite=overwrite)
        ids = list(case_ids) if case_ids is not None else src.case_ids()
        todo = cases_to_predict(src, out, ids)
        log.info("predicting %d cases (%d already complete) with %s", len(todo), len(ids) - len(todo),
                 ", ".join(n for e in ensembles for n in e.names))
        if len(devices) > 1 and len(todo) > 1:
            _run_on_devices(devices, src, out, checkpoints, todo, opts, scratch_root)
        else:
            _predict_cases(src, out, ensembles, todo, device=devices[0], opts=opts, scratch_root=scratch_root)
    shutil.rmtree(scratch_root, ignore_errors=True)
    if export:
        export_labels(out, out_dir, ids, file_ending=src.meta.file_ending,
                      scheduler=scheduler if scheduler in ("threads", "processes", "sync") else "threads")
    return out
