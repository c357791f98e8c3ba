"""Trained models as values: what a network predicts (:class:`LabelSpec`), checkpoints read back into
networks (:func:`load_model`) and model packages (:func:`export_model` / :func:`unpack_model`).

Training writes models, prediction reads them; both import this package, so prediction needs
neither :mod:`voxflow.train` nor :mod:`voxflow.pipeline`. torch is imported on first use of the
checkpoint functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from voxflow.models._labels import LabelSpec, previous_stage_labels
from voxflow.models._package import (
    MODEL_FORMAT,
    export_model,
    is_model_package,
    package_configurations,
    unpack_model,
)

if TYPE_CHECKING:
    from voxflow.models._checkpoint import (
        FORMAT,
        fit_state_dict,
        load_checkpoint,
        load_model,
        strip_state_dict,
    )

__all__ = [
    "FORMAT",
    "MODEL_FORMAT",
    "LabelSpec",
    "export_model",
    "fit_state_dict",
    "is_model_package",
    "load_checkpoint",
    "load_model",
    "package_configurations",
    "previous_stage_labels",
    "strip_state_dict",
    "unpack_model",
]

_LAZY = {"FORMAT", "fit_state_dict", "load_checkpoint", "load_model", "strip_state_dict"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from voxflow.models import _checkpoint

        return getattr(_checkpoint, name)
    raise AttributeError(f"module 'voxflow.models' has no attribute {name!r}")
