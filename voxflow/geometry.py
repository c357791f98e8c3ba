"""Image geometry in numpy axis order, and the one place that converts from/to SimpleITK.

SimpleITK (and ITK, NIfTI, DICOM) describe an image in (x, y, z) order: ``GetSpacing()`` is
(sx, sy, sz), ``GetOrigin()`` the physical (LPS, mm) position of voxel (0, 0, 0), and
``GetDirection()`` a row-major 3x3 matrix whose *columns* are the physical directions of the
x, y and z index axes. ``sitk.GetArrayFromImage`` returns the voxels as (z, y, x).

voxflow keeps everything in numpy order. A :class:`Geometry` stores

* ``shape_zyx``   -- voxels per axis,
* ``spacing_zyx`` -- mm per voxel along z, y, x,
* ``origin_zyx``  -- the physical position of voxel (0, 0, 0), coordinates listed as (z, y, x),
* ``direction_zyx`` -- 3x3 matrix ``D`` with physical_zyx = origin_zyx + D @ (spacing_zyx * index_zyx),

i.e. the SimpleITK quantities with every axis (and both matrix axes) reversed. A 2D source image is
stored as a single-slice volume (shape ``(1, Y, X)``, z spacing 1 mm) and remembers
``source_ndim=2`` so that export writes a 2D file again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from voxflow.errors import GeometryError, GeometryMismatchError

__all__ = ["Geometry"]

_IDENTITY = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))


def _tuple3(values: Sequence[float], name: str, cast: type = float) -> tuple[Any, Any, Any]:
    if len(values) != 3:
        raise GeometryError(
            f"{name} must have 3 entries (z, y, x); got {tuple(values)!r}. A 2D image is one "
            f"slice: pass (1, Y, X) sizes and a z entry (1 mm spacing, 0 origin)."
        )
    z, y, x = (cast(v) for v in values)
    return z, y, x


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of one image in physical space (mm), numpy axis order (z, y, x)."""

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    origin_zyx: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction_zyx: tuple[tuple[float, float, float], ...] = field(default=_IDENTITY)
    source_ndim: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape_zyx", _tuple3(self.shape_zyx, "shape_zyx", int))
        object.__setattr__(self, "spacing_zyx", _tuple3(self.spacing_zyx, "spacing_zyx"))
        object.__setattr__(self, "origin_zyx", _tuple3(self.origin_zyx, "origin_zyx"))
        d = np.asarray(self.direction_zyx, dtype=float)
        if d.shape != (3, 3):
            raise GeometryError(
                f"direction_zyx must be a 3x3 matrix (rows z, y, x); got shape {d.shape}. Pass "
                f"the 3x3 direction cosines, or leave it out for the identity."
            )
        object.__setattr__(self, "direction_zyx", tuple(tuple(float(v) for v in row) for row in d))
        if any(s <= 0 for s in self.shape_zyx):
            raise GeometryError(
                f"shape_zyx must be at least 1 voxel per axis; got {self.shape_zyx!r}. An empty "
                f"image cannot be stored: check the file or the crop box."
            )
        if any(not math.isfinite(s) or s <= 0 for s in self.spacing_zyx):
            raise GeometryError(
                f"spacing_zyx must be positive finite mm per axis; got {self.spacing_zyx!r}. Fix "
                f"the spacing in the image header (e.g. with SimpleITK's SetSpacing)."
            )
        if self.source_ndim not in (2, 3):
            raise GeometryError(
                f"source_ndim must be 2 or 3; got {self.source_ndim!r}. Use 2 for a single-slice "
                f"image from a 2D file, else 3 (the default)."
            )

    # ------------------------------------------------------------------ SimpleITK
    @classmethod
    def from_sitk(cls, image: Any) -> Geometry:
        """Geometry of a ``SimpleITK.Image`` (2D or 3D; a 4D image's first three axes)."""
        dim = image.GetDimension()
        size = list(image.GetSize())
        spacing = list(image.GetSpacing())
        origin = list(image.GetOrigin())
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)
        if dim == 2:
            d3 = np.eye(3)
            d3[:2, :2] = direction
            return cls(
                shape_zyx=(1, size[1], size[0]),
                spacing_zyx=(1.0, spacing[1], spacing[0]),
                origin_zyx=(0.0, origin[1], origin[0]),
                direction_zyx=tuple(map(tuple, d3[::-1, ::-1])),
                source_ndim=2,
            )
        if dim == 4:
            direction = direction[:3, :3]
        return cls(
            shape_zyx=(size[2], size[1], size[0]),
            spacing_zyx=(spacing[2], spacing[1], spacing[0]),
            origin_zyx=(origin[2], origin[1], origin[0]),
            direction_zyx=tuple(map(tuple, direction[:3, :3][::-1, ::-1])),
        )

    def sitk_spacing(self) -> tuple[float, ...]:
        """Spacing in SimpleITK (x, y[, z]) order for the source dimensionality."""
        sp = self.spacing_zyx[::-1]
        return sp[:2] if self.source_ndim == 2 else sp

    def sitk_origin(self) -> tuple[float, ...]:
        o = self.origin_zyx[::-1]
        return o[:2] if self.source_ndim == 2 else o

    def sitk_direction(self) -> tuple[float, ...]:
        d = np.asarray(self.direction_zyx)[::-1, ::-1]
        if self.source_ndim == 2:
            d = d[:2, :2]
        return tuple(float(v) for v in d.ravel())

    def apply_to_sitk(self, image: Any) -> Any:
        """Set spacing, origin and direction of a SimpleITK image in place; returns it."""
        image.SetSpacing(self.sitk_spacing())
        image.SetOrigin(self.sitk_origin())
        image.SetDirection(self.sitk_direction())
        return image

    # ------------------------------------------------------------------ physical space
    @property
    def ndim(self) -> int:
        return 3

    @property
    def is_2d(self) -> bool:
        return self.source_ndim == 2

    def index_to_physical(self, index_zyx: np.ndarray | Sequence[float]) -> np.ndarray:
        """Physical (z, y, x) position in mm of (continuous) voxel indices; ``(..., 3)`` array."""
        idx = np.asarray(index_zyx, dtype=float)
        d = np.asarray(self.direction_zyx)
        physical: np.ndarray = np.asarray(self.origin_zyx) + (idx * np.asarray(self.spacing_zyx)) @ d.T
        return physical

    def axis_coords_mm(self) -> dict[str, np.ndarray]:
        """1-D physical coordinates per axis (exact only for axis-aligned direction)."""
        return {
            ax: self.origin_zyx[i] + self.spacing_zyx[i] * np.arange(self.shape_zyx[i]) for i, ax in enumerate("zyx")
        }

    def with_shape(
        self,
        shape_zyx: Sequence[int],
        spacing_zyx: Sequence[float] | None = None,
        origin_zyx: Sequence[float] | None = None,
    ) -> Geometry:
        """A copy with a new grid (after cropping or resampling)."""
        return replace(
            self,
            shape_zyx=_tuple3(shape_zyx, "shape_zyx", int),
            spacing_zyx=_tuple3(spacing_zyx, "spacing_zyx") if spacing_zyx is not None else self.spacing_zyx,
            origin_zyx=_tuple3(origin_zyx, "origin_zyx") if origin_zyx is not None else self.origin_zyx,
        )

    def cropped(self, bbox_zyx: Sequence[Sequence[int]]) -> Geometry:
        """Geometry of the sub-grid ``[lo, hi)`` per axis (origin moves to the box corner)."""
        lo = [int(b[0]) for b in bbox_zyx]
        shape = [int(b[1]) - int(b[0]) for b in bbox_zyx]
        return self.with_shape(shape, origin_zyx=tuple(self.index_to_physical(lo)))

    # ------------------------------------------------------------------ comparison / JSON
    def check_matches(
        self,
        other: Geometry,
        *,
        what: str = "label",
        case: str | None = None,
        rtol: float = 1e-3,
        atol_mm: float = 1e-3,
    ) -> None:
        """Raise :class:`GeometryMismatchError` unless ``other`` lies on the same grid.

        Spacing is compared with a relative tolerance, origin with ``max(atol_mm, rtol*spacing)``
        and direction cosines with ``1e-3``; small float noise from file headers passes.
        """
        where = f" for case {case!r}" if case else ""
        if self.shape_zyx != other.shape_zyx:
            raise GeometryMismatchError(
                f"{what} shape (z, y, x) must equal the image's {self.shape_zyx}; got {other.shape_zyx}{where}."
            )
        sp_a, sp_b = np.asarray(self.spacing_zyx), np.asarray(other.spacing_zyx)
        if not np.allclose(sp_a, sp_b, rtol=rtol, atol=0):
            raise GeometryMismatchError(
                f"{what} spacing_zyx must equal the image's {self.spacing_zyx} mm; got {other.spacing_zyx}{where}."
            )
        tol = max(atol_mm, rtol * float(sp_a.max()))
        if not np.allclose(self.origin_zyx, other.origin_zyx, rtol=0, atol=tol):
            raise GeometryMismatchError(
                f"{what} origin_zyx must equal the image's {self.origin_zyx} mm (tolerance {tol:g}); "
                f"got {other.origin_zyx}{where}."
            )
        if not np.allclose(self.direction_zyx, other.direction_zyx, rtol=0, atol=1e-3):
            raise GeometryMismatchError(
                f"{what} direction must equal the image's {self.direction_zyx}; got {other.direction_zyx}{where}."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape_zyx": list(self.shape_zyx),
            "spacing_zyx": list(self.spacing_zyx),
            "origin_zyx": list(self.origin_zyx),
            "direction_zyx": [list(r) for r in self.direction_zyx],
            "source_ndim": self.source_ndim,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Geometry:
        known = {"shape_zyx", "spacing_zyx", "origin_zyx", "direction_zyx", "source_ndim"}
        unknown = set(d) - known
        if unknown:
            raise GeometryError(
                f"geometry fields must be among {sorted(known)}; got unknown {sorted(unknown)}. "
                f"Remove them (was the store written by a newer voxflow?)."
            )
        return cls(
            shape_zyx=tuple(d["shape_zyx"]),
            spacing_zyx=tuple(d["spacing_zyx"]),
            origin_zyx=tuple(d.get("origin_zyx", (0.0, 0.0, 0.0))),
            direction_zyx=tuple(tuple(r) for r in d.get("direction_zyx", _IDENTITY)),
            source_ndim=int(d.get("source_ndim", 3)),
        )
