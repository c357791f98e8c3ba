"""Run trained nnU-Net v2 models with voxflow's out-of-core predictor.

``load_nnunet_model(RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG)`` translates ``plans.json`` and
``dataset.json`` into a voxflow :class:`~voxflow.plan.schema.Configuration` +
:class:`~voxflow.store.DatasetMeta` and builds one network per fold whose state dict loads the
checkpoint unchanged; ``predict_nnunet`` segments images with it as nnU-Net's predictor would, tile
by tile with bounded memory. A ``3d_cascade_fullres`` folder loads its ``3d_lowres`` folder too
and predicts in two stages, the low-resolution segmentation entering as one-hot channels
(:func:`previous_stage_onehot`). The networks need the optional extra ``voxflow[nnunet]``.
"""

from voxflow.nnunet._cascade import previous_stage_onehot
from voxflow.nnunet._model import (
    NnunetModel,
    build_network,
    instance_norm_as_group_norm,
    load_nnunet_model,
    previous_stage_folder,
)
from voxflow.nnunet._predict import NnunetPredictionModel, NnunetTilePredictor, predict_nnunet
from voxflow.nnunet._translate import (
    NnunetModelError,
    NnunetSpec,
    case_configuration,
    dataset_meta,
    foreground_labels,
    resolve_configuration,
    separate_z_axis,
    translate_configuration,
)

__all__ = [
    "NnunetModel",
    "NnunetModelError",
    "NnunetPredictionModel",
    "NnunetSpec",
    "NnunetTilePredictor",
    "build_network",
    "instance_norm_as_group_norm",
    "case_configuration",
    "dataset_meta",
    "foreground_labels",
    "load_nnunet_model",
    "predict_nnunet",
    "previous_stage_folder",
    "previous_stage_onehot",
    "resolve_configuration",
    "separate_z_axis",
    "translate_configuration",
]
