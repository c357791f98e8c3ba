"""``postprocessing.json``: an ordered list of label-map operations, and applying it lazily.

Example::

    {"format": "voxflow-postprocessing-1", "connectivity": 1,
     "operations": [{"op": "keep_largest", "target": "foreground"},
                    {"op": "fill_holes", "target": 1},
                    {"op": "remove_small", "target": [1, 2], "min_size_mm3": 50.0}],
     "selection": {...how cross-validation chose them (informative only)...}}
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da

from voxflow._types import PathLikeStr
from voxflow.plan.schema import atomic_write_json
from voxflow.postprocess._components import PendingFilter, connectivity_structure, finish_filters
from voxflow.postprocess._ops import (
    PostprocessingError,
    Target,
    parse_target,
    prepare_fill_holes,
    prepare_keep_largest,
    prepare_remove_small,
    target_name,
)

__all__ = [
    "FORMAT",
    "OPERATIONS",
    "Operation",
    "PostprocessingSpec",
    "apply_operation_many",
    "apply_postprocessing",
    "apply_postprocessing_many",
    "prepare_operation",
]

FORMAT = "voxflow-postprocessing-1"
OPERATIONS = ("keep_largest", "remove_small", "fill_holes")


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One step: ``op`` on ``target`` (class value, region tuple or ``"foreground"``)."""

    op: str
    target: Target
    min_size_mm3: float | None = None

    def __post_init__(self) -> None:
        if self.op not in OPERATIONS:
            close = difflib.get_close_matches(str(self.op), OPERATIONS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PostprocessingError(f"op must be one of {list(OPERATIONS)}; got {self.op!r}.{hint}")
        object.__setattr__(self, "target", parse_target(self.target))
        if self.op == "remove_small" and (self.min_size_mm3 is None or self.min_size_mm3 < 0):
            raise PostprocessingError(f"remove_small needs min_size_mm3 >= 0; got {self.min_size_mm3!r}")
        if self.op == "fill_holes" and not isinstance(self.target, int):
            raise PostprocessingError(f"fill_holes needs one class value as target; got {self.target!r}")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"op": self.op, "target": list(self.target) if isinstance(self.target, tuple)
                             else self.target}
        if self.min_size_mm3 is not None:
            d["min_size_mm3"] = self.min_size_mm3
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Operation:
        unknown = set(d) - {"op", "target", "min_size_mm3"}
        if unknown or "op" not in d or "target" not in d:
            raise PostprocessingError(
                f"an operation needs 'op' and 'target' (and 'min_size_mm3' for remove_small); got keys {sorted(d)}"
            )
        return cls(op=d["op"], target=d["target"], min_size_mm3=d.get("min_size_mm3"))

    def describe(self) -> str:
        extra = f" (< {self.min_size_mm3} mm3)" if self.min_size_mm3 is not None else ""
        return f"{self.op} {target_name(self.target)}{extra}"


@dataclass(frozen=True, kw_only=True)
class PostprocessingSpec:
    """Operations applied in order, with the connectivity used for components and holes."""

    operations: tuple[Operation, ...] = ()
    connectivity: int = 1
    selection: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        ops = tuple(o if isinstance(o, Operation) else Operation.from_dict(o) for o in self.operations)
        object.__setattr__(self, "operations", ops)
        connectivity_structure(3, self.connectivity)  # validates

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "connectivity": self.connectivity,
                "operations": [o.to_dict() for o in self.operations], "selection": self.selection}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PostprocessingSpec:
        if d.get("format", FORMAT) != FORMAT:
            raise PostprocessingError(f"postprocessing format must be {FORMAT!r}; got {d.get('format')!r}")
        unknown = set(d) - {"format", "connectivity", "operations", "selection"}
        if unknown:
            raise PostprocessingError(f"unknown postprocessing fields {sorted(unknown)}")
        return cls(operations=tuple(Operation.from_dict(o) for o in d.get("operations", ())),
                   connectivity=int(d.get("connectivity", 1)), selection=dict(d.get("selection", {})))

    def save(self, path: PathLikeStr) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLikeStr) -> PostprocessingSpec:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise PostprocessingError(f"cannot read postprocessing file {path}: {e}") from e
        return cls.from_dict(data)


def _as_spec(spec: PostprocessingSpec | Mapping[str, Any] | PathLikeStr) -> PostprocessingSpec:
    if isinstance(spec, PostprocessingSpec):
        return spec
    if isinstance(spec, Mapping):
        return PostprocessingSpec.from_dict(spec)
    return PostprocessingSpec.load(spec)


def prepare_operation(label: da.Array, op: Operation, *, connectivity: int = 1,
                      spacing: Sequence[float] | None = None) -> PendingFilter:
    """The lazy summary pass of one operation (``spacing`` in mm per voxel, array order, for mm3)."""
    if op.op == "keep_largest":
        return prepare_keep_largest(label, op.target, connectivity=connectivity)
    if op.op == "fill_holes":
        return prepare_fill_holes(label, op.target, connectivity=connectivity)  # type: ignore[arg-type]
    if spacing is None:
        raise PostprocessingError(f"{op.describe()} needs the voxel spacing to convert mm3 to voxels")
    return prepare_remove_small(label, op.target, min_size_mm3=op.min_size_mm3, spacing=spacing,
                                connectivity=connectivity)


def apply_operation_many(labels: Sequence[da.Array], op: Operation, *, connectivity: int = 1,
                         spacings: Sequence[Sequence[float] | None] | None = None) -> list[da.Array]:
    """One operation on several label maps: their summary passes in one dask call, results lazy."""
    spacings = list(spacings) if spacings is not None else [None] * len(labels)
    pending = [prepare_operation(lab, op, connectivity=connectivity, spacing=sp) for lab, sp in zip(labels, spacings)]
    return finish_filters(pending)


def apply_postprocessing_many(labels: Sequence[da.Array], spec: PostprocessingSpec | Mapping[str, Any] | PathLikeStr,
                              *, spacings: Sequence[Sequence[float] | None] | None = None) -> list[da.Array]:
    """:func:`apply_postprocessing` on several label maps; one dask call per operation, over all of them."""
    spec = _as_spec(spec)
    out = list(labels)
    for op in spec.operations:
        out = apply_operation_many(out, op, connectivity=spec.connectivity, spacings=spacings)
    return out


def apply_postprocessing(label: da.Array, spec: PostprocessingSpec | Mapping[str, Any] | PathLikeStr, *,
                         spacing: Sequence[float] | None = None) -> da.Array:
    """Apply a postprocessing spec (object, dict or ``postprocessing.json`` path) to a label map.

    ``label`` is ``(Z, Y, X)`` (or ``(Y, X)``), lazy. Each operation runs its summary pass now
    (streaming over the blocks, small results: component sizes and merges) and the returned
    array is a lazy blockwise graph; memory stays about one block per worker plus the tables.
    """
    return apply_postprocessing_many([label], spec, spacings=[spacing])[0]
