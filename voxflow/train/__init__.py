"""Training: losses, schedules, checkpoints, splits, DDP and the fold trainer.

``train_fold(work, "3d_fullres", 0)`` trains one fold from a workspace (plans.json + preprocessed
store); ``load_model(run_dir / "checkpoint_final.pt")`` gives back (network in eval mode,
Configuration, DatasetMeta).
"""

from voxflow.models import LabelSpec, load_model  # re-exported: they moved to voxflow.models
from voxflow.train.losses import DeepSupervisionLoss, SegmentationLoss, deep_supervision_weights, soft_dice
from voxflow.train.schedules import build_optimizer, lr_at
from voxflow.train.splits import fold_cases, load_or_create_splits, make_splits
from voxflow.train.trainer import TrainState, train_fold

__all__ = [
    "DeepSupervisionLoss",
    "LabelSpec",
    "SegmentationLoss",
    "TrainState",
    "build_optimizer",
    "deep_supervision_weights",
    "fold_cases",
    "load_model",
    "load_or_create_splits",
    "lr_at",
    "make_splits",
    "soft_dice",
    "train_fold",
]
