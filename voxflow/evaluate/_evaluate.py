"""``evaluate``: metrics per case and per class/region, summaries, ``summary.json`` and a table.

Targets (what is scored) are class values or regions (tuples of values, nnU-Net style). Their JSON
key is ``"1"`` or ``"1+2"``. By default the targets are the foreground labels declared by the
reference store (or a ``dataset.json`` beside/above a reference folder), else every nonzero value
present in predictions or references.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np

from voxflow._types import PathLikeStr
from voxflow.cluster import compute, compute_cases, is_small_case, scheduler_context, stage_bar
from voxflow.errors import EvaluationError
from voxflow.evaluate._io import Segmentation, declared_labels, open_segmentations, pair_segmentations
from voxflow.evaluate._metrics import (
    _block_hist,
    bounding_box,
    confusion_matrix,
    overlap_metrics,
    projections,
    region_counts,
    surface_metrics,
)
from voxflow.evaluate._summary import EvaluationSummary
from voxflow.store import Store

__all__ = ["MEAN_METRICS", "evaluate", "evaluate_pairs", "format_table", "parse_labels", "summarize"]

log = logging.getLogger(__name__)
LabelSpec = int | str | Sequence[int]
MEAN_METRICS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "hd95_mm",
    "hd_mm",
    "assd_mm",
    "nsd",
    "volume_pred_mm3",
    "volume_ref_mm3",
    "volume_diff_mm3",
)


def _parse_one(item: LabelSpec) -> tuple[int, ...]:
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        vals: tuple[int, ...] = (int(item),)
    elif isinstance(item, str):
        try:
            vals = tuple(int(v) for v in item.replace("+", ",").split(",") if v.strip())
        except ValueError:
            raise EvaluationError(f"a label must be an integer or a region like '1+2'; got {item!r}") from None
    else:
        vals = () if isinstance(item, bool) else tuple(int(v) for v in item)  # a bool: refused below
    if not vals or any(v < 0 for v in vals):
        raise EvaluationError(f"labels must be non-negative integers; got {item!r}")
    return tuple(sorted(set(vals)))


def parse_labels(labels: Sequence[LabelSpec] | Mapping[str, Any]) -> list[tuple[int, ...]]:
    """Targets from a list (``[1, 2, "1+2"]``) or a name -> value/region mapping (background dropped)."""
    items = list(labels.values()) if isinstance(labels, Mapping) else list(labels)
    out = []
    for item in items:
        t = _parse_one(item)
        if t != (0,) and t not in out:
            out.append(t)
    if not out:
        raise EvaluationError(f"at least one foreground label (value > 0) is needed; got {labels!r}")
    return out


def target_key(values: tuple[int, ...]) -> str:
    return "+".join(str(v) for v in values)


def resolve_targets(
    labels: Sequence[LabelSpec] | Mapping[str, Any] | None,
    reference: Any,
    pairs: list[tuple[Segmentation, Segmentation]],
) -> list[tuple[int, ...]]:
    """The targets to score: ``labels`` if given, else the reference's declared labels, else every
    foreground value present in the pairs (the value 0 is never a target)."""
    if labels is not None:
        return parse_labels(labels)
    declared = declared_labels(reference)
    return parse_labels(declared) if declared else _present_values(pairs)


def _present_values(pairs: list[tuple[Segmentation, Segmentation]]) -> list[tuple[int, ...]]:
    highs = dask.compute(*[da.maximum(p.array.max(), r.array.max()) for p, r in pairs])
    n = int(max(highs)) + 2
    mats = dask.compute(*[confusion_matrix(p.array, r.array, n) for p, r in pairs])
    total = np.sum(mats, axis=0)
    present = np.flatnonzero(total.sum(0) + total.sum(1))
    return [(int(v),) for v in present if v > 0]


def _case_graph(pred: Segmentation, ref: Segmentation, targets: list[tuple[int, ...]], surface: bool) -> dict[str, Any]:
    n_values = max(max(t) for t in targets) + 2
    out: dict[str, Any] = {"matrix": confusion_matrix(pred.array, ref.array, n_values)}
    if surface:
        ref_arr = ref.array.rechunk(pred.array.chunks)
        out["profiles"] = [projections(da.isin(pred.array, list(t)) | da.isin(ref_arr, list(t))) for t in targets]
    return out


def _surface_task(
    pred: Segmentation, ref: Segmentation, values: tuple[int, ...], box: tuple[slice, ...], tolerance_mm: float
) -> Any:
    spacing = tuple(pred.geometry.spacing_zyx)
    p = da.isin(pred.array[box], list(values))
    r = da.isin(ref.array[box], list(values))
    if pred.array.shape[0] == 1:  # a 2D image: distances in-plane
        p, r, spacing = p[0], r[0], spacing[1:]
    return dask.delayed(surface_metrics, pure=True)(p, r, spacing, tolerance_mm=tolerance_mm)


def _compute_nested(graphs: list[dict[str, Any]], *, progress: bool = False) -> list[dict[str, Any]]:
    """``dask.compute`` of a list of ``{"matrix": x, "profiles": [[...], ...]}`` via one flat call.

    Every entry is a dask Array: dask 2026.8 returns misplaced results when one ``dask.compute``
    call mixes Delayed objects and Arrays.
    """
    flat: list[Any] = []
    for g in graphs:
        flat.append(g["matrix"])
        for prof in g.get("profiles", []):
            flat.extend(prof)
    values = iter(compute(*flat, desc=f"evaluate {len(graphs)} cases: overlap", progress=progress))
    out = []
    for g in graphs:
        item: dict[str, Any] = {"matrix": next(values)}
        if "profiles" in g:
            item["profiles"] = [[next(values) for _ in prof] for prof in g["profiles"]]
        out.append(item)
    return out


def _small_pair(
    pred: np.ndarray,
    ref: np.ndarray,
    targets: list[tuple[int, ...]],
    spacing: tuple[float, ...],
    *,
    surface: bool,
    tolerance_mm: float,
) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """Confusion matrix and surface metrics of one small pair in memory: the same numbers as the
    chunked graph of :func:`_case_graph` and :func:`_surface_task` (integer counts, the same boxes)."""
    n_values = max(max(t) for t in targets) + 2
    matrix = _block_hist(pred, ref, n_values).reshape(n_values, n_values)
    surf: dict[str, dict[str, float]] = {}
    for t in targets if surface else ():
        p, r = np.isin(pred, list(t)), np.isin(ref, list(t))
        either = p | r
        box = bounding_box(
            [np.asarray(either.any(axis=tuple(a for a in range(either.ndim) if a != ax))) for ax in range(either.ndim)],
            pad=1,
        )
        if box is not None:
            pb, rb, sp = p[box], r[box], spacing
            if pred.shape[0] == 1:  # a 2D image: distances in-plane
                pb, rb, sp = pb[0], rb[0], spacing[1:]
            surf[target_key(t)] = surface_metrics(pb, rb, sp, tolerance_mm=tolerance_mm)
    return matrix, surf


def _pairs_chunked(
    pairs: list[tuple[Segmentation, Segmentation]],
    targets: list[tuple[int, ...]],
    *,
    tolerance_mm: float,
    surface: bool,
    progress: bool,
) -> list[tuple[Any, dict[str, Any]]]:
    """(matrix, surface metrics by target) of big pairs: chunked graphs, two computes in all."""
    if not pairs:
        return []
    graphs = [_case_graph(p, r, targets, surface) for p, r in pairs]
    computed = _compute_nested(graphs, progress=progress)
    tasks: dict[tuple[int, str], Any] = {}
    if surface:
        for i, ((p, r), g) in enumerate(zip(pairs, computed, strict=True)):
            for t, prof in zip(targets, g["profiles"], strict=True):
                box = bounding_box(prof, pad=1)
                if box is not None:
                    tasks[(i, target_key(t))] = _surface_task(p, r, t, box, tolerance_mm)
    surf = dict(
        zip(
            tasks,
            compute(
                *tasks.values(),
                desc=f"evaluate {len(pairs)} cases: surface distances",
                progress=progress and bool(tasks),
            ),
            strict=True,
        )
    )
    return [(g["matrix"], {key: m for (j, key), m in surf.items() if j == i}) for i, g in enumerate(computed)]


def evaluate_pairs(
    pairs: list[tuple[Segmentation, Segmentation]],
    targets: list[tuple[int, ...]],
    *,
    tolerance_mm: float = 1.0,
    surface: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Metrics of every (prediction, reference) pair for every target.

    Small pairs (fewer voxels than :data:`~voxflow.cluster.SMALL_CASE_VOXELS`) are one task each, all
    in one compute; bigger ones are chunked graphs (bounded memory), two computes in all (each with a
    progress bar when ``progress``). Both give the same numbers."""
    small = [i for i, (p, _) in enumerate(pairs) if is_small_case(int(np.prod(p.array.shape)))]
    big = [i for i in range(len(pairs)) if i not in set(small)]
    tasks = [
        dask.delayed(_small_pair, pure=True)(
            pairs[i][0].array,
            pairs[i][1].array,
            targets,
            tuple(pairs[i][0].geometry.spacing_zyx),
            surface=surface,
            tolerance_mm=tolerance_mm,
        )
        for i in small
    ]
    with stage_bar(len(small), desc=f"evaluate {len(small)} small cases", progress=progress) as bar:
        # no process pool: a pair's work is numpy/scipy (GIL released); a pool was no faster at 150 pairs
        found = dict(zip(small, compute_cases(tasks, bar=bar, pool=False), strict=True))
    found.update(
        zip(
            big,
            _pairs_chunked(
                [pairs[i] for i in big], targets, tolerance_mm=tolerance_mm, surface=surface, progress=progress
            ),
            strict=True,
        )
    )
    results = []
    empty = {"hd95_mm": math.nan, "hd_mm": math.nan, "assd_mm": math.nan, "nsd": math.nan}
    for i, (p, r) in enumerate(pairs):
        matrix, surf = found[i]
        vox_mm3 = float(np.prod(p.geometry.spacing_zyx))
        metrics: dict[str, dict[str, float]] = {}
        for t in targets:
            m = overlap_metrics(**region_counts(matrix, t), voxel_volume_mm3=vox_mm3)
            if surface:
                m.update(surf.get(target_key(t), empty))
            metrics[target_key(t)] = m
        results.append({"case_id": p.case_id, "prediction": p.source, "reference": r.source, "metrics": metrics})
    return results


