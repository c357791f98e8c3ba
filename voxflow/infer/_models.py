"""voxflow's own models for the case pipeline: the trained folds of one or more configurations.

An :class:`Ensemble` (the folds of one configuration) is a
:class:`~voxflow.infer.PredictionModel`: it preprocesses like training did
(:func:`~voxflow.infer._inputs.prepare_case`), averages the folds' probabilities tile by tile
(:class:`~voxflow.infer.TilePredictor`) and undoes the preprocessing with
:func:`~voxflow.infer.undo_preprocessing`. Model directories follow
:class:`~voxflow.workspace.ConfigurationDir`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from voxflow.errors import IncompleteStoreError, VoxflowError
from voxflow.infer._inputs import PreparedCase, prepare_case
from voxflow.infer._protocols import CaseInput, TileScorer
from voxflow.infer._undo import undo_preprocessing
from voxflow.plan.schema import Configuration
from voxflow.store import DatasetMeta, Store
from voxflow.workspace import CHECKPOINT_FINAL, ConfigurationDir, FoldDir

__all__ = ["CheckpointLoader", "Ensemble", "find_trained_folds", "group_models", "previous_stage_folds"]

log = logging.getLogger(__name__)


def _config_dirs(model_dirs: Sequence[Path], configurations: Sequence[str] | None) -> list[ConfigurationDir]:
    """Each model dir is ``runs/<cfg>/`` (holding ``fold_*``) or ``runs/`` (select with configurations)."""
    out: list[ConfigurationDir] = []
    for d in model_dirs:
        if not d.is_dir():
            raise IncompleteStoreError(
                f"model dir {str(d)!r} must exist (WORK/runs/<configuration>); it does "
                f"not. Train a model first (`voxflow train`)."
            )
        if ConfigurationDir(d).has_folds():
            if configurations and d.name not in configurations:
                raise VoxflowError(
                    f"model dir {str(d)!r} holds configuration {d.name!r}, not one of "
                    f"{list(configurations)}; drop -c or point -m at WORK/runs."
                )
            out.append(ConfigurationDir(d))
        elif configurations:
            out.extend(ConfigurationDir(d / c) for c in configurations)
        else:
            out.extend(
                ConfigurationDir(p) for p in sorted(d.iterdir()) if p.is_dir() and ConfigurationDir(p).has_folds()
            )
    if not out:
        raise IncompleteStoreError(
            f"model dirs {[str(d) for d in model_dirs]} must hold fold_<k>/{CHECKPOINT_FINAL}; found none."
        )
    return out


def find_trained_folds(
    model_dirs: Sequence[str | Path],
    *,
    configurations: Sequence[str] | None = None,
    folds: Sequence[int | str] | None = None,
) -> list[FoldDir]:
    """The fold dirs ``<cfg dir>/fold_<k>/`` to predict with (default: every one with a final checkpoint)."""
    out: list[FoldDir] = []
    for cdir in _config_dirs([Path(d) for d in model_dirs], configurations):
        wanted = [cdir.fold(f) for f in folds] if folds else cdir.trained_folds()
        for fdir in wanted:
            if not fdir.checkpoint_final.exists():
                raise IncompleteStoreError(
                    f"{fdir.checkpoint_final} must exist to predict with {fdir.path.name} "
                    f"of {cdir.name}; it does not. Finish training that fold or choose "
                    f"others with -f."
                )
            out.append(fdir)
        if not wanted:
            raise IncompleteStoreError(f"{cdir.path} must hold fold_<k>/{CHECKPOINT_FINAL}; found none.")
    return out


def _restore(
    scores: da.Array, out_chunks: tuple[int, ...], *, prep: PreparedCase, activation: str, separate_axis: int | None
) -> da.Array:
    return undo_preprocessing(
        scores,
        shape_after_crop_zyx=prep.shape_after_crop_zyx,
        crop_bbox_zyx=prep.crop_bbox_zyx,
        original_shape_zyx=prep.original_geometry.shape_zyx,
        activation=activation,
        separate_axis=separate_axis,
        out_chunks_zyx=out_chunks,
    )


@dataclass
class Ensemble:
    """The folds (networks) of one configuration, averaged tile by tile: a prediction model.

    A cascade's second stage (``configuration.previous_stage`` set) takes the first stage's label
    map as extra one-hot input channels (one per :func:`~voxflow.models.previous_stage_labels`
    value): ``previous_stage`` is the first stage's Ensemble, predicted by the engine before this
    one; or ``previous_source``, a prediction store already holding that label map per case, or a
    store per case id (the first stage's cross-validation predictions, for validation and model
    selection).
    """

    configuration: Configuration
    dataset: DatasetMeta
    networks: list[Any]
    names: list[str]
    previous_stage: Ensemble | None = field(default=None)
    previous_source: Path | Mapping[str, Path] | None = field(default=None)

    def __post_init__(self) -> None:
        from voxflow.models import LabelSpec

        spec = LabelSpec.from_meta(self.dataset)
        order = self.dataset.regions_class_order
        if spec.uses_regions and (order is None or len(order) != spec.num_outputs):
            raise VoxflowError(
                f"a region-based dataset needs regions_class_order with one value per region "
                f"({spec.num_outputs}); got {order!r}. Fix dataset.json."
            )
        self._outputs = (
            spec.num_outputs,
            "sigmoid" if spec.uses_regions else "softmax",
            tuple(order) if spec.uses_regions and order is not None else None,
        )

    @property
    def name(self) -> str:
        return self.configuration.name

    @property
    def n_outputs(self) -> int:
        return self._outputs[0]

    @property
    def activation(self) -> str:
        return self._outputs[1]

    @property
    def regions_class_order(self) -> tuple[int, ...] | None:
        return self._outputs[2]

    @property
    def patch_size_vox(self) -> tuple[int, int, int]:
        return self.configuration.patch_size_vox

    @property
    def n_channels(self) -> int:
        return self.configuration.n_channels

    @property
    def record(self) -> Mapping[str, Any]:
        if self.configuration.previous_stage is None:
            return {}
        src = self.previous_stage.names if self.previous_stage is not None else str(self.previous_source)
        return {"previous_stage": {"configuration": self.configuration.previous_stage, "from": src}}

    @property
    def previous_labels(self) -> tuple[int, ...]:
        """Label values given to the network as one-hot channels after the image (empty: single stage)."""
        if self.configuration.previous_stage is None:
            return ()
        from voxflow.models import previous_stage_labels

        return previous_stage_labels(self.dataset)

    def batch_size(self, requested: int | None) -> int:
        cfg = self.configuration
        return requested or (cfg.batch_size if cfg.is_2d else 1)

    def importance_map(self) -> np.ndarray | None:
        return None

    def check_input(self, store: Store) -> None:
        """Any store: a raw one is preprocessed per case, a preprocessed one must match (checked per case)."""

    def prepare(
        self, store: Store, case_id: str, *, out_chunks: Sequence[int], previous: Mapping[str, da.Array]
    ) -> CaseInput:
        cfg = self.configuration
        prep = prepare_case(store, case_id, cfg, out_chunks=out_chunks)
        sep = cfg.resampling.separate_axis if cfg.resampling.separate_z else None
        image = prep.image
        if cfg.previous_stage is not None:
            image = _with_previous(
                image, self._previous_label(store, case_id, previous), prep, cfg, self.previous_labels
            )
        return CaseInput(
            image, prep.original_geometry, partial(_restore, prep=prep, activation=self.activation, separate_axis=sep)
        )

    def _previous_label(self, store: Store, case_id: str, previous: Mapping[str, da.Array]) -> da.Array:
        """The first stage's label map of the case on its original grid (Z, Y, X), lazy."""
        name = str(self.configuration.previous_stage)
        if name in previous:
            return previous[name]
        if self.previous_source is not None:
            path = self.previous_source if isinstance(self.previous_source, Path) else self.previous_source.get(case_id)
            label = _stored_label(path, case_id)
            if label is None:
                raise IncompleteStoreError(
                    f"the {name} segmentation of case {case_id!r} must be in {path} to predict "
                    f"{self.name}; it is not. Validate the {name} fold that holds the case (`voxflow train WORK "
                    f"-c {name} -f K` predicts its validation cases at the end)."
                )
            return label
        raise VoxflowError(
            f"{self.name} is a cascade's second stage and needs the {name} segmentation of case {case_id!r}; "
            f"none was given. Predict with the model directory (`voxflow predict -m WORK/runs/{self.name}`), "
            f"which runs {name} first."
        )

    def tile_predictor(self, *, device: str, tta: bool, amp: bool) -> TileScorer:
        from voxflow.infer._memory import forward_bytes_per_voxel
        from voxflow.infer._predictor import TilePredictor

        cfg = self.configuration
        mirror = [a for a in cfg.train.mirror_axes if cfg.patch_size_vox[a] > 1] if tta else []
        return TilePredictor(
            self.networks,
            mirror_axes=mirror,
            activation=self.activation,
            spatial_dims=cfg.network.spatial_dims,
            device=device,
            amp=amp,
            voxel_bytes=forward_bytes_per_voxel(
                cfg.network, cfg.patch_size_vox, cfg.n_channels + len(self.previous_labels), self.n_outputs
            ),
            divisor_zyx=_divisor_zyx(cfg.network.total_stride),
        )


