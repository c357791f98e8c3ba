"""Training data of a cascade's second stage: every case's first-stage segmentation from cross-validation.

nnU-Net's ``predicted_next_stage``: each ``3d_lowres`` fold predicts its own validation cases at
the end of training (``runs/3d_lowres/fold_<k>/validation/prediction.zarr``, label maps on the
original grid), so every training case has a low-resolution segmentation from a model that did
not train on it. :func:`ensure_previous_stage` brings each onto the ``3d_cascade_fullres`` grid --
the crop and label resampling of preprocessing (:func:`voxflow.preprocess.previous_onto_grid`),
lazily, chunk by chunk -- and stores it as ``prev_seg`` (Z, Y, X) uint8 beside ``image`` and
``label`` in the cascade's preprocessed store. The case attribute ``previous_stage``
(``{"configuration", "fold", "labels", "source", "complete"}``) is written after the array: a case
without it (a write cut short) is written again.

Stale segmentations: ``source`` records which stored prediction ``prev_seg`` was made from
(``{"array", "digest"}``, :func:`array_digest`: a hash of the label array's encoded chunk files in
the fold's validation store). Retraining or re-validating a ``3d_lowres`` fold rewrites those
files, so the next preparation finds the digest changed and rewrites exactly the cases whose source
changed, with a log line naming each and why. A content digest rather than the checkpoint's identity
plus a completion stamp: the prediction store has no stamp (its marker is ``complete: true``), and
the checkpoint alone does not fix the prediction (test-time augmentation, a re-validation); hashing
the encoded bytes reads only the compressed label map (no decoding) and is exact. The digest is
taken before the label is read, so a source that changes meanwhile is rewritten on the next run.

nnU-Net resamples the first stage's *probabilities* to the next grid for training and the
exported *label map* at inference; voxflow uses the label map for both, so the second stage is
trained on exactly what it receives at prediction time.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from voxflow.data import PREVIOUS_ARRAY
from voxflow.errors import IncompleteStoreError
from voxflow.plan.schema import Configuration
from voxflow.store import Store
from voxflow.workspace import Workspace

__all__ = [
    "PreviousSource",
    "array_digest",
    "ensure_previous_stage",
    "previous_fold_of_cases",
    "previous_stage_sources",
    "stale_previous_stage",
]

log = logging.getLogger(__name__)


def previous_fold_of_cases(
    splits: Sequence[Mapping[str, Sequence[str]]], case_ids: Sequence[str], *, previous: str, configuration: str
) -> dict[str, str]:
    """The fold whose validation set holds each case (its first-stage segmentation comes from there)."""
    fold_of = {c: str(k) for k, s in enumerate(splits) for c in s["val"]}
    missing = sorted(set(case_ids) - set(fold_of))
    if missing:
        raise IncompleteStoreError(
            f"training {configuration} needs a cross-validation {previous} segmentation of every case; "
            f"{len(missing)} case(s) are in no validation set of splits.json: {missing[:5]}. Add them to a "
            f"fold's 'val' list (or delete splits.json to regenerate it), then train {previous} on that fold."
        )
    return {c: fold_of[c] for c in case_ids}


@dataclass(frozen=True)
class PreviousSource:
    """Where a case's first-stage segmentation comes from, and the identity of what is stored there.

    ``digest``: :func:`array_digest` of ``array`` of the case in ``store`` (the fold's validation
    prediction store)."""

    fold: str
    store: Store
    array: str
    digest: str

    def record(self, previous: str, values: Sequence[int]) -> dict[str, Any]:
        """The ``previous_stage`` case attribute of a ``prev_seg`` written from this source."""
        return {
            "configuration": previous,
            "fold": self.fold,
            "labels": [int(v) for v in values],
            "source": {"array": self.array, "digest": self.digest},
            "complete": True,
        }


def array_digest(store: Store, case_id: str, name: str) -> str:
    """BLAKE2b (128 bit, hex) of array ``name`` of a case as stored: its ``zarr.json`` and every chunk
    file (encoded bytes, in path order).

    Exact and cheap: other content gives other bytes, and reading the encoded chunks of a label map
    costs its compressed size (a small fraction of the voxels; nothing is decoded). The same content
    encoded differently (another codec version) only costs one unneeded rewrite."""
    folder = store.path / "cases" / case_id / name
    if not (folder / "zarr.json").is_file():
        raise IncompleteStoreError(f"case {case_id!r} in {store.path} has no array {name!r} ({folder} is missing).")
    h = hashlib.blake2b(digest_size=16)
    for path in sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.relative_to(folder).parts):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _stale_reason(rec: Mapping[str, Any], source: PreviousSource, previous: str, values: Sequence[int]) -> str | None:
    """Why a case's ``prev_seg`` (its ``previous_stage`` record ``rec``) must be (re)written, or None."""
    if not rec.get("complete"):
        return "none written yet" if not rec else "its last write was cut short"
    if rec.get("configuration") != previous or rec.get("fold") != source.fold:
        return f"it came from {rec.get('configuration')} fold {rec.get('fold')}, not fold {source.fold}"
    if list(rec.get("labels") or []) != [int(v) for v in values]:
        return f"it holds labels {rec.get('labels')}, the dataset has {list(values)}"
    old = rec.get("source") or {}
    if old.get("array") != source.array or old.get("digest") != source.digest:
        return (
            f"{previous} fold {source.fold}'s validation prediction changed since it was written (digest "
            f"{old.get('digest') or 'not recorded'} -> {source.digest}; the fold was retrained or re-validated)"
        )
    return None


