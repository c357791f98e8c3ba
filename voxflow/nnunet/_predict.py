"""Predict with an nnU-Net v2 model folder through voxflow's tiled, bounded-memory pipeline.

nnU-Net works in *logits* until the very end: mirrored predictions, Gaussian-weighted tiles and
folds are averaged as logits, the logits are resampled back to the original grid (order 1, order
0 along a separate z axis), and only then softmax / sigmoid and argmax. This module does the same
with voxflow's pieces (preprocessing graph, Zarr tile accumulator, chunked resampling), so that
results match nnU-Net's predictor wherever that can run at all.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from voxflow._lock import dir_lock_file, locked
from voxflow.cluster import compute, scheduler_context
from voxflow.infer._accumulator import DEFAULT_CACHE_BYTES
from voxflow.infer._chunks import clamp_chunks, grow_chunks, output_chunks, read_chunks
from voxflow.infer._export import export_labels
from voxflow.infer._inputs import cases_to_predict, describe_case, input_signature, open_input
from voxflow.infer._memory import release_large_allocations, trim_heap
from voxflow.infer._undo import probabilities_to_label, uncrop
from voxflow.nnunet._model import NnunetModel, load_nnunet_model
from voxflow.nnunet._preprocess import clip_bounds, nnunet_gaussian, normalized_crop, resample_like_nnunet
from voxflow.nnunet._translate import NnunetModelError, case_configuration, separate_z_axis
from voxflow.preprocess import nonzero_bbox, resample_to_shape
from voxflow.store import DEFAULT_CHUNKS_ZYX, DatasetMeta, Store

__all__ = ["NnunetTilePredictor", "predict_nnunet"]

log = logging.getLogger(__name__)
STORE_NAME = "prediction.zarr"


class NnunetTilePredictor:
    """Averaged logits of (B, C, Z, Y, X) tiles over folds and mirrorings, as nnU-Net computes them.

    Tiles come in voxflow's (z, y, x) order; they are permuted with ``transpose_forward`` for the
    network (whose ``mirror_axes_net`` are its own spatial axes) and the logits permuted back.
    """

    def __init__(self, networks: Sequence[Any], *, transpose_forward: Sequence[int], mirror_axes_net: Sequence[int],
                 spatial_dims: int, device: str = "cpu"):
        import itertools

        import torch

        self.device = torch.device(device)
        self.networks = [n.to(self.device).eval() for n in networks]
        self.perm = [0, 1, *(2 + int(a) for a in transpose_forward)]
        self.inverse = [int(i) for i in np.argsort(self.perm)]
        axes = [int(a) + 2 for a in mirror_axes_net]
        self.mirrors = [()] + [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
        self.spatial_dims = spatial_dims

    def __call__(self, tiles: np.ndarray) -> Any:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(tiles, np.float32), device=self.device).permute(self.perm)
            if self.spatial_dims == 2:
                x = x[:, :, 0]
            total = None
            for net in self.networks:
                for axes in self.mirrors:
                    out = net(torch.flip(x, axes) if axes else x)
                    out = out[0] if isinstance(out, (list, tuple)) else out
                    out = torch.flip(out, axes) if axes else out
                    total = out.float() if total is None else total + out.float()
            assert total is not None
            total = total / (len(self.networks) * len(self.mirrors))
            if self.spatial_dims == 2:
                total = total[:, :, None]
            return total.permute(self.inverse).contiguous()


def _activate(logits: da.Array, activation: str) -> da.Array:
    """Softmax over the class axis (0) or per-channel sigmoid, blockwise (classes in one chunk)."""
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=0, keepdims=True))
        return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)

    fn = softmax if activation == "softmax" else sigmoid
    return logits.rechunk({0: -1}).map_blocks(fn, dtype=np.float32)


def _predict_case(src: Store, out: Store, model: NnunetModel, predictor: NnunetTilePredictor, case_id: str, *,
                  step: float, batch_size: int, cache_bytes: int, save_probabilities: bool, scratch: Path,
                  progress: bool) -> None:
    from voxflow.infer._sliding import sliding_window_predict

    spec, geom = model.spec, src.geometry(case_id)
    cfg = case_configuration(spec, geom.spacing_zyx)
    raw = src.image(case_id, chunks=read_chunks(src, case_id))
    if raw.shape[0] != spec.num_input_channels:
        raise NnunetModelError(f"images must have the {spec.num_input_channels} channels the nnU-Net model was "
                               f"trained on; got {raw.shape[0]} for case {case_id!r} {describe_case(src, case_id)}. "
                               f"Give one file per channel, named CASE_0000, CASE_0001, ... (nnU-Net style).")
    bbox = nonzero_bbox(raw)
    norm = normalized_crop(raw, bbox, cfg)
    sep_in = cfg.resampling.separate_axis if cfg.resampling.separate_z else None
    bounds = compute(*clip_bounds(norm, sep_in), desc=f"{case_id}: value range", progress=progress)
    shape_crop = tuple(int(s) for s in norm.shape[1:])
    big = grow_chunks(cfg.patch_size_vox, 4 * spec.num_input_channels)  # compute in few, large tasks
    image_lazy = resample_like_nnunet(norm, geom, cfg, bounds, out_chunks=big)
    if scratch.exists():
        shutil.rmtree(scratch)
    group = zarr.open_group(str(scratch), mode="w", zarr_format=3)
    shape = image_lazy.shape
    image = group.create_array("image", shape=shape, chunks=(shape[0], *clamp_chunks(cfg.patch_size_vox, shape[1:])),
                               dtype=np.float32, compressors=None, fill_value=0.0)
    # dask chunks are whole multiples of the Zarr chunks: every task writes whole chunks, no lock
    staged = da.store(image_lazy.rechunk((shape[0], *clamp_chunks(big, shape[1:]))), image,  # type: ignore[arg-type]
                      lock=False, compute=False)
    compute(staged, desc=f"{case_id}: preprocess", progress=progress)
    trim_heap()
    k = spec.num_outputs
    block = clamp_chunks([-(-p // 2) for p in cfg.patch_size_vox], shape[1:])
    logits = group.create_array("logits", shape=(k, *shape[1:]), chunks=(k, *block), dtype=np.float32,
                                compressors=None, fill_value=0.0)
    sliding_window_predict(image, predictor, patch_size_vox=cfg.patch_size_vox, n_classes=k, out=logits, step=step,
                           batch_size=batch_size, cache_bytes=cache_bytes, scratch_dir=scratch, progress=progress,
                           desc=f"{case_id} {cfg.name}", importance_map=nnunet_gaussian(cfg.patch_size_vox))
    trim_heap()  # the tile cache's blocks are free now; keep them from adding to the write phase's peak
    target = list(cfg.spacing_zyx)
    if cfg.is_2d:
        target[0] = geom.spacing_zyx[0]
    sep = separate_z_axis(target, geom.spacing_zyx, force=spec.force_separate_z)
    out_chunks = clamp_chunks(DEFAULT_CHUNKS_ZYX, geom.shape_zyx)
    lazy = da.from_zarr(logits, chunks=(k, *output_chunks(shape[1:], k)))  # fewer, larger tasks than the blocks
    back = resample_to_shape(lazy, shape_crop, order=spec.probabilities_order,
                             separate_axis=sep, separate_order=spec.probabilities_order_z, out_chunks=out_chunks)
    activation = "sigmoid" if model.dataset.regions_class_order is not None else "softmax"
    probs = _activate(back, activation)
    background = [1.0 if (activation == "softmax" and c == 0) else 0.0 for c in range(k)]
    full = uncrop(probs, bbox, geom.shape_zyx, background=background).rechunk((k, *out_chunks))
    out.begin_case(case_id, geometry=geom, attrs={"configurations": [cfg.name], "models": model.fold_names,
                                                  "activation": activation, "nnunet_model": str(model.folder),
                                                  "input": input_signature(src, case_id)})
    label = out.create_array(case_id, "label", shape=geom.shape_zyx, dtype=np.uint8, chunks=out_chunks)
    sources, targets = [probabilities_to_label(full, regions_class_order=model.dataset.regions_class_order)], [label]
    if save_probabilities:
        targets.append(out.create_array(case_id, "probs", shape=full.shape, dtype=np.float16, chunks=(1, *out_chunks)))
        sources.append(full.astype(np.float16).rechunk((1, *out_chunks)))
    compute(da.store(sources, targets, lock=False, compute=False),  # type: ignore[arg-type]
            desc=f"{case_id}: write", progress=progress)
    out.mark_complete(case_id)
    shutil.rmtree(scratch, ignore_errors=True)


@locked(lambda a: dir_lock_file(a["output"]), command="predict --nnunet-model")
def predict_nnunet(source: Store | str | Path | Sequence[str | Path], output: str | Path,
                   model: NnunetModel | str | Path, *, folds: Sequence[int | str] | None = None,
                   checkpoint: str = "checkpoint_final.pth", step: float = 0.5, tta: bool = True,
                   device: str = "cpu", save_probabilities: bool = False, scheduler: str = "threads",
                   memory_limit: str | None = None, batch_size: int = 1, cache_bytes: int = DEFAULT_CACHE_BYTES,
                   export: bool = True, overwrite: bool = False, case_ids: Sequence[str] | None = None,
                   progress: bool = True) -> Store:
    """Segment every case of ``source`` with an nnU-Net v2 model folder; write ``output/prediction.zarr``.

    Same inputs and outputs as :func:`voxflow.infer.predict` (``label`` uint8 per case in the
    original geometry, ``probs`` float16 (K, Z, Y, X) with ``save_probabilities``, exported label
    files). ``model`` is ``RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG`` (or a loaded
    :class:`NnunetModel`); ``folds`` default to every ``fold_<k>`` holding ``checkpoint``. nnU-Net's
    inference defaults: step 0.5, Gaussian weighting, mirroring over the checkpoint's
    ``inference_allowed_mirroring_axes`` (``tta=False`` disables it), fold logits averaged. Like
    :func:`voxflow.infer.predict`, it fixes glibc's mmap threshold for the process.
    """
    release_large_allocations()  # tile-sized buffers go back to the OS (see voxflow.infer._memory)
    if not isinstance(model, NnunetModel):
        model = load_nnunet_model(model, folds=folds, checkpoint=checkpoint, device=device)
    spec = model.spec
    predictor = NnunetTilePredictor(model.networks, transpose_forward=spec.transpose_forward,
                                    mirror_axes_net=spec.mirror_axes_net if tta else (),
                                    spatial_dims=spec.spatial_dims, device=device)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    with scheduler_context(scheduler, memory_limit=memory_limit):
        src = open_input(source, out_dir / ".input", scheduler=scheduler)
        if src.meta.kind != "dataset":
            raise NnunetModelError(f"an nnU-Net model predicts raw images (a folder, files or a converted dataset "
                                   f"store); got a {src.meta.kind!r} store at {src.path}.")
        meta = DatasetMeta(channel_names=src.meta.channel_names, labels=model.dataset.labels,
                           regions_class_order=model.dataset.regions_class_order, file_ending=src.meta.file_ending,
                           name=src.meta.name, kind="prediction",
                           extra={"configurations": [spec.configuration.name], "models": model.fold_names,
                                  "nnunet_model": str(model.folder), "step": step, "tta": tta})
        out = Store.create(out_dir / STORE_NAME, meta, overwrite=overwrite)
        ids = list(case_ids) if case_ids is not None else src.case_ids()
        todo = cases_to_predict(src, out, ids)
        log.info("predicting %d cases (%d already complete) with nnU-Net model %s (%s)", len(todo),
                 len(ids) - len(todo), model.folder, ", ".join(model.fold_names))
        for cid in todo:
            _predict_case(src, out, model, predictor, cid, step=step, batch_size=batch_size,
                          cache_bytes=cache_bytes, save_probabilities=save_probabilities,
                          scratch=out_dir / ".scratch" / cid, progress=progress)
    shutil.rmtree(out_dir / ".scratch", ignore_errors=True)
    if export:
        export_labels(out, out_dir, ids, file_ending=src.meta.file_ending)
    return out
