"""The whole workflow: `voxflow run`, the demo and best-configuration selection (model packaging,
re-exported here, lives in :mod:`voxflow.models`)."""

from voxflow.models import export_model, is_model_package, unpack_model
from voxflow.pipeline._workflow import RunOptions, find_best_configuration, run_workflow

__all__ = [
    "RunOptions",
    "export_model",
    "find_best_configuration",
    "is_model_package",
    "run_workflow",
    "unpack_model",
]