def _divisor_zyx(total_stride: Sequence[int]) -> tuple[int, int, int]:
    """A network's input divisibility as (z, y, x) (a 2-D network's z: 1)."""
    d = tuple(int(s) for s in total_stride)
    return (1, d[0], d[1]) if len(d) == 2 else (d[0], d[1], d[2])


def _stored_label(path: Path | None, case_id: str) -> da.Array | None:
    """The un-postprocessed label map of a case in a prediction store, or None."""
    if path is None or not (path / "zarr.json").is_file():
        return None
    src = Store.open(path)
    if not src.is_complete(case_id):
        return None
    return src.array(case_id, "label_raw") if src.has_array(case_id, "label_raw") else src.label(case_id)


def _with_previous(
    image: da.Array, label: da.Array, prep: PreparedCase, cfg: Configuration, values: Sequence[int]
) -> da.Array:
    """``image`` (C, z, y, x) with the one-hot channels of ``label`` (original grid) appended, on
    the image's grid and chunks."""
    from voxflow.preprocess import one_hot_channels, previous_onto_grid

    if tuple(label.shape) != prep.original_geometry.shape_zyx:
        raise VoxflowError(
            f"the previous-stage segmentation must lie on the case's grid "
            f"{prep.original_geometry.shape_zyx}; got shape {tuple(label.shape)}."
        )
    spatial_chunks = tuple(c[0] for c in image.chunks[1:])
    onto = previous_onto_grid(
        label,
        cfg,
        crop_bbox_zyx=prep.crop_bbox_zyx,  # type: ignore[arg-type]
        out_shape_zyx=image.shape[1:],
        values=values,
        out_chunks=spatial_chunks,
    )
    onto = onto.rechunk(image.chunks[1:])
    return da.concatenate([image, one_hot_channels(onto, values)], axis=0).rechunk({0: image.shape[0] + len(values)})


