"""The evaluation summary as a typed value: :class:`EvaluationSummary` ⇄ ``summary.json``.

Layout of the JSON (unchanged from the string-keyed dict it replaces): ``labels`` (target keys,
``"1"`` or ``"1+2"``), ``tolerance_mm``, ``conventions``, ``metric_per_case`` (one object per case:
``case_id``, ``prediction``, ``reference``, ``metrics[target][metric]``), ``mean[target][metric]``
(plus ``n_cases_scored``) and ``foreground_mean[metric]``. Distances are in mm, volumes in mm³;
NaN (``null`` in the file) marks an undefined value, e.g. the Dice of two empty masks.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from voxflow._serial import atomic_write_json, coerce, from_dict, load_json_file, set_field, to_jsonable
from voxflow._types import PathLikeStr
from voxflow.errors import EvaluationError
from voxflow.evaluate._metrics import nan_to_none

__all__ = ["CaseMetrics", "EvaluationSummary"]

MetricTable = dict[str, dict[str, float]]  # target key -> metric name -> value


def _number(value: Any, name: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EvaluationError(f"{name} must be a number or null; got {value!r}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)  # counts stay integers


def _row(row: Any, name: str) -> dict[str, float]:
    if not isinstance(row, Mapping):
        raise EvaluationError(f"{name} must be an object of metric: value; got {row!r}")
    return {str(k): _number(v, f"{name}.{k}") for k, v in row.items()}


def _table(table: Any, name: str) -> MetricTable:
    if not isinstance(table, Mapping):
        raise EvaluationError(f"{name} must be an object of target: {{metric: value}}; got {table!r}")
    return {str(k): _row(v, f"{name}.{k}") for k, v in table.items()}


def _mean_dice(dices: list[float]) -> float:
    finite = [d for d in dices if math.isfinite(d)]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass(frozen=True, kw_only=True)
class CaseMetrics:
    """The metrics of one (prediction, reference) pair, ``metrics[target_key][metric]``."""

    case_id: str
    prediction: str
    reference: str
    metrics: MetricTable

    def __post_init__(self) -> None:
        set_field(self, "metrics", _table(self.metrics, "metrics"))

    def foreground_dice(self) -> float:
        """Mean Dice over the targets that have one (NaN when no target has one)."""
        return _mean_dice([m.get("dice", math.nan) for m in self.metrics.values()])


@dataclass(frozen=True, kw_only=True)
class EvaluationSummary:
    """What :func:`~voxflow.evaluate.evaluate` returns and writes as ``summary.json``."""

    labels: tuple[str, ...]
    tolerance_mm: float
    conventions: str
    metric_per_case: tuple[CaseMetrics, ...]
    mean: MetricTable
    foreground_mean: dict[str, float]

    def __post_init__(self) -> None:
        set_field(self, "labels", tuple(str(k) for k in self.labels))
        set_field(self, "tolerance_mm", float(_number(self.tolerance_mm, "tolerance_mm")))
        cases = tuple(
            coerce(CaseMetrics, c, f"metric_per_case.{i}", error=EvaluationError)
            for i, c in enumerate(self.metric_per_case)
        )
        set_field(self, "metric_per_case", cases)
        set_field(self, "mean", _table(self.mean, "mean"))
        set_field(self, "foreground_mean", _row(self.foreground_mean, "foreground_mean"))

    @property
    def dice(self) -> float:
        """The foreground-mean Dice (mean over targets of the per-target case means)."""
        return self.foreground_mean.get("dice", math.nan)

    def case_dice(self) -> list[float]:
        """Per case, the mean Dice over its targets; cases where no target has a Dice are left out."""
        return [d for d in (c.foreground_dice() for c in self.metric_per_case) if math.isfinite(d)]

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON types (NaN kept; :meth:`save` writes it as null)."""
        out: dict[str, Any] = to_jsonable(self)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> EvaluationSummary:
        """Build from :meth:`to_dict` output or a parsed ``summary.json`` (null read as NaN)."""
        return from_dict(cls, data, error=EvaluationError)

    def save(self, path: PathLikeStr) -> None:
        """Write ``summary.json`` atomically (strict JSON: NaN as null)."""
        atomic_write_json(path, nan_to_none(self.to_dict()))

    @classmethod
    def load(cls, path: PathLikeStr) -> EvaluationSummary:
        """Read a ``summary.json`` written by :meth:`save` (or by earlier versions: same layout)."""
        return load_json_file(
            path, cls.from_dict, what="evaluation summary", command="voxflow evaluate", error=EvaluationError
        )