def _source(work: Workspace, previous: str, fold: str, case_id: str, configuration: str) -> tuple[Store, str]:
    """The validation store of ``previous`` fold ``fold`` and the name of its label array of the case
    (clear errors naming the command to run when the fold is not trained or not validated)."""
    run = work.fold(previous, fold)
    cmd = f"`voxflow train {work.root} -c {previous} -f {fold}`"
    if not run.checkpoint_final.is_file():
        raise IncompleteStoreError(
            f"training {configuration} needs the {previous} segmentation of case {case_id!r} from {previous} "
            f"fold {fold} (the fold that validates it); that fold is not trained ({run.checkpoint_final} is "
            f"missing). Run {cmd} first (it predicts the fold's validation cases at the end)."
        )
    path = run.validation_predictions
    src = Store.open(path) if (path / "zarr.json").is_file() else None
    if src is None or not src.is_complete(case_id):
        raise IncompleteStoreError(
            f"training {configuration} needs the {previous} segmentation of case {case_id!r} from the validation "
            f"of {previous} fold {fold}; {path} does not hold it. Finish that fold's validation with {cmd[:-1]} "
            f"--resume` (or `voxflow run`)."
        )
    return src, "label_raw" if src.has_array(case_id, "label_raw") else "label"


def previous_stage_sources(
    work: Workspace, config: Configuration, case_ids: Sequence[str], *, splits: Sequence[Mapping[str, Sequence[str]]]
) -> dict[str, tuple[str, Store, str]]:
    """Per case: (fold, validation store, label array name) of its first-stage segmentation. Checks
    every prerequisite (read only, nothing decoded): a missing fold or validation is an error
    naming the command to run."""
    previous = str(config.previous_stage)
    fold_of = previous_fold_of_cases(splits, case_ids, previous=previous, configuration=config.name)
    return {c: (fold_of[c], *_source(work, previous, fold_of[c], c, config.name)) for c in case_ids}


def stale_previous_stage(
    work: Workspace, config: Configuration, case_ids: Sequence[str], *, splits: Sequence[Mapping[str, Sequence[str]]]
) -> dict[str, tuple[PreviousSource, str]]:
    """The cases of ``case_ids`` whose ``prev_seg`` is missing or stale: their source and why (read only)."""
    from voxflow.models import previous_stage_labels

    previous = str(config.previous_stage)
    store = Store.open(work.preprocessed(config.name))
    values = previous_stage_labels(store.meta)
    stale = {}
    for c, (fold, src, name) in previous_stage_sources(work, config, case_ids, splits=splits).items():
        source = PreviousSource(fold, src, name, array_digest(src, c, name))
        rec = store.case_attrs(c).get("previous_stage") or {}
        reason = _stale_reason(rec, source, previous, values)
        if reason is None and not store.has_array(c, PREVIOUS_ARRAY):
            reason = f"its {PREVIOUS_ARRAY} array is missing"
        if reason is not None:
            stale[c] = (source, reason)
    return stale


def _write_one(store: Store, case_id: str, label: da.Array, config: Configuration, values: Sequence[int]) -> Any:
    from voxflow.preprocess import previous_onto_grid

    a = store.case_attrs(case_id)
    image = store.zarr_array(case_id, "image")
    shape = tuple(int(s) for s in image.shape[1:])
    chunks = tuple(
        int(c)
        for c in (store.zarr_array(case_id, "label").chunks if store.has_array(case_id, "label") else image.chunks[1:])
    )
    bbox = tuple((int(lo), int(hi)) for lo, hi in a["crop_bbox_zyx"])
    onto = previous_onto_grid(
        label,
        config,
        crop_bbox_zyx=bbox,  # type: ignore[arg-type]
        out_shape_zyx=shape,
        values=values,  # type: ignore[arg-type]
        out_chunks=chunks,
    ).rechunk(chunks)
    target: Any = store.create_array(
        case_id, PREVIOUS_ARRAY, shape=shape, dtype=np.uint8, chunks=chunks, dimension_names=("z", "y", "x")
    )
    return da.store(onto, target, lock=False, compute=False)  # dask chunks = zarr chunks, no shards


def ensure_previous_stage(
    work: Workspace,
    config: Configuration,
    case_ids: Sequence[str],
    *,
    splits: Sequence[Mapping[str, Sequence[str]]],
    scheduler: str = "threads",
) -> list[str]:
    """Write ``prev_seg`` for every case of ``case_ids`` in ``work.preprocessed(config.name)`` that
    lacks it, took it from another fold, or took it from a validation prediction that has changed
    since (:func:`stale_previous_stage`); returns the cases written. Errors name the command that
    makes a missing first-stage fold or validation. One writer only (under DDP: rank 0)."""
    from voxflow.cluster import compute, scheduler_context
    from voxflow.models import previous_stage_labels

    previous = str(config.previous_stage)
    stale = stale_previous_stage(work, config, case_ids, splits=splits)  # checks every case first
    store = Store.open(work.preprocessed(config.name), mode="r+")
    values = previous_stage_labels(store.meta)
    with scheduler_context(scheduler):
        for c, (source, reason) in stale.items():
            log.info("%s: writing %s of case %s from %s fold %s: %s", config.name, PREVIOUS_ARRAY, c, previous,
                     source.fold, reason)  # fmt: skip
            store.update_case_attrs(c, previous_stage=None)
            label = source.store.array(c, source.array)
            compute(_write_one(store, c, label, config, values), desc=f"previous stage {c}", progress=False)
            store.update_case_attrs(c, previous_stage=source.record(previous, values))
    if stale:
        log.info(
            "%s: wrote the %s cross-validation segmentation of %d case(s) into %s",
            config.name,
            previous,
            len(stale),
            store.path,
        )
    return list(stale)
