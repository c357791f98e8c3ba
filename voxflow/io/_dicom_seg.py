"""DICOM Segmentation (SEG) objects: written from a label volume, read back as the label of a series.

*Out* (:func:`write_dicom_seg`): one BINARY SEG per case, made with ``highdicom``, referencing the
source series it was converted from -- study, series and per-slice SOP instance UIDs, frame of
reference, and the source's own plane positions and orientation (oblique included). One segment
per class of dataset.json, its segment number the label value (region-based datasets: one segment
per region, its number the region's value in ``regions_class_order``; segments then overlap).
What the SEG needs from the source is recorded at conversion in the case attributes
(``provenance["dicom"]``, see :func:`series_reference`), so the source files need not be there
when the SEG is written; a case converted from anything else gets a :class:`ConversionError`.

*In* (``_dicom_seg_in.SegLabel``): a SEG in a DICOM tree becomes the label of the image series it references
(``ReferencedSeriesSequence``): segment numbers become label values; its frames are placed by their
plane positions on the image's slices (empty frames may be omitted). A SEG whose series is not in
the tree, whose frame of reference or grid differs from it, or whose segments overlap (unless the
dataset declares regions) is refused with an error naming it.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxflow.errors import ConversionError, GeometryMismatchError, VoxflowWarning
from voxflow.geometry import Geometry

__all__ = [
    "SEG_SOP_CLASS_UID",
    "case_reference",
    "dicom_reference",
    "series_reference",
    "substitute_uid",
    "write_case_seg",
    "write_dicom_seg",
]

log = logging.getLogger(__name__)

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
_REFERENCE_VERSION = 1
_STUDY_TAGS = (
    "StudyInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "SpecificCharacterSet",
)
_SERIES_TAGS = ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "FrameOfReferenceUID")
POS_TOL_MM = 1e-2  # how far a plane may be from the slice it stands for


def _text(ds: Any, keyword: str) -> Any:
    value = ds.get(keyword, "")
    if keyword == "SpecificCharacterSet" and not isinstance(value, str):
        return "\\".join(value) if value else ""
    return "" if value is None else str(value)


# ---------------------------------------------------------------------- what conversion records
def series_reference(paths: Sequence[str | Path]) -> dict[str, Any]:
    """What a SEG needs from a DICOM series whose slices are ``paths`` (in the store's z order).

    Read from the headers with pydicom. An empty SOPClassUID/SOPInstanceUID (badly anonymised
    files) is taken from the file meta (MediaStorageSOP...), where DICOM repeats it.
    """
    import pydicom

    first: Any = None
    sop_class, sop_uid, ipp = [], [], []
    for p in paths:
        ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        first = first if first is not None else ds
        meta = getattr(ds, "file_meta", None)
        sop_class.append(str(ds.get("SOPClassUID", "") or getattr(meta, "MediaStorageSOPClassUID", "") or ""))
        sop_uid.append(str(ds.get("SOPInstanceUID", "") or getattr(meta, "MediaStorageSOPInstanceUID", "") or ""))
        ipp.append([float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])])
    return {
        "version": _REFERENCE_VERSION,
        "study": {k: _text(first, k) for k in _STUDY_TAGS},
        "series": {k: _text(first, k) for k in _SERIES_TAGS},
        "rows": int(first.Rows),
        "columns": int(first.Columns),
        "pixel_spacing": [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])],
        "slice_thickness": float(first.get("SliceThickness", 0) or 0) or None,
        "image_orientation": [float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])],
        "sop_class_uids": sop_class,
        "sop_instance_uids": sop_uid,
        "image_positions": ipp,
    }


def dicom_reference(attrs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The DICOM source record in a case's attributes: a dataset store's ``provenance``, or the
    ``input`` a prediction store copies from its input store; None when the case is not from DICOM."""
    for key in ("provenance", "input"):
        block = attrs.get(key)
        if isinstance(block, Mapping) and isinstance(block.get("dicom"), Mapping):
            return dict(block["dicom"])
    ref = attrs.get("dicom")
    return dict(ref) if isinstance(ref, Mapping) else None


# ---------------------------------------------------------------------- writing
def _uid(*parts: str) -> str:
    """A deterministic DICOM UID (2.25 form) from ``parts``."""
    return "2.25." + str(int(hashlib.sha256("\0".join(parts).encode()).hexdigest()[:30], 16))


def substitute_uid(keyword: str, first_sop_instance_uid: str) -> str:
    """The UID a SEG uses for a source series that has no ``keyword`` (Study/Series/FrameOfReference
    UID): derived from the series' first SOP instance UID, so SEG in finds the series again."""
    return _uid("voxflow", keyword, first_sop_instance_uid)


def _source_datasets(ref: Mapping[str, Any], case_id: str) -> list[Any]:
    """Header-only pydicom datasets standing in for the source slices (what highdicom reads)."""
    from pydicom.dataset import Dataset

    study, series = dict(ref["study"]), dict(ref["series"])
    seed = ref["sop_instance_uids"][0] if ref["sop_instance_uids"] else case_id
    missing = [
        k
        for k, d in (("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("FrameOfReferenceUID", series))
        if not d.get(k)
    ]
    if missing:
        warnings.warn(
            VoxflowWarning(
                f"a DICOM SEG must reference the source's {', '.join(missing)}; the source series of case "
                f"{case_id!r} has none (anonymised without UIDs), so the SEG gets new deterministic UIDs for "
                f"them and a viewer will not place it in the source study automatically."
            ),
            stacklevel=3,
        )
        for k in missing:
            (study if k == "StudyInstanceUID" else series)[k] = substitute_uid(k, seed)
    sop_uids = list(ref["sop_instance_uids"])
    out = []
    for i, (cls, uid, pos) in enumerate(zip(ref["sop_class_uids"], sop_uids, ref["image_positions"], strict=True)):
        ds = Dataset()
        for k, v in {**study, **series}.items():
            if k == "SeriesNumber":
                ds.SeriesNumber = int(v) if str(v).strip().lstrip("-").isdigit() else None
            elif k != "SpecificCharacterSet" or v:
                setattr(ds, k, v)
        ds.SOPClassUID = cls or "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture when unknown
        ds.SOPInstanceUID = uid or _uid("voxflow", "slice", seed, str(i))
        ds.Rows, ds.Columns = int(ref["rows"]), int(ref["columns"])
        ds.PixelSpacing = [float(v) for v in ref["pixel_spacing"]]
        ds.ImageOrientationPatient = [float(v) for v in ref["image_orientation"]]
        ds.ImagePositionPatient = [float(v) for v in pos]
        if ref.get("slice_thickness"):
            ds.SliceThickness = float(ref["slice_thickness"])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        out.append(ds)
    return out


def _check_grid(geometry: Geometry, ref: Mapping[str, Any], case_id: str) -> None:
    """The label's grid must be the source series' grid (slices at the recorded positions)."""
    n = len(ref["image_positions"])
    want = (n, int(ref["rows"]), int(ref["columns"]))
    if tuple(geometry.shape_zyx) != want:
        raise GeometryMismatchError(
            f"a DICOM SEG must be written on the grid of its source series; case {case_id!r} has shape "
            f"{tuple(geometry.shape_zyx)} (z, y, x) but its DICOM series has {want}. Export the label on the "
            f"original grid (a prediction store is; a preprocessed store is not)."
        )
    d = np.asarray(geometry.direction_zyx, float)[::-1, ::-1]  # columns: physical x, y, z index axes (xyz)
    iop = np.asarray(ref["image_orientation"], float)
    pos = np.asarray(ref["image_positions"], float)
    origin_xyz = np.asarray(geometry.origin_zyx, float)[::-1]
    spacing_z = float(geometry.spacing_zyx[0])
    expected = origin_xyz + np.outer(np.arange(n) * spacing_z, d[:, 2])
    err = float(np.abs(pos - expected).max()) if n else 0.0
    if not np.allclose(iop, np.concatenate([d[:, 0], d[:, 1]]), atol=1e-4) or err > max(POS_TOL_MM, 0.01 * spacing_z):
        raise GeometryMismatchError(
            f"a DICOM SEG must be written on the grid of its source series; the geometry of case {case_id!r} "
            f"does not match the orientation/positions recorded from its DICOM slices (largest position "
            f"difference {err:.3g} mm). Export the array converted from that series."
        )


@dataclass(frozen=True)
class _Segment:
    number: int
    name: str
    values: tuple[int, ...]  # label values forming the segment


def _segments(labels: Mapping[str, Any], regions_class_order: Sequence[int] | None, case_id: str) -> list[_Segment]:
    """One segment per foreground class (or region), numbered by label (or region) value."""
    segs = []
    fg = [(k, v) for k, v in labels.items() if v != 0 and v != (0,)]
    if any(isinstance(v, (tuple, list)) for _, v in fg):
        order = list(regions_class_order or [])
        if len(order) != len(fg):
            raise ConversionError(
                f"a region-based dataset needs one regions_class_order value per region to write a DICOM SEG; "
                f"got {order} for regions {[k for k, _ in fg]} (case {case_id!r}). Fix dataset.json."
            )
        segs = [
            _Segment(int(n), k, tuple(int(x) for x in (v if isinstance(v, (tuple, list)) else (v,))))
            for n, (k, v) in zip(order, fg, strict=True)
        ]
    else:
        segs = [_Segment(int(v), k, (int(v),)) for k, v in fg]
    segs.sort(key=lambda s: s.number)
    numbers = [s.number for s in segs]
    if numbers != list(range(1, len(segs) + 1)):
        raise ConversionError(
            f"DICOM SEG segment numbers are the label values and must run 1, 2, ... without gaps; the dataset's "
            f"labels give {numbers} (case {case_id!r}). Renumber the labels consecutively (as nnU-Net requires)."
        )
    return segs


def _pixels(label: Any, geometry: Geometry, segs: Sequence[_Segment], case_id: str) -> np.ndarray:
    """The SEG's pixel data from ``label`` (Z, Y, X): the label values themselves when segment ``n`` is
    value ``n``, else one binary frame per segment on the last axis. Checks shape and declared values."""
    vol = np.asarray(label)
    if vol.shape != tuple(geometry.shape_zyx):
        raise GeometryMismatchError(
            f"the label of case {case_id!r} must have shape {geometry.shape_zyx}; got {vol.shape}."
        )
    known = {v for s in segs for v in s.values} | {0}
    found = set(np.unique(vol).tolist())
    if found - known:
        raise ConversionError(
            f"label values must be declared in the dataset labels; case {case_id!r} has "
            f"undeclared value(s) {sorted(found - known)}."
        )
    if any(len(s.values) > 1 for s in segs) or any(s.number != s.values[0] for s in segs):
        return np.stack([np.isin(vol, s.values) for s in segs], axis=-1).astype(np.uint8)
    return vol.astype(np.uint8 if vol.max(initial=0) < 256 else np.uint16)


def write_dicom_seg(
    label: Any,
    geometry: Geometry,
    reference: Mapping[str, Any] | None,
    path: str | Path,
    *,
    labels: Mapping[str, Any],
    case_id: str,
    regions_class_order: Sequence[int] | None = None,
    model_name: str | None = None,
    series_description: str | None = None,
    series_number: int = 300,
) -> Path:
    """Write ``label`` (Z, Y, X; numpy or dask) as one BINARY DICOM SEG file at ``path``.

    ``reference`` is the source record of the case (:func:`dicom_reference` of its attributes;
    ``None`` raises a :class:`ConversionError` naming the case). ``labels`` (and
    ``regions_class_order``) are the dataset's, as in dataset.json: segment ``n`` is the class of
    label value ``n``, named after it. ``model_name`` goes into the algorithm identification
    (AlgorithmName; voxflow and its version are AlgorithmSource/AlgorithmVersion). The label is
    read into memory once (a SEG is one file). The file appears only when complete.

    >>> # store = Store.open("prediction.zarr"); attrs = store.case_attrs("case1")
    >>> # write_dicom_seg(store.label("case1"), store.geometry("case1"), dicom_reference(attrs),
    >>> #                 "case1.dcm", labels=store.meta.labels, case_id="case1", model_name="3d_fullres")
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import voxflow

    if reference is None:
        raise ConversionError(
            f"a DICOM SEG can only be written for a case converted from a DICOM series; case {case_id!r} was "
            f"not (no DICOM source record in its attributes). Export it as NIfTI (--file-ending .nii.gz), or "
            f"convert the case from its DICOM files."
        )
    _check_grid(geometry, reference, case_id)
    segs = _segments(labels, regions_class_order, case_id)
    if not segs:
        raise ConversionError(
            f"a DICOM SEG needs at least one foreground class; the dataset labels {dict(labels)} "
            f"have none (case {case_id!r})."
        )
    pixels = _pixels(label, geometry, segs, case_id)
    algo = hd.AlgorithmIdentificationSequence(
        name=model_name or "voxflow",
        family=codes.cid7162.ArtificialIntelligence,
        version=voxflow.__version__,
        source="voxflow",
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s.number,
            segment_label=s.name[:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=hd.UID(),
            tracking_id=s.name[:64],
        )
        for s in segs
    ]
    sources = _source_datasets(reference, case_id)
    with warnings.catch_warnings():  # the source's own patient name form is not ours to fix
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = _segmentation(hd, sources, pixels, descriptions, model_name, case_id, series_description, series_number)
    out = Path(path)
    part = out.with_name(out.name + ".part")
    try:
        seg.save_as(str(part), enforce_file_format=True)
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)
    return out


def _segmentation(
    hd: Any,
    sources: list[Any],
    pixels: np.ndarray,
    descriptions: list[Any],
    model_name: str | None,
    case_id: str,
    series_description: str | None,
    series_number: int,
) -> Any:
    import voxflow

    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="voxflow",
        manufacturer_model_name=(model_name or "voxflow")[:64],
        software_versions=voxflow.__version__,
        device_serial_number="0",
        content_label="VOXFLOW",
        omit_empty_frames=False,
        content_description=(series_description or f"voxflow segmentation of {case_id}")[:64],
        series_description=(series_description or f"voxflow {model_name or 'segmentation'}")[:64],
    )


# ---------------------------------------------------------------------- from a store
def case_reference(store: Any, case_id: str, reference_store: Any | None = None) -> dict[str, Any] | None:
    """The DICOM source record of a case: its own attributes, else ``reference_store``'s case of that id."""
    ref = dicom_reference(store.case_attrs(case_id))
    if ref is None and reference_store is not None and case_id in reference_store.all_case_ids():
        ref = dicom_reference(reference_store.case_attrs(case_id))
    return ref


def _model_name(attrs: Mapping[str, Any]) -> str | None:
    configs = attrs.get("configurations")
    return "+".join(str(c) for c in configs) if isinstance(configs, list) and configs else None


def write_case_seg(
    store: Any,
    case_id: str,
    path: Path,
    *,
    array: str = "label",
    reference_store: Any | None = None,
    model_name: str | None = None,
) -> Path:
    """Write ``array`` of a store's case as a DICOM SEG (see :func:`write_dicom_seg`); the model name
    defaults to the configurations a prediction store records."""
    attrs = store.case_attrs(case_id)
    meta = store.meta
    return write_dicom_seg(
        store.zarr_array(case_id, array)[...],
        store.geometry(case_id),
        case_reference(store, case_id, reference_store),
        path,
        labels=meta.labels,
        regions_class_order=meta.regions_class_order,
        case_id=case_id,
        model_name=model_name or _model_name(attrs),
    )
