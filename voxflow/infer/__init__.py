"""Inference: tile grid, Gaussian importance map, tiled Zarr accumulation, TTA, ensembles, export.

``sliding_window_predict`` predicts one (C, Z, Y, X) volume with memory bounded by the tiles in
flight; ``predict`` runs whole cases end to end (preprocess, predict, undo preprocessing, write a
prediction store and export files). Every model kind -- voxflow's folds, nnU-Net model folders --
plugs into the same case pipeline (``run_prediction``) as a :class:`PredictionModel`: how to
preprocess (giving a :class:`CaseInput`), a tile predictor, how to undo. torch is imported on first
use of a predictor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from voxflow.infer._accumulator import TileAccumulator, order_tiles
from voxflow.infer._blocks import duplicated_tile_overhead
from voxflow.infer._chunks import read_chunks
from voxflow.infer._engine import STAGES_DIR, STORE_NAME, previous_stage, run_prediction, stage_chain
from voxflow.infer._gaussian import gaussian_importance_map
from voxflow.infer._inputs import describe_case
from voxflow.infer._memory import DEFAULT_FORWARD_BYTES, forward_bytes_per_voxel, release_large_allocations
from voxflow.infer._models import Ensemble
from voxflow.infer._options import PredictOptions, resolve_postprocessing
from voxflow.infer._protocols import CaseInput, ModelLoader, PredictionModel, TileScorer
from voxflow.infer._tiling import TileGrid, tile_grid, tile_starts
from voxflow.infer._undo import background_probabilities, probabilities_to_label, uncrop, undo_preprocessing

if TYPE_CHECKING:
    from voxflow.infer._predict import predict
    from voxflow.infer._predictor import TilePredictor, mirror_combinations
    from voxflow.infer._sliding import read_tile, sliding_window_predict, sliding_window_predict_in_memory

__all__ = [
    "DEFAULT_FORWARD_BYTES",
    "STAGES_DIR",
    "STORE_NAME",
    "CaseInput",
    "Ensemble",
    "ModelLoader",
    "PredictOptions",
    "PredictionModel",
    "TileAccumulator",
    "TileGrid",
    "TilePredictor",
    "TileScorer",
    "background_probabilities",
    "describe_case",
    "duplicated_tile_overhead",
    "forward_bytes_per_voxel",
    "gaussian_importance_map",
    "mirror_combinations",
    "order_tiles",
    "predict",
    "previous_stage",
    "probabilities_to_label",
    "read_chunks",
    "read_tile",
    "release_large_allocations",
    "resolve_postprocessing",
    "run_prediction",
    "sliding_window_predict",
    "sliding_window_predict_in_memory",
    "stage_chain",
    "tile_grid",
    "tile_starts",
    "uncrop",
    "undo_preprocessing",
]

_LAZY = {
    "TilePredictor": "_predictor",
    "mirror_combinations": "_predictor",
    "sliding_window_predict": "_sliding",
    "sliding_window_predict_in_memory": "_sliding",
    "read_tile": "_sliding",
    "predict": "_predict",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"voxflow.infer.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'voxflow.infer' has no attribute {name!r}")
