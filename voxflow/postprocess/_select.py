"""Choosing postprocessing by cross-validation, as nnU-Net does.

On the validation predictions of all folds (with their references):

1. baseline: mean Dice per target over cases (NaN cases -- both empty -- excluded);
2. with more than one target, try ``keep_largest`` on all foreground together; keep it when the
   mean over targets of the per-target mean Dice improves;
3. then for each target and each candidate operation (``keep_largest``; ``fill_holes`` for single
   classes), on top of what was kept so far: keep it when that target's mean Dice improves.

Each trial is two dask computes over all cases (the operation's summary pass, then the Dice
counts), applied incrementally to the predictions as postprocessed so far.

"Improves" means strictly greater (by more than ``min_gain``); an operation that changes nothing
or hurts is dropped. Every trial is recorded in ``spec.selection``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import dask
import dask.array as da
import numpy as np

from voxflow._types import PathLikeStr
from voxflow.cluster import scheduler_context, stage_bar
from voxflow.errors import IncompleteStoreError
from voxflow.evaluate import (
    Segmentation,
    confusion_matrix,
    nan_to_none,
    open_segmentations,
    overlap_metrics,
    pair_segmentations,
    region_counts,
    resolve_targets,
    target_key,
)
from voxflow.postprocess._spec import Operation, OperationKind, PostprocessingSpec, apply_operation_many
from voxflow.store import Store
from voxflow.workspace import ConfigurationDir, Workspace

__all__ = ["determine_for_configuration", "determine_postprocessing", "load_model_postprocessing", "mean_dice"]

log = logging.getLogger(__name__)
Source = Store | PathLikeStr


def mean_dice(preds: Sequence[da.Array], refs: Sequence[da.Array], targets: list[tuple[int, ...]]) -> dict[str, float]:
    """Mean Dice per target over the (prediction, reference) pairs; one dask compute."""
    n_values = max(max(t) for t in targets) + 2
    computed = dask.compute(*[confusion_matrix(p, r, n_values) for p, r in zip(preds, refs, strict=True)])
    out = {}
    for t in targets:
        d = np.array([overlap_metrics(**region_counts(m, t))["dice"] for m in computed], dtype=float)
        d = d[np.isfinite(d)]
        out[target_key(t)] = float(d.mean()) if d.size else math.nan
    return out


def _mean(scores: Mapping[str, float]) -> float:
    vals = [v for v in scores.values() if math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def _candidates(target: tuple[int, ...], ops: Sequence[str]) -> list[Operation]:
    tgt: Any = target[0] if len(target) == 1 else target
    # an unknown name is refused by Operation (PostprocessingError naming the closest one)
    return [Operation(op=cast(OperationKind, o), target=tgt) for o in ops if o != "fill_holes" or len(target) == 1]


def _gain(after: float, before: float, min_gain: float) -> bool:
    if not math.isfinite(after):
        return False
    return not math.isfinite(before) or after > before + min_gain


def _open_all(sources: Source | Sequence[Source]) -> dict[str, Segmentation]:
    if isinstance(sources, (list, tuple)):
        out: dict[str, Segmentation] = {}
        for s in sources:
            out.update(open_segmentations(s))
        return out
    return open_segmentations(sources)  # type: ignore[arg-type]


def determine_postprocessing(
    predictions: Source | Sequence[Source],
    references: Source,
    *,
    labels: Sequence[Any] | Mapping[str, Any] | None = None,
    connectivity: int = 1,
    candidates: Sequence[str] = ("keep_largest", "fill_holes"),
    min_gain: float = 0.0,
    output: PathLikeStr | None = None,
    scheduler: str = "threads",
    progress: bool = True,
) -> PostprocessingSpec:
    """Choose postprocessing operations on cross-validation predictions (see module docstring).

    ``predictions`` is one store/folder or a list of them (e.g. one per fold); every case needs a
    reference in ``references``. Returns the spec and saves it to ``output`` when given. One progress
    bar over the trials (the baseline included) when ``progress``.
    """
    pairs = pair_segmentations(_open_all(predictions), open_segmentations(references))
    trials: list[dict[str, Any]] = []
    kept: list[Operation] = []
    with scheduler_context(scheduler):
        targets = resolve_targets(labels, references, pairs)
        if not targets:
            log.warning("predictions and references hold only background: no postprocessing to choose")
            return PostprocessingSpec(connectivity=connectivity, selection={"n_cases": len(pairs), "trials": []})
        current = [p.array for p, _ in pairs]
        refs = [r.array for _, r in pairs]
        spacings = [p.geometry.spacing_zyx for p, _ in pairs]
        steps: list[tuple[Operation, str | None]] = []
        if len(targets) > 1 and "keep_largest" in candidates:
            steps.append((Operation(op="keep_largest", target="foreground"), None))
        steps += [(op, target_key(t)) for t in targets for op in _candidates(t, candidates)]
        bar = stage_bar(
            len(steps) + 1, desc=f"postprocessing selection ({len(pairs)} cases)", progress=progress, unit="trial"
        )
        base = mean_dice(current, refs, targets)
        baseline = dict(base)
        bar.update(1)
        for op, key in steps:
            trial = apply_operation_many(current, op, connectivity=connectivity, spacings=spacings)
            after = mean_dice(trial, refs, targets)
            before_v, after_v = (_mean(base), _mean(after)) if key is None else (base[key], after[key])
            accept = _gain(after_v, before_v, min_gain)
            trials.append(
                {
                    "operation": op.to_dict(),
                    "scored_on": key or "foreground_mean",
                    "dice_before": before_v,
                    "dice_after": after_v,
                    "kept": accept,
                }
            )
            log.info(
                "postprocessing trial %s: Dice %.4f -> %.4f (%s)",
                op.describe(),
                before_v,
                after_v,
                "kept" if accept else "dropped",
            )
            if accept:
                kept.append(op)
                base, current = after, trial
            bar.update(1)
        bar.close()
    selection = {
        "n_cases": len(pairs),
        "targets": [target_key(t) for t in targets],
        "baseline_dice": baseline,
        "final_dice": base,
        "trials": trials,
    }
    spec = PostprocessingSpec(operations=tuple(kept), connectivity=connectivity, selection=_json_safe(selection))
    if output is not None:
        spec.save(output)
    return spec


def determine_for_configuration(
    work: Workspace,
    configuration: str,
    *,
    folds: Sequence[int | str] | None = None,
    connectivity: int = 1,
    scheduler: str = "threads",
) -> PostprocessingSpec:
    """Choose postprocessing for a trained configuration from its folds' validation predictions.

    Reads ``WORK/runs/<cfg>/fold_<k>/validation/prediction.zarr`` (written by end-of-fold
    validation) against the dataset store and saves ``WORK/runs/<cfg>/postprocessing.json``, which
    ``voxflow predict`` / ``voxflow postprocess --model-dir`` pick up.
    """
    cfg_dir = work.configuration(configuration)
    runs = [cfg_dir.fold(f) for f in folds] if folds is not None else cfg_dir.folds()
    stores = [r.validation_predictions for r in runs]
    missing = [str(s) for s in stores if not (s / "zarr.json").is_file()]
    if not stores or missing:
        raise IncompleteStoreError(
            f"choosing postprocessing needs every fold's validation predictions; missing {missing or cfg_dir.path}. "
            f"Train the folds (end-of-fold validation writes them) or pass folds=[...]."
        )
    return determine_postprocessing(
        stores, work.dataset_store, connectivity=connectivity, output=cfg_dir.postprocessing, scheduler=scheduler
    )


def load_model_postprocessing(model_dir: PathLikeStr) -> PostprocessingSpec | None:
    """``MODEL_DIR/postprocessing.json`` as a spec, or ``None`` when the model has none."""
    path = ConfigurationDir(model_dir).postprocessing
    return PostprocessingSpec.load(path) if path.is_file() else None


def _json_safe(value: Any) -> Any:
    return nan_to_none(value)
