"""DICOM SEG in: a SEG object of a DICOM tree read as the label volume of the image series it references.

The SEG's frames are placed by their plane positions on the image's slices (empty frames may be
omitted); rows, columns, orientation and pixel spacing must be the image's. Segment numbers become
label values. Overlapping segments are refused, naming them, unless the dataset declares regions
(then segments are painted in ``regions_class_order``, later ones winning, as nnU-Net writes region
predictions back). Frames are decoded lazily, only those of the slab being read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxflow.errors import ConversionError, GeometryMismatchError
from voxflow.geometry import Geometry
from voxflow.io._dicom_seg import POS_TOL_MM
from voxflow.io._volume import VolumeSource

__all__ = ["SegHeader", "SegLabel", "read_seg_header"]


# ---------------------------------------------------------------------- reading
@dataclass(frozen=True)
class SegHeader:
    """What a SEG file says without decoding its pixels."""

    path: Path
    series_uid: str  # the SEG's own
    referenced_series: tuple[str, ...]
    frame_of_reference: str
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None
    orientation: tuple[float, ...] | None
    segments: dict[int, str]  # segment number -> label
    frames: tuple[tuple[int, tuple[float, float, float]], ...]  # per frame: (segment number, position)
    segmentation_type: str

    def describe(self) -> str:
        return f"DICOM SEG {str(self.path)!r}"


def _seq_item(ds: Any, *names: str) -> Any:
    for name in names:
        seq = ds.get(name) if ds is not None else None
        if not seq:
            return None
        ds = seq[0]
    return ds


def read_seg_header(path: Path) -> SegHeader:
    """Header of a DICOM SEG (no pixel data read)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:
        raise ConversionError(f"a DICOM SEG must be readable; could not read {str(path)!r} ({e}).") from None
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    frames: list[tuple[int, tuple[float, float, float]]] = []
    item = None
    for i, item in enumerate(ds.get("PerFrameFunctionalGroupsSequence", [])):
        ident = _seq_item(item, "SegmentIdentificationSequence") or _seq_item(shared, "SegmentIdentificationSequence")
        pos = _seq_item(item, "PlanePositionSequence") or _seq_item(shared, "PlanePositionSequence")
        if ident is None or pos is None:
            raise ConversionError(
                f"every frame of a DICOM SEG must name its segment and plane position; frame {i + 1} "
                f"of {str(path)!r} does not. The SEG cannot be placed on its image series."
            )
        x, y, z = (float(v) for v in pos.ImagePositionPatient)
        frames.append((int(ident.ReferencedSegmentNumber), (x, y, z)))
    measures = _seq_item(item, "PixelMeasuresSequence") if frames else None
    measures = measures or _seq_item(shared, "PixelMeasuresSequence")
    orient = _seq_item(shared, "PlaneOrientationSequence") or (
        _seq_item(item, "PlaneOrientationSequence") if frames else None
    )
    return SegHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        referenced_series=tuple(str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        pixel_spacing=tuple(float(v) for v in measures.PixelSpacing)
        if measures is not None and "PixelSpacing" in measures
        else None,  # type: ignore[arg-type]
        orientation=tuple(float(v) for v in orient.ImageOrientationPatient) if orient is not None else None,
        segments={int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in ds.get("SegmentSequence", [])},
        frames=tuple(frames),
        segmentation_type=str(ds.get("SegmentationType", "")),
    )


