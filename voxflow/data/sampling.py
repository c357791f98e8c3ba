"""Chunk-aware random patch sampling from a preprocessed store, with foreground oversampling.

A patch is read by slicing the case's Zarr arrays directly, so only the chunks that overlap the
patch are fetched and decompressed; nothing else of the volume is touched. Parts of a patch that
lie outside the volume are padded: the image with 0 (the mean after z-score/CT normalisation),
the label with 0 (background). The label is never padded with an ignore value, so the loss treats
padding as background, as nnU-Net does (it pads with -1 and maps -1 to 0 before the loss).

Patch placement follows nnU-Net's data loader. The sampler reads an *enlarged* patch of size ``P``
(room for rotation/scaling, see :func:`voxflow.data.augment.enlarged_patch_size`) around a final
patch of size ``F`` that augmentation later crops from its centre. Its lower corner ``lo`` is drawn
per axis from ``[lb, ub]`` with ``lb = -floor(pad / 2)``, ``ub = Z + ceil(pad / 2) - P`` and
``pad = P - F`` (more when the volume is smaller than the patch), so the final patch lies inside
the volume whenever the volume is at least ``F``. A foreground patch is centred on a voxel drawn
from the case's ``fg_index`` (class chosen uniformly among the classes present), then clipped to
``[lb, ub]`` (the dataset's ``"ignore"`` label, if any, is never a target). Per batch, ``floor(B * p)`` patches plus one more with probability ``frac(B * p)``
are foreground patches (``p = oversample_foreground``): the expected fraction is exactly ``p``.

2D configurations (patch ``(1, Y, X)``) use the same code: a patch is one slice.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxflow.data._cache import ChunkCache, read_box_cached
from voxflow.errors import ConfigError, LayoutError, VoxflowWarning
from voxflow.store import Store

PREVIOUS_ARRAY = "prev_seg"  # a cascade's previous-stage segmentation in the preprocessed store

__all__ = [
    "PREVIOUS_ARRAY",
    "CaseHandle",
    "ChunkCache",
    "PatchBatch",
    "PatchSampler",
    "open_cases",
    "read_patch",
    "stream_rng",
]

log = logging.getLogger(__name__)

_PURPOSES = {"train": 0, "val": 1}


def stream_rng(seed: int, *, rank: int = 0, worker: int = 0, purpose: str = "train") -> np.random.Generator:
    """An independent random stream per (seed, DDP rank, loader worker, purpose).

    Built from ``np.random.SeedSequence(seed, spawn_key=(rank, worker, purpose))``: streams of
    different ranks or workers are statistically independent, and each is reproducible.
    """
    key = (int(rank), int(worker), _PURPOSES[purpose])
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


@dataclass(frozen=True)
class CaseHandle:
    """Open arrays of one preprocessed case.

    ``image`` is the Zarr array (C, Z, Y, X), ``label`` (Z, Y, X) or ``None``; ``fg_index`` the
    (N, 4) int32 rows (class, z, y, x) held in memory (preprocessing bounds N);
    ``fg_classes`` the foreground classes that have at least one row there; ``previous`` the
    cascade's previous-stage segmentation (Z, Y, X) on the same grid, or ``None``.
    """

    case_id: str
    image: Any
    label: Any | None
    fg_index: np.ndarray
    fg_classes: tuple[int, ...]
    previous: Any | None = None

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    def class_rows(self, cls: int) -> np.ndarray:
        return self.fg_index[self.fg_index[:, 0] == cls]


def _open_previous(store: Store, case_id: str, shape_zyx: tuple[int, ...]) -> Any:
    rec = store.case_attrs(case_id).get("previous_stage") or {}
    if not rec.get("complete") or not store.has_array(case_id, PREVIOUS_ARRAY):
        raise LayoutError(
            f"a cascade's second stage trains on the previous stage's cross-validation segmentation; "
            f"case {case_id!r} in {store.path} has none. `voxflow train` writes it from the trained "
            f"and validated 3d_lowres folds (train those first), or run `voxflow run`."
        )
    prev = store.zarr_array(case_id, PREVIOUS_ARRAY)
    if tuple(prev.shape) != shape_zyx:
        raise LayoutError(
            f"{PREVIOUS_ARRAY} shape {tuple(prev.shape)} must equal the image's spatial shape {shape_zyx} "
            f"for case {case_id!r} in {store.path}; it is stale: retrain the cascade fold."
        )
    return prev


def _open_case(store: Store, case_id: str, *, require_label: bool, previous: bool = False) -> CaseHandle:
    image = store.zarr_array(case_id, "image")
    if image.ndim != 4:
        raise LayoutError(
            f"image must be (C, Z, Y, X); got shape {image.shape} for case {case_id!r} "
            f"(store {store.path}). Re-run `voxflow preprocess`."
        )
    label = store.zarr_array(case_id, "label") if store.has_array(case_id, "label") else None
    if label is None and require_label:
        raise LayoutError(
            f"training needs a label for every case; case {case_id!r} in {store.path} has "
            f"none. Remove it from the training cases or preprocess its label."
        )
    if label is not None and tuple(label.shape) != tuple(image.shape[1:]):
        raise LayoutError(
            f"label shape {tuple(label.shape)} must equal the image's spatial shape "
            f"{tuple(image.shape[1:])} for case {case_id!r} in {store.path}."
        )
    if store.has_array(case_id, "fg_index"):
        fg = np.asarray(store.zarr_array(case_id, "fg_index")[...], dtype=np.int64).reshape(-1, 4)
    else:
        fg = np.zeros((0, 4), np.int64)
        if label is not None:
            warnings.warn(
                f"case {case_id!r} in {store.path} has no fg_index; foreground oversampling "
                f"falls back to random patches for it. Re-run `voxflow preprocess`.",
                VoxflowWarning,
                stacklevel=3,
            )
    present = store.case_attrs(case_id).get("classes_present")
    in_index = {int(c) for c in np.unique(fg[:, 0])}
    classes = sorted(in_index if present is None else in_index & {int(c) for c in present})
    ignore = store.meta.labels.get("ignore")  # nnU-Net's ignore label is never a sampling target
    prev = _open_previous(store, case_id, tuple(int(s) for s in image.shape[1:])) if previous else None
    return CaseHandle(case_id, image, label, fg, tuple(c for c in classes if c not in (0, ignore)), prev)


def open_cases(
    store: Store, case_ids: Sequence[str], *, require_label: bool = True, previous: bool = False
) -> list[CaseHandle]:
    """Open the arrays of ``case_ids`` (no voxel data is read; ``fg_index`` is loaded); ``previous``
    also opens each case's previous-stage segmentation (``prev_seg``, a cascade's second stage)."""
    if not case_ids:
        raise LayoutError(f"the loader needs at least one case; got none for store {store.path}.")
    return [_open_case(store, c, require_label=require_label, previous=previous) for c in case_ids]


def read_patch(
    array: Any,
    lo_zyx: Sequence[int],
    size_zyx: Sequence[int],
    *,
    fill: float = 0,
    cache: ChunkCache | None = None,
    key: Hashable = None,
) -> np.ndarray:
    """Read ``array[..., lo:lo+size]`` over the last three axes, padding with ``fill`` outside.

    ``array`` is a Zarr (or numpy) array; ``lo_zyx`` may be negative and ``lo + size`` may pass
    the end. Only the in-bounds part is sliced from ``array``, so Zarr fetches just the chunks
    that overlap it (through ``cache``, keyed by ``key``, when given). Returns a new numpy array
    of shape ``array.shape[:-3] + size_zyx``.
    """
    lead = tuple(array.shape[:-3])
    shape = tuple(int(s) for s in array.shape[-3:])
    out = np.full(lead + tuple(int(s) for s in size_zyx), fill, dtype=array.dtype)
    src, dst = [], []
    for lo, size, n in zip(lo_zyx, size_zyx, shape, strict=True):
        a, b = max(int(lo), 0), min(int(lo) + int(size), n)
        if a >= b:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - int(lo), b - int(lo)))
    head = (slice(None),) * len(lead)
    if cache is not None and hasattr(array, "chunks"):
        out[head + tuple(dst)] = read_box_cached(array, src, cache, key)
    else:
        out[head + tuple(dst)] = array[head + tuple(src)]
    return out


@dataclass(frozen=True)
class PatchBatch:
    """Raw patches of one batch: image (B, C, *P) float32, label (B, *P) uint8 (or ``None``),
    and for each patch its case, lower corner (z, y, x) in voxels and whether it was a foreground draw."""

    image: np.ndarray
    label: np.ndarray | None
    case_ids: tuple[str, ...]
    lo_zyx: np.ndarray
    forced_fg: np.ndarray


class PatchSampler:
    """Draw random patches of size ``patch_size_vox`` (enlarged) around a final ``final_patch_size_vox``.

    Parameters
    ----------
    cases : opened cases (:func:`open_cases`).
    patch_size_vox : (z, y, x) size read from the store (the enlarged patch when augmenting).
    final_patch_size_vox : (z, y, x) size after augmentation's centre crop; defaults to ``patch_size_vox``.
        ``patch_size_vox - final_patch_size_vox`` must be even so that the crop is centred exactly.
    oversample_foreground : expected fraction of foreground-centred patches, in [0, 1].
    rng : the sampler's own random stream (see :func:`stream_rng`).
    cache : optional decoded-chunk cache shared with other samplers of the same cases.
    """

    def __init__(
        self,
        cases: Sequence[CaseHandle],
        patch_size_vox: Sequence[int],
        *,
        final_patch_size_vox: Sequence[int] | None = None,
        oversample_foreground: float = 1 / 3,
        rng: np.random.Generator,
        cache: ChunkCache | None = None,
    ) -> None:
        self.cases = list(cases)
        self.cache = cache
        self.patch = np.asarray(patch_size_vox, dtype=np.int64)
        self.final = np.asarray(
            final_patch_size_vox if final_patch_size_vox is not None else patch_size_vox, dtype=np.int64
        )
        if (
            self.patch.shape != (3,)
            or self.final.shape != (3,)
            or (self.patch < self.final).any()
            or ((self.patch - self.final) % 2).any()
            or (self.final < 1).any()
        ):
            raise ConfigError(
                f"patch_size_vox must be 3 sizes >= final_patch_size_vox (each >= 1) with an even "
                f"difference per axis; got {tuple(self.patch)} and {tuple(self.final)}. Read a "
                f"patch of final + 2 * margin voxels per axis (enlarged_patch_size does this)."
            )
        if not 0.0 <= oversample_foreground <= 1.0:
            raise ConfigError(
                f"oversample_foreground must be a fraction in [0, 1]; got {oversample_foreground!r}. "
                f"Use e.g. 0.33 (nnU-Net's default: a third of the patches centred on foreground)."
            )
        self.oversample_foreground = float(oversample_foreground)
        self.rng = rng

    def bounds(self, shape_zyx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive range ``[lb, ub]`` of the patch's lower corner per axis (nnU-Net's rule)."""
        shape = np.asarray(shape_zyx, dtype=np.int64)
        pad = self.patch - self.final
        pad = np.where(shape + pad < self.patch, self.patch - shape, pad)
        lb = -(pad // 2)
        ub = shape + pad // 2 + pad % 2 - self.patch
        return lb, ub

    def n_foreground(self, batch_size: int) -> int:
        """How many patches of the next batch are foreground draws (expected ``batch_size * p``)."""
        expected = batch_size * self.oversample_foreground
        base = int(np.floor(expected))
        return base + int(self.rng.random() < expected - base)

    def draw_corner(self, case: CaseHandle, *, foreground: bool) -> np.ndarray:
        """Lower corner (z, y, x) of one patch in ``case``; centred on a foreground voxel if asked
        and the case has one, else uniform in the allowed range."""
        lb, ub = self.bounds(case.shape_zyx)
        if foreground and case.fg_classes:
            cls = case.fg_classes[int(self.rng.integers(len(case.fg_classes)))]
            rows = case.class_rows(cls)
            voxel = rows[int(self.rng.integers(len(rows))), 1:]
            return np.clip(voxel - self.patch // 2, lb, ub)
        return np.array([self.rng.integers(a, b + 1) for a, b in zip(lb, ub, strict=True)], dtype=np.int64)

    def draw(self, batch_size: int) -> tuple[list[CaseHandle], np.ndarray, np.ndarray]:
        """Choose cases and patch corners of one batch without reading: (cases, lo_zyx (B, 3),
        forced_fg (B,)); the last ``n_foreground`` patches are foreground draws."""
        n_fg = self.n_foreground(batch_size)
        forced = np.arange(batch_size) >= batch_size - n_fg
        picks = self.rng.integers(len(self.cases), size=batch_size)
        cases = [self.cases[int(i)] for i in picks]
        corners = (
            np.stack([self.draw_corner(c, foreground=bool(f)) for c, f in zip(cases, forced, strict=True)])
            if batch_size
            else np.zeros((0, 3), np.int64)
        )
        return cases, corners, forced

    def read(
        self, case: CaseHandle, lo_zyx: np.ndarray, size_zyx: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Image (C, *size) float32 and label (*size) uint8 of the box of ``size_zyx`` centred in the
        patch at ``lo_zyx`` (default: the whole patch). ``patch - size`` must be even. A case with a
        previous-stage segmentation gives the label as (2, *size): reference, previous stage."""
        size = self.patch if size_zyx is None else np.asarray(size_zyx, dtype=np.int64)
        lo = np.asarray(lo_zyx) + (self.patch - size) // 2
        shape = tuple(int(v) for v in size)
        image = read_patch(case.image, lo, shape, cache=self.cache, key=(case.case_id, "image"))
        label = (
            None
            if case.label is None
            else read_patch(case.label, lo, shape, cache=self.cache, key=(case.case_id, "label")).astype(
                np.uint8, copy=False
            )
        )
        image = image.astype(np.float32, copy=False)
        if label is not None and case.previous is not None:
            prev = read_patch(case.previous, lo, shape, cache=self.cache, key=(case.case_id, PREVIOUS_ARRAY))
            label = np.stack([label, prev.astype(np.uint8, copy=False)])
        return image, label

    def sample(self, batch_size: int) -> PatchBatch:
        """Draw and read one batch of whole patches."""
        cases, corners, forced = self.draw(batch_size)
        reads = [self.read(c, lo) for c, lo in zip(cases, corners, strict=True)]
        labels = [r[1] for r in reads]
        label = np.stack(labels) if all(lab is not None for lab in labels) else None  # type: ignore[arg-type]
        return PatchBatch(np.stack([r[0] for r in reads]), label, tuple(c.case_id for c in cases), corners, forced)
