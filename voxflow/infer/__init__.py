"""Inference: tile grid, Gaussian importance map, tiled Zarr accumulation, TTA, ensembles, export.

``sliding_window_predict`` predicts one (C, Z, Y, X) volume with memory bounded by the tiles in
flight; ``predict`` runs whole cases end to end (preprocess, predict, undo preprocessing, write a
prediction store and export files).
"""

from voxflow.infer._accumulator import TileAccumulator
from voxflow.infer._gaussian import gaussian_importance_map
from voxflow.infer._tiling import TileGrid, tile_grid, tile_starts
from voxflow.infer._undo import probabilities_to_label, undo_preprocessing

__all__ = [
    "TileAccumulator",
    "TileGrid",
    "PredictOptions",
    "TilePredictor",
    "gaussian_importance_map",
    "mirror_combinations",
    "predict",
    "probabilities_to_label",
    "sliding_window_predict",
    "sliding_window_predict_in_memory",
    "tile_grid",
    "tile_starts",
    "undo_preprocessing",
]


def __getattr__(name: str):  # torch is imported only when a predictor is needed
    if name in ("TilePredictor", "mirror_combinations"):
        from voxflow.infer import _predictor

        return getattr(_predictor, name)
    if name in ("sliding_window_predict", "sliding_window_predict_in_memory", "read_tile"):
        from voxflow.infer import _sliding

        return getattr(_sliding, name)
    if name in ("predict", "PredictOptions"):
        from voxflow.infer import _predict

        return getattr(_predict, name)
    raise AttributeError(f"module 'voxflow.infer' has no attribute {name!r}")