@dataclass
class SegLabel(VolumeSource):
    """A DICOM SEG read as the (1, Z, Y, X) label volume of the image series it references.

    ``regions_class_order``: None refuses overlapping segments; otherwise segments are painted in
    that order (later ones win), as nnU-Net writes region predictions back.
    """

    header: SegHeader
    image_geometry: Geometry
    slice_positions: np.ndarray  # (Z, 3) xyz IPP of the image's slices, in store order
    image_orientation: np.ndarray  # (6,)
    image_pixel_spacing: np.ndarray  # (2,) row, column spacing
    regions_class_order: tuple[int, ...] | None = None
    case: str | None = None

    def __post_init__(self) -> None:
        h = self.header
        self.files = (str(h.path),)
        self.n_channels = 1
        self.streamable = True
        self.geometry = self.image_geometry
        self.dtype = np.dtype(np.uint8 if max(h.segments, default=1) < 256 else np.uint16)
        self._slice_of_frame = self._place_frames()

    def _place_frames(self) -> np.ndarray:
        h = self.header
        where = f"{h.describe()} (referencing image series {', '.join(h.referenced_series) or '(none)'})"
        if h.segmentation_type not in ("BINARY", "FRACTIONAL"):
            raise ConversionError(f"a DICOM SEG must be BINARY or FRACTIONAL; got {h.segmentation_type!r} in {where}.")
        if (h.rows, h.columns) != tuple(self.image_geometry.shape_zyx[1:]):
            raise GeometryMismatchError(
                f"a DICOM SEG must have its image's rows and columns; got {(h.rows, h.columns)} "
                f"vs {tuple(self.image_geometry.shape_zyx[1:])} in {where}."
            )
        if h.orientation is not None and not np.allclose(h.orientation, self.image_orientation, atol=1e-4):
            raise GeometryMismatchError(
                f"a DICOM SEG must share its image's ImageOrientationPatient; got "
                f"{list(h.orientation)} vs {self.image_orientation.tolist()} in {where}."
            )
        if h.pixel_spacing is not None and not np.allclose(h.pixel_spacing, self.image_pixel_spacing, rtol=1e-4):
            raise GeometryMismatchError(
                f"a DICOM SEG must share its image's PixelSpacing; got {list(h.pixel_spacing)} "
                f"vs {self.image_pixel_spacing.tolist()} in {where}."
            )
        unknown = sorted({n for n, _ in h.frames} - set(h.segments))
        if unknown:
            raise ConversionError(
                f"every frame of a DICOM SEG must belong to a described segment; segment(s) "
                f"{unknown} are not in the SegmentSequence of {where}."
            )
        pos = np.asarray([p for _, p in h.frames], float).reshape(-1, 3)
        slices = np.empty(len(pos), int)
        tol = max(POS_TOL_MM, 0.01 * float(self.image_geometry.spacing_zyx[0]))
        for i, p in enumerate(pos):
            d = np.linalg.norm(self.slice_positions - p, axis=1)
            k = int(np.argmin(d))
            if d[k] > tol:
                raise GeometryMismatchError(
                    f"every frame of a DICOM SEG must lie on a slice of its image series; frame {i + 1} at "
                    f"{p.round(3).tolist()} is {d[k]:.3g} mm from the nearest slice in {where}."
                )
            slices[i] = k
        return slices

    def read(self, z0: int, z1: int) -> np.ndarray:
        import highdicom as hd

        h = self.header
        out = np.zeros((z1 - z0, *self.image_geometry.shape_zyx[1:]), self.dtype)
        frames = [i for i, k in enumerate(self._slice_of_frame) if z0 <= k < z1]
        if not frames:
            return out[None]
        seg = hd.seg.segread(str(h.path), lazy_frame_retrieval=True)
        order = {n: r for r, n in enumerate(self.regions_class_order or ())}
        frames.sort(key=lambda i: order.get(h.frames[i][0], -1))
        for i in frames:
            number = h.frames[i][0]
            mask = np.asarray(seg.get_stored_frame(i + 1)) > 0
            plane = out[self._slice_of_frame[i] - z0]
            if self.regions_class_order is None:
                clash = mask & (plane != 0) & (plane != number)
                if clash.any():
                    other = int(plane[clash][0])
                    raise ConversionError(
                        f"the segments of a DICOM SEG must not overlap to become one label map; segments {other} "
                        f"({h.segments.get(other)!r}) and {number} ({h.segments.get(number)!r}) share "
                        f"{int(clash.sum())} voxel(s) on slice {int(self._slice_of_frame[i])} of {h.describe()}. "
                        f"Declare them as regions in the dataset labels, or fix the SEG."
                    )
            plane[mask] = number
        return out[None]

    def describe(self) -> str:
        return self.header.describe()