def group_models(
    models: Sequence[tuple[Any, Configuration, DatasetMeta]], names: Sequence[str] | None = None
) -> list[Ensemble]:
    """Group ``(network, configuration, dataset)`` triples by configuration; all must share labels."""
    groups: dict[str, Ensemble] = {}
    for i, (net, cfg, meta) in enumerate(models):
        name = names[i] if names else f"{cfg.name}/model_{i}"
        ens = groups.get(cfg.name)
        if ens is None:
            groups[cfg.name] = Ensemble(cfg, meta, [net], [name])
            continue
        if cfg != ens.configuration:
            raise VoxflowError(f"models of configuration {cfg.name!r} must share one plan; {name} differs.")
        ens.networks.append(net)
        ens.names.append(name)
    return list(groups.values())


@dataclass(frozen=True)
class CheckpointLoader:
    """Loads the final checkpoints of fold dirs on a device, grouped into ensembles (picklable)."""

    folds: tuple[Path, ...]

    def __call__(self, device: str) -> list[Ensemble]:
        from voxflow.models import load_model

        runs = [FoldDir(p) for p in self.folds]
        models = [load_model(r.checkpoint_final, device=device) for r in runs]
        ensembles = group_models(models, [f"{r.configuration.name}/{r.path.name}" for r in runs])
        for ens in ensembles:
            if ens.configuration.previous_stage is not None:
                mine = [r for r in runs if r.configuration.name == ens.name]
                ens.previous_stage = _previous_stage(mine, ens.configuration.previous_stage, device)
        return ensembles


def previous_stage_folds(runs: Sequence[FoldDir], previous: str) -> list[FoldDir]:
    """The first-stage folds of a cascade's folds ``runs``: the same fold names in the sibling
    configuration directory ``previous`` (``WORK/runs/3d_lowres`` beside ``WORK/runs/3d_cascade_fullres``)."""
    cdir = ConfigurationDir(runs[0].configuration.path.parent / previous)
    out = [cdir.fold(r.fold) for r in runs]
    missing = [f.fold for f in out if not f.checkpoint_final.is_file()]
    if missing:
        raise IncompleteStoreError(
            f"the cascade {runs[0].configuration.name} needs its first stage {previous} with the same folds; "
            f"{cdir.path} lacks fold(s) {missing} ({CHECKPOINT_FINAL}). Train them (`voxflow train WORK -c "
            f"{previous} -f K`) or export both stages (`voxflow export-model`)."
        )
    return out


def _previous_stage(runs: Sequence[FoldDir], previous: str, device: str) -> Ensemble:
    loader = CheckpointLoader(tuple(r.path for r in previous_stage_folds(runs, previous)))
    (ens,) = loader(device)
    return ens
