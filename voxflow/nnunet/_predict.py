"""Predict with an nnU-Net v2 model folder through voxflow's tiled, bounded-memory case pipeline.

nnU-Net works in *logits* until the very end: mirrored predictions, Gaussian-weighted tiles and
folds are averaged as logits, the logits are resampled back to the original grid (order 1, order
0 along a separate z axis), and only then softmax / sigmoid and argmax. :class:`NnunetPredictionModel`
says exactly that to voxflow's case pipeline (:func:`voxflow.infer.run_prediction`): nnU-Net's
preprocessing graph, a logits tile predictor in the network's axis order, nnU-Net's tile weights and
the way back; so results match nnU-Net's predictor wherever that can run at all.

A cascade (``3d_cascade_fullres``) is a two-stage model: its :attr:`NnunetPredictionModel.previous_stage`
is the ``3d_lowres`` model, whose label map the engine predicts first (on the original grid, as
nnU-Net exports it); ``prepare`` appends it as one-hot channels resampled like nnU-Net's
preprocessor resamples a segmentation (:func:`voxflow.nnunet._cascade.previous_stage_onehot`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from voxflow._lock import dir_lock_file, locked
from voxflow.cluster import compute
from voxflow.geometry import Geometry
from voxflow.infer import (
    CaseInput,
    PredictOptions,
    TilePredictor,
    TileScorer,
    background_probabilities,
    describe_case,
    read_chunks,
    resolve_postprocessing,
    run_prediction,
    uncrop,
)
from voxflow.nnunet._cascade import previous_stage_onehot
from voxflow.nnunet._model import NnunetModel, load_nnunet_model
from voxflow.nnunet._preprocess import clip_bounds, nnunet_gaussian, normalized_crop, resample_like_nnunet
from voxflow.nnunet._translate import NnunetModelError, case_configuration, separate_z_axis
from voxflow.plan.schema import Configuration
from voxflow.preprocess import BBox, nonzero_bbox, nonzero_mask, resample_to_shape
from voxflow.store import DatasetMeta, Store

__all__ = ["NnunetLoader", "NnunetPredictionModel", "NnunetTilePredictor", "predict_nnunet"]


class NnunetTilePredictor(TilePredictor):
    """Averaged logits of (B, C, Z, Y, X) tiles over folds and mirrorings, as nnU-Net computes them.

    Tiles come in voxflow's (z, y, x) order; they are permuted with ``transpose_forward`` for the
    network (whose ``mirror_axes_net`` are its own spatial axes) and the logits permuted back.
    """

    def __init__(
        self,
        networks: Sequence[Any],
        *,
        transpose_forward: Sequence[int],
        mirror_axes_net: Sequence[int],
        spatial_dims: int,
        device: str = "cpu",
        voxel_bytes: float | None = None,
        divisor_zyx: Sequence[int] | None = None,
    ):
        offset = 1 if spatial_dims == 2 else 0  # a 2-D network's axes are the last two of the permuted tile
        order = [int(a) for a in transpose_forward]
        super().__init__(
            list(networks),
            mirror_axes=[order[int(a) + offset] for a in mirror_axes_net],
            activation=None,
            spatial_dims=spatial_dims,
            device=device,
            axis_order=order,
            voxel_bytes=voxel_bytes,
            divisor_zyx=divisor_zyx,
        )


def _activate(logits: da.Array, activation: str) -> da.Array:
    """Softmax over the class axis (0) or per-channel sigmoid, blockwise (classes in one chunk)."""

    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=0, keepdims=True))
        return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)

    fn = softmax if activation == "softmax" else sigmoid
    return logits.rechunk({0: -1}).map_blocks(fn, dtype=np.float32)


def _restore(
    logits: da.Array,
    out_chunks: tuple[int, ...],
    *,
    model: NnunetModel,
    cfg: Configuration,
    geometry: Geometry,
    bbox: BBox,
    shape_crop: tuple[int, ...],
    activation: str,
) -> da.Array:
    """Logits on the preprocessed grid -> probabilities on the original grid, as nnU-Net: resample the
    logits back to the crop, activate, uncrop."""
    spec, k = model.spec, model.spec.num_outputs
    target = list(cfg.spacing_zyx)
    if cfg.is_2d:
        target[0] = geometry.spacing_zyx[0]
    sep = separate_z_axis(target, geometry.spacing_zyx, force=spec.force_separate_z)
    back = resample_to_shape(
        logits,
        shape_crop,
        order=spec.probabilities_order,
        separate_axis=sep,
        separate_order=spec.probabilities_order_z,
        out_chunks=out_chunks,
    )
    probs = _activate(back, activation)
    full = uncrop(probs, bbox, geometry.shape_zyx, background=background_probabilities(k, activation))
    return full.rechunk((k, *out_chunks))


@dataclass(frozen=True)
class NnunetPredictionModel:
    """An nnU-Net model folder as a :class:`voxflow.infer.PredictionModel`: nnU-Net's preprocessing,
    its tile weights, logits averaged over folds and mirrorings, resampled back before activation."""

    model: NnunetModel

    @property
    def name(self) -> str:
        return self.model.spec.configuration.name

    @property
    def names(self) -> list[str]:
        return list(self.model.fold_names)

    @property
    def dataset(self) -> DatasetMeta:
        return self.model.dataset

    @property
    def n_outputs(self) -> int:
        return self.model.spec.num_outputs

    @property
    def activation(self) -> str:
        return "sigmoid" if self.model.dataset.regions_class_order is not None else "softmax"

    @property
    def regions_class_order(self) -> tuple[int, ...] | None:
        order = self.model.dataset.regions_class_order
        return None if order is None else tuple(order)

    @property
    def patch_size_vox(self) -> tuple[int, int, int]:
        return self.model.spec.configuration.patch_size_vox

    @property
    def n_channels(self) -> int:
        return self.model.spec.num_input_channels

    @property
    def record(self) -> Mapping[str, Any]:
        rec = {"nnunet_model": str(self.model.folder)}
        if self.model.previous is not None:
            rec["nnunet_previous_model"] = str(self.model.previous.folder)
        return rec

    @property
    def previous_stage(self) -> NnunetPredictionModel | None:
        """The cascade's previous stage (nnU-Net's ``3d_lowres``), or None for a single-stage model."""
        return None if self.model.previous is None else NnunetPredictionModel(self.model.previous)

    def batch_size(self, requested: int | None) -> int:
        return requested or 1

    def importance_map(self) -> np.ndarray | None:
        return nnunet_gaussian(self.patch_size_vox)

    def check_input(self, store: Store) -> None:
        if store.meta.kind != "dataset":
            raise NnunetModelError(
                f"an nnU-Net model predicts raw images (a folder, files or a converted dataset "
                f"store); got a {store.meta.kind!r} store at {store.path}."
            )

    def prepare(
        self, store: Store, case_id: str, *, out_chunks: Sequence[int], previous: Mapping[str, da.Array]
    ) -> CaseInput:
        """nnU-Net's preprocessing of one case (crop, normalise, resample, skimage's clip): lazy, after
        one small compute of the value range the clip needs."""
        spec, geom = self.model.spec, store.geometry(case_id)
        cfg = case_configuration(spec, geom.spacing_zyx)
        raw = store.image(case_id, chunks=read_chunks(store, case_id))
        if raw.shape[0] != spec.num_input_channels:
            raise NnunetModelError(
                f"images must have the {spec.num_input_channels} channels the nnU-Net model was "
                f"trained on; got {raw.shape[0]} for case {case_id!r} "
                f"{describe_case(store, case_id)}. Give one file per channel, named CASE_0000, "
                f"CASE_0001, ... (nnU-Net style)."
            )
        bbox = nonzero_bbox(raw)
        norm = normalized_crop(raw, bbox, cfg)
        sep_in = cfg.resampling.separate_axis if cfg.resampling.separate_z else None
        bounds = compute(*clip_bounds(norm, sep_in), desc=f"{case_id}: value range", progress=False)
        image = resample_like_nnunet(norm, geom, cfg, bounds, out_chunks=out_chunks)
        if spec.previous_stage is not None:
            extra = self._previous_channels(
                previous, case_id, geom, bbox, nonzero_mask(raw), image.shape[1:], out_chunks
            )
            image = da.concatenate([image, extra], axis=0)
        restore = partial(
            _restore,
            model=self.model,
            cfg=cfg,
            geometry=geom,
            bbox=bbox,
            shape_crop=tuple(int(s) for s in norm.shape[1:]),
            activation=self.activation,
        )
        return CaseInput(image, geom, restore)

    def _previous_channels(
        self,
        previous: Mapping[str, da.Array],
        case_id: str,
        geom: Geometry,
        bbox: BBox,
        nonzero: da.Array,
        shape_zyx: Sequence[int],
        out_chunks: Sequence[int],
    ) -> da.Array:
        """The previous stage's label map of the case as one-hot channels on this model's grid (lazy)."""
        spec = self.model.spec
        stage = str(spec.previous_stage)
        if stage not in previous:
            raise NnunetModelError(
                f"the cascade configuration {self.name!r} needs the {stage!r} segmentation of "
                f"case {case_id!r} as input; got stages {sorted(previous)}. Predict with the "
                f"cascade model folder (its previous stage runs first)."
            )
        label = previous[stage]
        if tuple(label.shape) != tuple(geom.shape_zyx):
            raise NnunetModelError(
                f"the {stage!r} segmentation of case {case_id!r} must have the case's shape "
                f"{geom.shape_zyx}; got {tuple(label.shape)}."
            )
        target = self.model.spec.configuration.spacing_zyx
        sep = separate_z_axis(geom.spacing_zyx, target, force=spec.seg_force_separate_z)
        return previous_stage_onehot(
            label,
            bbox,
            shape_zyx,
            labels=spec.previous_labels,
            nonzero=nonzero,
            order=spec.seg_order,
            separate_axis=sep,
            order_z=spec.seg_order_z,
            out_chunks=out_chunks,
        )

    def tile_predictor(self, *, device: str, tta: bool, amp: bool) -> TileScorer:
        from voxflow.infer import forward_bytes_per_voxel

        spec, cfg = self.model.spec, self.model.spec.configuration
        stride = tuple(int(s) for s in cfg.network.total_stride)
        return NnunetTilePredictor(
            self.model.networks,
            transpose_forward=spec.transpose_forward,
            mirror_axes_net=spec.mirror_axes_net if tta else (),
            spatial_dims=spec.spatial_dims,
            device=device,
            voxel_bytes=forward_bytes_per_voxel(
                cfg.network, cfg.patch_size_vox, spec.num_input_channels, spec.num_outputs
            ),
            divisor_zyx=(1, *stride) if len(stride) == 2 else stride,
        )


@dataclass(frozen=True)
class NnunetLoader:
    """Loads an nnU-Net model folder on a device (picklable: one process per device loads its own)."""

    folder: Path
    folds: tuple[int | str, ...] | None
    checkpoint: str
    previous_model: Path | None = None

    def __call__(self, device: str) -> list[NnunetPredictionModel]:
        model = load_nnunet_model(
            self.folder, folds=self.folds, checkpoint=self.checkpoint, device=device, previous_model=self.previous_model
        )
        return [NnunetPredictionModel(model)]


@locked(lambda a: dir_lock_file(a["output"]), command="predict --nnunet-model")
def predict_nnunet(
    source: Store | str | Path | Sequence[str | Path],
    output: str | Path,
    model: NnunetModel | str | Path,
    *,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    previous_model: str | Path | None = None,
    case_ids: Sequence[str] | None = None,
    postprocessing: Any = "auto",
    options: PredictOptions | None = None,
    **option_values: Any,
) -> Store:
    """Segment every case of ``source`` with an nnU-Net v2 model folder; write ``output/prediction.zarr``.

    Same inputs, options and outputs as :func:`voxflow.infer.predict` (``label`` uint8 per case in the
    original geometry, ``probs`` float16 (K, Z, Y, X) with ``save_probabilities``, exported label
    files; ``device``, ``step``, ``tta``, ... as keywords). ``model`` is
    ``RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG`` (or a loaded :class:`NnunetModel`); ``folds``
    default to every ``fold_<k>`` holding ``checkpoint``. nnU-Net's inference defaults: step 0.5,
    Gaussian weighting, mirroring over the checkpoint's ``inference_allowed_mirroring_axes``
    (``tta=False`` disables it), fold logits averaged, one tile per batch. ``postprocessing``:
    ``"auto"`` applies a voxflow ``postprocessing.json`` in the model folder if there is one (nnU-Net's
    own ``postprocessing.pkl`` is not read), ``None`` none, or a spec / path. A cascade folder
    (``..._3d_cascade_fullres``) runs in two stages as nnU-Net's predictor with
    ``folder_with_segs_from_prev_stage``: ``previous_model`` is its ``3d_lowres`` folder (default:
    the sibling ``TRAINER__PLANS__3d_lowres``), predicted with the same folds and options first
    (stored in ``output/stages/3d_lowres.zarr``, resumable).
    """
    opts = PredictOptions.build(options, **option_values)
    loader = None
    if not isinstance(model, NnunetModel):
        loader = NnunetLoader(
            Path(model),
            tuple(folds) if folds else None,
            checkpoint,
            Path(previous_model) if previous_model is not None else None,
        )
        models = loader(opts.devices()[0])
    else:
        if previous_model is not None:
            raise NnunetModelError(
                "previous_model goes with a model folder; a loaded NnunetModel brings its previous "
                "stage itself (load_nnunet_model(folder, previous_model=...))."
            )
        models = [NnunetPredictionModel(model)]
    spec = resolve_postprocessing(postprocessing, [models[0].model.folder])
    return run_prediction(
        source, output, models, PredictOptions.build(opts, postprocessing=spec), loader=loader, case_ids=case_ids
    )
