"""What a model kind gives the case pipeline (:mod:`voxflow.infer._engine`): a
:class:`PredictionModel` -- how to preprocess a case (a :class:`CaseInput`), a tile predictor
(:class:`TileScorer`: a batch of tiles in, scores out) and how to undo -- and a picklable
:data:`ModelLoader` for one process per device.

Seams for what builds on the engine: the tile predictor sees whole batches (mixed precision, batched
TTA go there); ``prepare`` receives ``previous`` stage outputs (a cascade's low-resolution
segmentation); ``restore`` owns the way back to the original grid (other output formats start from
its probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dask.array as da
import numpy as np

from voxflow.geometry import Geometry
from voxflow.store import DatasetMeta, Store

__all__ = ["CaseInput", "ModelLoader", "PredictionModel", "Restore", "TileScorer"]


class TileScorer(Protocol):
    """A batch of (B, C, *patch) float32 tiles in, (B, K, *patch) float32 scores out (a torch tensor or
    numpy array): probabilities or logits, as the model's :attr:`CaseInput.restore` expects.

    Optional: a true ``fresh_output`` attribute says the scores are new on every call (never a buffer
    the scorer keeps), so the sliding window weights them in place (:class:`~voxflow.infer.TilePredictor`
    has it); without it they are copied."""

    def __call__(self, tiles: np.ndarray) -> Any: ...


Restore = Callable[[da.Array, tuple[int, ...]], da.Array]


@dataclass(frozen=True)
class CaseInput:
    """One case on a model's grid.

    ``image``: (C, z, y, x) float32, lazy; ``geometry``: the case's original geometry; ``restore``:
    maps the accumulated tile scores (K, z, y, x) (lazy) and the output chunks (z, y, x) to
    probabilities (K, Z, Y, X) on the original grid, lazy and chunked ``(K, *out_chunks)``.
    """

    image: da.Array
    geometry: Geometry
    restore: Restore


class PredictionModel(Protocol):
    """What the case pipeline needs from a model: how to preprocess, a tile predictor, how to undo.

    ``name`` is recorded as the configuration, ``names`` as the models (e.g. its folds); ``dataset``
    gives the labels of the prediction; ``regions_class_order`` (None: argmax) turns region
    probabilities into labels; ``record`` holds extra attributes written with every prediction.

    Optional: a ``previous_stage`` attribute (a :class:`PredictionModel`, or None) makes the model the
    second stage of a cascade: the engine predicts that model first and passes its label map of the
    case -- uint8 (Z, Y, X) on the original grid, lazy, exactly what it would write alone without
    postprocessing -- as ``prepare(previous={previous_stage.name: label})``.
    """

    @property
    def name(self) -> str: ...

    @property
    def names(self) -> list[str]: ...

    @property
    def dataset(self) -> DatasetMeta: ...

    @property
    def n_outputs(self) -> int: ...

    @property
    def activation(self) -> str: ...

    @property
    def regions_class_order(self) -> tuple[int, ...] | None: ...

    @property
    def patch_size_vox(self) -> tuple[int, int, int]: ...

    @property
    def n_channels(self) -> int: ...

    @property
    def record(self) -> Mapping[str, Any]: ...

    def batch_size(self, requested: int | None) -> int:
        """Tiles per forward pass (``requested`` if given)."""
        ...

    def importance_map(self) -> np.ndarray | None:
        """Tile weights of the patch shape, or None for :func:`~voxflow.infer.gaussian_importance_map`."""
        ...

    def check_input(self, store: Store) -> None:
        """Raise a :class:`VoxflowError` if the model cannot predict from this input store."""
        ...

    def prepare(
        self, store: Store, case_id: str, *, out_chunks: Sequence[int], previous: Mapping[str, da.Array]
    ) -> CaseInput:
        """The case on the model's grid (lazy, dask chunks ``out_chunks``; small computes allowed).

        ``previous``: outputs of earlier stages for this case by stage name (e.g. a cascade's
        low-resolution segmentation); empty for single-stage models."""
        ...

    def tile_predictor(self, *, device: str, tta: bool, amp: bool) -> TileScorer:
        """The tile predictor on ``device`` (mirroring when ``tta``). A
        :class:`~voxflow.infer.TilePredictor` gets the run's precision and forward-pass memory from
        the engine (:meth:`~voxflow.infer.TilePredictor.configure`)."""
        ...


ModelLoader = Callable[[str], Sequence[PredictionModel]]
"""Loads the models on a device (``"cuda:1"``); picklable, so that each device's process loads its own."""
