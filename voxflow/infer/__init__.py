"""Inference: tile grid, Gaussian importance map, tiled Zarr accumulation, TTA, ensembles, export.

``sliding_window_predict`` predicts one (C, Z, Y, X) volume with memory bounded by the tiles in
flight; ``predict`` runs whole cases end to end (preprocess, predict, undo preprocessing, write a
prediction store and export files). torch is imported on first use of a predictor.
"""

from __future__ import annotations

from typing import Any

from voxflow.infer._accumulator import TileAccumulator, order_tiles
from voxflow.infer._gaussian import gaussian_importance_map
from voxflow.infer._memory import release_large_allocations
from voxflow.infer._tiling import TileGrid, tile_grid, tile_starts
from voxflow.infer._undo import probabilities_to_label, uncrop, undo_preprocessing

__all__ = [
    "PredictOptions",
    "TileAccumulator",
    "TileGrid",
    "TilePredictor",
    "gaussian_importance_map",
    "mirror_combinations",
    "order_tiles",
    "predict",
    "probabilities_to_label",
    "read_tile",
    "release_large_allocations",
    "sliding_window_predict",
    "sliding_window_predict_in_memory",
    "tile_grid",
    "tile_starts",
    "uncrop",
    "undo_preprocessing",
]

_LAZY = {
    "TilePredictor": "_predictor", "mirror_combinations": "_predictor",
    "sliding_window_predict": "_sliding", "sliding_window_predict_in_memory": "_sliding", "read_tile": "_sliding",
    "predict": "_predict", "PredictOptions": "_predict",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"voxflow.infer.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'voxflow.infer' has no attribute {name!r}")
