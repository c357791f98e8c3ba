"""``postprocessing.json``: an ordered list of label-map operations, and applying it lazily.

Example::

    {"format": "voxflow-postprocessing-1", "connectivity": 1,
     "operations": [{"op": "keep_largest", "target": "foreground"},
                    {"op": "fill_holes", "target": 1},
                    {"op": "remove_small", "target": [1, 2], "min_size_mm3": 50.0}],
     "selection": {...how cross-validation chose them (informative only)...}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dask.array as da

from voxflow import _serial
from voxflow._types import PathLikeStr
from voxflow.errors import PostprocessingError
from voxflow.postprocess._components import PendingFilter, connectivity_structure, finish_filters
from voxflow.postprocess._ops import (
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
    "OperationKind",
    "PostprocessingSpec",
    "apply_operation_many",
    "apply_postprocessing",
    "apply_postprocessing_many",
    "prepare_operation",
]

FORMAT = "voxflow-postprocessing-1"
OperationKind = Literal["keep_largest", "remove_small", "fill_holes"]
OPERATIONS: tuple[str, ...] = _serial.choices(OperationKind)


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One step: ``op`` on ``target`` (class value, region tuple or ``"foreground"``)."""

    op: OperationKind
    target: Target
    min_size_mm3: float | None = None

    def __post_init__(self) -> None:
        _serial.check_choices(self, error=PostprocessingError)
        _serial.set_field(self, "target", parse_target(self.target))
        if self.op == "remove_small" and (self.min_size_mm3 is None or self.min_size_mm3 < 0):
            raise PostprocessingError(f"remove_small needs min_size_mm3 >= 0; got {self.min_size_mm3!r}")
        if self.op == "fill_holes" and not isinstance(self.target, int):
            raise PostprocessingError(f"fill_holes needs one class value as target; got {self.target!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in _serial.to_jsonable(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "operation") -> Operation:
        return _serial.from_dict(cls, d, where, error=PostprocessingError)

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
        ops = tuple(
            _serial.coerce(Operation, o, f"operations[{i}]", error=PostprocessingError)
            for i, o in enumerate(self.operations)
        )
        _serial.set_field(self, "operations", ops)
        _serial.set_field(self, "selection", dict(self.selection))
        connectivity_structure(3, self.connectivity)  # validates

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **_serial.to_jsonable(self), "operations": [o.to_dict() for o in self.operations]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PostprocessingSpec:
        if not isinstance(d, Mapping):
            raise PostprocessingError(f"postprocessing must be an object; got {type(d).__name__}")
        data = dict(d)
        _serial.check_choice(data.pop("format", FORMAT), [FORMAT], "postprocessing format", error=PostprocessingError)
        return _serial.from_dict(cls, data, "postprocessing", error=PostprocessingError)

    def save(self, path: PathLikeStr) -> None:
        _serial.atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLikeStr) -> PostprocessingSpec:
        return _serial.load_json_file(
            path,
            cls.from_dict,
            what="postprocessing",
            error=PostprocessingError,
            command="voxflow postprocess SOURCE OUTPUT --determine-with REFERENCE -p FILE",
        )


def _as_spec(spec: PostprocessingSpec | Mapping[str, Any] | PathLikeStr) -> PostprocessingSpec:
    if isinstance(spec, PostprocessingSpec):
        return spec
    if isinstance(spec, Mapping):
        return PostprocessingSpec.from_dict(spec)
    return PostprocessingSpec.load(spec)


def prepare_operation(
    label: da.Array, op: Operation, *, connectivity: int = 1, spacing: Sequence[float] | None = None
) -> PendingFilter:
    """The lazy summary pass of one operation (``spacing`` in mm per voxel, array order, for mm3)."""
    if op.op == "keep_largest":
        return prepare_keep_largest(label, op.target, connectivity=connectivity)
    if op.op == "fill_holes":
        return prepare_fill_holes(label, op.target, connectivity=connectivity)  # type: ignore[arg-type]
    if spacing is None:
        raise PostprocessingError(f"{op.describe()} needs the voxel spacing to convert mm3 to voxels")
    return prepare_remove_small(
        label, op.target, min_size_mm3=op.min_size_mm3, spacing=spacing, connectivity=connectivity
    )


def apply_operation_many(
    labels: Sequence[da.Array],
    op: Operation,
    *,
    connectivity: int = 1,
    spacings: Sequence[Sequence[float] | None] | None = None,
) -> list[da.Array]:
    """One operation on several label maps: their summary passes in one dask call, results lazy."""
    spacings = list(spacings) if spacings is not None else [None] * len(labels)
    pending = [
        prepare_operation(lab, op, connectivity=connectivity, spacing=sp)
        for lab, sp in zip(labels, spacings, strict=True)
    ]
    return finish_filters(pending)


def apply_postprocessing_many(
    labels: Sequence[da.Array],
    spec: PostprocessingSpec | Mapping[str, Any] | PathLikeStr,
    *,
    spacings: Sequence[Sequence[float] | None] | None = None,
) -> list[da.Array]:
    """:func:`apply_postprocessing` on several label maps; one dask call per operation, over all of them."""
    spec = _as_spec(spec)
    out = list(labels)
    for op in spec.operations:
        out = apply_operation_many(out, op, connectivity=spec.connectivity, spacings=spacings)
    return out


def apply_postprocessing(
    label: da.Array,
    spec: PostprocessingSpec | Mapping[str, Any] | PathLikeStr,
    *,
    spacing: Sequence[float] | None = None,
) -> da.Array:
    """Apply a postprocessing spec (object, dict or ``postprocessing.json`` path) to a label map.

    ``label`` is ``(Z, Y, X)`` (or ``(Y, X)``), lazy. Each operation runs its summary pass now
    (streaming over the blocks, small results: component sizes and merges) and the returned
    array is a lazy blockwise graph; memory stays about one block per worker plus the tables.
    """
    return apply_postprocessing_many([label], spec, spacings=[spacing])[0]