def summarize(per_case: list[dict[str, Any]], targets: list[tuple[int, ...]]) -> dict[str, Any]:
    """Per-target means over cases (NaN excluded) and the mean over targets (``foreground_mean``)."""
    mean: dict[str, dict[str, float]] = {}
    for t in targets:
        key = target_key(t)
        mean[key] = {}
        for metric in MEAN_METRICS:
            vals = np.array([c["metrics"][key].get(metric, math.nan) for c in per_case], dtype=float)
            vals = vals[np.isfinite(vals)]
            mean[key][metric] = float(vals.mean()) if vals.size else math.nan
        mean[key]["n_cases_scored"] = int(sum(np.isfinite(c["metrics"][key]["dice"]) for c in per_case))
    fg: dict[str, float] = {}
    for metric in MEAN_METRICS:
        vals = np.array([mean[target_key(t)][metric] for t in targets], dtype=float)
        vals = vals[np.isfinite(vals)]
        fg[metric] = float(vals.mean()) if vals.size else math.nan
    return {"mean": mean, "foreground_mean": fg}


def evaluate(
    pred: Store | PathLikeStr,
    reference: Store | PathLikeStr,
    *,
    labels: Sequence[LabelSpec] | Mapping[str, Any] | None = None,
    tolerance_mm: float = 1.0,
    surface: bool = True,
    output: PathLikeStr | None = None,
    scheduler: str = "threads",
    memory_limit: str | None = None,
    progress: bool = True,
) -> EvaluationSummary:
    """Evaluate predictions against references (folders of label files or voxflow stores).

    Returns the :class:`~voxflow.evaluate.EvaluationSummary` (per case and per target metrics, their
    means, the foreground mean) and writes it to ``output`` (JSON, NaN as null) when given.
    Geometry of each pair must match (:class:`~voxflow.errors.GeometryMismatchError` otherwise).
    """
    if not tolerance_mm >= 0:
        raise EvaluationError(f"tolerance_mm must be >= 0 mm; got {tolerance_mm!r}")
    pairs = pair_segmentations(open_segmentations(pred), open_segmentations(reference))
    with scheduler_context(scheduler, memory_limit=memory_limit):
        targets = resolve_targets(labels, reference, pairs)
        if not targets:
            raise EvaluationError(
                "no foreground label to evaluate: predictions and references are all background; "
                "pass --labels to score specific values"
            )
        per_case = evaluate_pairs(pairs, targets, tolerance_mm=tolerance_mm, surface=surface, progress=progress)
    summary = EvaluationSummary.from_dict(
        {
            "labels": [target_key(t) for t in targets],
            "tolerance_mm": float(tolerance_mm),
            "conventions": "Dice/IoU NaN (null) when prediction and reference are both empty, excluded from means; "
            "HD95 = max of directed 95th percentiles; surfaces by erosion; distances in mm by exact EDT.",
            "metric_per_case": per_case,
            **summarize(per_case, targets),
        }
    )
    if output is not None:
        summary.save(output)
        log.info("wrote %s", output)
    return summary


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"


def format_table(summary: EvaluationSummary) -> str:
    """A plain-text table of the per-target means and the foreground mean."""
    cols = ("dice", "iou", "precision", "recall", "hd95_mm", "assd_mm", "nsd", "volume_diff_mm3")
    rows: list[tuple[str, ...]] = [("label", *cols)]
    for key, m in summary.mean.items():
        rows.append((key, *(_fmt(m.get(c)) for c in cols)))
    rows.append(("mean", *(_fmt(summary.foreground_mean.get(c)) for c in cols)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
