"""Training data of a cascade's second stage: every case's first-stage segmentation from cross-validation.

nnU-Net's ``predicted_next_stage``: each ``3d_lowres`` fold predicts its own validation cases at
the end of training (``runs/3d_lowres/fold_<k>/validation/prediction.zarr``, label maps on the
original grid), so every training case has a low-resolution segmentation from a model that did
not train on it. :func:`ensure_previous_stage` brings each onto the ``3d_cascade_fullres`` grid --
the crop and label resampling of preprocessing (:func:`voxflow.preprocess.previous_onto_grid`),
lazily, chunk by chunk -- and stores it as ``prev_seg`` (Z, Y, X) uint8 beside ``image`` and
``label`` in the cascade's preprocessed store. The case attribute ``previous_stage``
(``{"configuration", "fold", "complete"}``) is written after the array: a case without it (a
write cut short) is written again.

nnU-Net resamples the first stage's *probabilities* to the next grid for training and the
exported *label map* at inference; voxflow uses the label map for both, so the second stage is
trained on exactly what it receives at prediction time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np

from voxflow.data import PREVIOUS_ARRAY
from voxflow.errors import IncompleteStoreError
from voxflow.plan.schema import Configuration
from voxflow.store import Store
from voxflow.workspace import Workspace

__all__ = ["ensure_previous_stage", "previous_fold_of_cases"]

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


def _has_previous(store: Store, case_id: str, fold: str, previous: str) -> bool:
    rec = store.case_attrs(case_id).get("previous_stage") or {}
    return (
        bool(rec.get("complete"))
        and rec.get("fold") == fold
        and rec.get("configuration") == previous
        and store.has_array(case_id, PREVIOUS_ARRAY)
    )


def _previous_label(work: Workspace, previous: str, fold: str, case_id: str, configuration: str) -> da.Array:
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
    name = "label_raw" if src.has_array(case_id, "label_raw") else "label"
    return src.array(case_id, name)


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
    lacks it (or took it from another fold); returns the cases written. Errors name the command
    that makes a missing first-stage fold or validation."""
    from voxflow.cluster import compute, scheduler_context
    from voxflow.models import previous_stage_labels

    previous = str(config.previous_stage)
    store = Store.open(work.preprocessed(config.name), mode="r+")
    values = previous_stage_labels(store.meta)
    fold_of = previous_fold_of_cases(splits, case_ids, previous=previous, configuration=config.name)
    todo = [c for c in case_ids if not _has_previous(store, c, fold_of[c], previous)]
    labels = {c: _previous_label(work, previous, fold_of[c], c, config.name) for c in todo}  # check all first
    with scheduler_context(scheduler):
        for c in todo:
            store.update_case_attrs(c, previous_stage=None)
            compute(_write_one(store, c, labels[c], config, values), desc=f"previous stage {c}", progress=False)
            store.update_case_attrs(
                c,
                previous_stage={
                    "configuration": previous,
                    "fold": fold_of[c],
                    "labels": list(values),
                    "complete": True,
                },
            )
    if todo:
        log.info(
            "%s: wrote the %s cross-validation segmentation of %d case(s) into %s",
            config.name,
            previous,
            len(todo),
            store.path,
        )
    return todo
