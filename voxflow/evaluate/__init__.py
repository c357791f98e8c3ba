"""Evaluation: spacing-aware segmentation metrics per case and class/region, and summaries.

Overlap counts come from chunk-wise histograms; surface distances (HD95, ASSD, NSD) load only the
bounding box of one structure (prediction and reference together) at a time. Conventions, including
empty cases, are documented in :mod:`voxflow.evaluate._metrics`.
"""

from voxflow.evaluate._evaluate import (
    evaluate,
    evaluate_pairs,
    format_table,
    parse_labels,
    resolve_targets,
    summarize,
    target_key,
)
from voxflow.evaluate._io import Segmentation, open_segmentations, pair_segmentations
from voxflow.evaluate._metrics import (
    bounding_box,
    confusion_matrix,
    nan_to_none,
    overlap_metrics,
    region_counts,
    surface_distances,
    surface_metrics,
)
from voxflow.evaluate._summary import CaseMetrics, EvaluationSummary

__all__ = [
    "CaseMetrics",
    "EvaluationSummary",
    "Segmentation",
    "bounding_box",
    "confusion_matrix",
    "evaluate",
    "evaluate_pairs",
    "format_table",
    "nan_to_none",
    "open_segmentations",
    "overlap_metrics",
    "pair_segmentations",
    "parse_labels",
    "region_counts",
    "resolve_targets",
    "summarize",
    "surface_distances",
    "surface_metrics",
    "target_key",
]
