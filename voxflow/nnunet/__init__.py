"""Run trained nnU-Net v2 models with voxflow's out-of-core predictor.

``load_nnunet_model(RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG)`` translates ``plans.json`` and
``dataset.json`` into a voxflow :class:`~voxflow.plan.schema.Configuration` +
:class:`~voxflow.store.DatasetMeta` and builds one network per fold whose state dict loads the
checkpoint unchanged; ``predict_nnunet`` segments images with it as nnU-Net's predictor would, tile
by tile with bounded memory. The networks need the optional extra ``voxflow[nnunet]``.
"""

from voxflow.nnunet._model import NnunetModel, build_network, instance_norm_as_group_norm, load_nnunet_model
from voxflow.nnunet._predict import NnunetTilePredictor, predict_nnunet
from voxflow.nnunet._translate import (
    NnunetModelError,
    NnunetSpec,
    case_configuration,
    dataset_meta,
    resolve_configuration,
    separate_z_axis,
    translate_configuration,
)

__all__ = [
    "NnunetModel",
    "NnunetModelError",
    "NnunetSpec",
    "NnunetTilePredictor",
    "build_network",
    "instance_norm_as_group_norm",
    "case_configuration",
    "dataset_meta",
    "load_nnunet_model",
    "predict_nnunet",
    "resolve_configuration",
    "separate_z_axis",
    "translate_configuration",
]
