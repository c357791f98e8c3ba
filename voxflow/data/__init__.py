"""Training data path: chunk-aware patch sampling, batched torch augmentation, streaming loaders.

``build_loader(store, case_ids, config)`` is the entry point used by the trainer; the pieces
(:class:`PatchSampler`, :func:`sample_params` / :func:`apply`) are public for tests, notebooks
and other loaders.
"""

from voxflow.data._previous import PreviousParams, perturb_sample
from voxflow.data.augment import AugmentConfig, Params, apply, enlarged_patch_size, sample_params
from voxflow.data.loader import Batch, BatchLoader, LoaderSpec, build_loader, loader_spec
from voxflow.data.sampling import (
    PREVIOUS_ARRAY,
    CaseHandle,
    ChunkCache,
    PatchBatch,
    PatchSampler,
    open_cases,
    read_patch,
    stream_rng,
)

__all__ = [
    "PREVIOUS_ARRAY",
    "AugmentConfig",
    "Batch",
    "BatchLoader",
    "CaseHandle",
    "ChunkCache",
    "LoaderSpec",
    "Params",
    "PatchBatch",
    "PatchSampler",
    "PreviousParams",
    "apply",
    "build_loader",
    "enlarged_patch_size",
    "loader_spec",
    "perturb_sample",
    "open_cases",
    "read_patch",
    "sample_params",
    "stream_rng",
]
