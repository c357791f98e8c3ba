"""DICOM series: find, group, sort and pair them, and read them slab by slab.

Rules (each checked, with an error naming the folder and files when it does not hold):

* A file is DICOM when it carries the ``DICM`` preamble (any name, any extension).
* Slices are grouped into a series by (folder, SeriesInstanceUID): several series in one folder
  are told apart. SOPInstanceUID is *not* used (real series exist where every slice shares one).
* Slices of one series are sorted by ImagePositionPatient projected on the slice normal
  (ImageOrientationPatient row x column); the z spacing is the distance between consecutive
  positions -- never SliceThickness, which often differs (gaps or overlaps). All slices must have
  the same size and orientation, distinct positions and uniform spacing (a gap means a missing slice).
* Mask series (TCIA style): a series whose SeriesDescription contains "mask" (any case) is a
  label, paired with the one image series of identical geometry (preferring the same study
  folder). Its non-zero voxels become label 1 (``foreground``).
* DICOM SEG objects (SOP class Segmentation Storage) are labels of the image series their
  ReferencedSeriesSequence names (same FrameOfReferenceUID), segment numbers becoming label values
  (see ``_dicom_seg``). A SEG whose series is not in the tree is an error, not a skip.
* The series' Modality (CT, MR, PT, ...) is the channel name of the dataset.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voxflow.errors import ConversionError, GeometryMismatchError
from voxflow.geometry import Geometry
from voxflow.io._dicom_seg import SEG_SOP_CLASS_UID, series_reference, substitute_uid
from voxflow.io._dicom_seg_in import SegHeader, SegLabel, read_seg_header
from voxflow.io._volume import VolumeSource, geometry_from_sitk_values, read_error

__all__ = ["DicomSeries", "find_dicom_files", "is_dicom", "pair_masks", "pair_segs", "scan_dicom", "scan_dicom_series"]

log = logging.getLogger(__name__)

_TAGS = {
    "uid": "0020|000e",
    "ipp": "0020|0032",
    "iop": "0020|0037",
    "spacing": "0028|0030",
    "thickness": "0018|0050",
    "desc": "0008|103e",
    "number": "0020|0011",
    "rows": "0028|0010",
    "cols": "0028|0011",
    "modality": "0008|0060",
    "sop_class": "0008|0016",
    "frame_of_reference": "0020|0052",
}


def is_dicom(path: Path) -> bool:
    """True when ``path`` starts with the 128-byte preamble and the ``DICM`` magic."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def find_dicom_files(root: Path, *, limit: int | None = None) -> list[Path]:
    """DICOM files under ``root`` (recursive, sorted); stops after ``limit`` hits."""
    hits: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if is_dicom(p):
                hits.append(p)
                if limit is not None and len(hits) >= limit:
                    return hits
    return hits


def _floats(text: str, n: int, tag: str, path: Path) -> np.ndarray:
    try:
        vals = np.array([float(v) for v in text.strip().split("\\")], float)
    except ValueError:
        vals = np.zeros(0)
    if vals.size != n:
        raise ConversionError(
            f"DICOM tag {tag} must hold {n} numbers; got {text!r} in {str(path)!r}. "
            f"The file is not a usable image slice; remove it from the folder."
        )
    return vals


class _IsSeg(Exception):
    """Raised by the header reader for a DICOM Segmentation object (read by ``_dicom_seg``)."""


@dataclass
class _Slice:
    path: Path
    uid: str
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: np.ndarray
    rows: int
    cols: int
    desc: str
    number: str
    thickness: float
    pixel_id: int
    modality: str = ""
    frame_of_reference: str = ""


def _read_header(path: Path) -> _Slice:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
    except RuntimeError as e:
        raise read_error(path, e) from None

    def get(key: str, default: str = "") -> str:
        tag = _TAGS[key]
        return r.GetMetaData(tag).strip() if r.HasMetaDataKey(tag) else default

    size = r.GetSize()
    if get("sop_class") == SEG_SOP_CLASS_UID or get("modality").upper() == "SEG":
        raise _IsSeg(path)
    ipp = _floats(get("ipp"), 3, "ImagePositionPatient (0020,0032)", path)
    iop = _floats(get("iop", "1\\0\\0\\0\\1\\0"), 6, "ImageOrientationPatient (0020,0037)", path)
    sp = _floats(get("spacing", "1\\1"), 2, "PixelSpacing (0028,0030)", path)
    try:
        thickness = float(get("thickness", "1") or 1)
    except ValueError:
        thickness = 1.0
    return _Slice(
        path=path,
        uid=get("uid"),
        ipp=ipp,
        iop=iop,
        pixel_spacing=sp,
        rows=int(size[1]),
        cols=int(size[0]),
        desc=get("desc"),
        number=get("number"),
        thickness=thickness,
        pixel_id=r.GetPixelID(),
        modality=get("modality").upper(),
        frame_of_reference=get("frame_of_reference"),
    )


@dataclass
class DicomSeries(VolumeSource):
    """One DICOM series (one file per slice), sorted along its normal; reads slabs of files."""

    slices: list[_Slice]
    folder: Path
    uid: str
    description: str = ""
    number: str = ""
    is_mask: bool = False
    case: str | None = None
    _paths: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        import SimpleITK as sitk

        self._paths = [str(s.path) for s in self.slices]
        self.files = tuple(self._paths)
        self.n_channels = 1
        self.streamable = True
        self.dtype = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1, 1], self.slices[0].pixel_id)).dtype)
        self.geometry = self._geometry()

    def _where(self) -> str:
        return f"DICOM series {self.uid or '(no SeriesInstanceUID)'} in {str(self.folder)!r}"

    def _geometry(self) -> Geometry:
        first = self.slices[0]
        sizes = {(s.rows, s.cols) for s in self.slices}
        if len(sizes) > 1:
            raise ConversionError(
                f"all slices of a DICOM series must have the same size; got {sorted(sizes)} (rows, cols) in "
                f"{self._where()}. Move the slices of each size into their own folder."
            )
        if any(not np.allclose(s.iop, first.iop, atol=1e-4) for s in self.slices):
            raise ConversionError(
                f"all slices of a DICOM series must share ImageOrientationPatient; they differ in {self._where()}."
            )
        row, col = first.iop[:3], first.iop[3:]
        normal = np.cross(row, col)
        pos = np.array([float(s.ipp @ normal) for s in self.slices])
        order = np.argsort(pos, kind="stable")
        self.slices = [self.slices[i] for i in order]
        self._paths = [str(s.path) for s in self.slices]
        self.files = tuple(self._paths)
        pos = pos[order]
        dz = np.diff(pos)
        if len(dz) and dz.min() < 1e-4:
            i = int(np.argmin(dz))
            raise ConversionError(
                f"slices of a DICOM series must have distinct positions; {self._paths[i]!r} and "
                f"{self._paths[i + 1]!r} share ImagePositionPatient in {self._where()}. Remove duplicates."
            )
        if len(dz) and dz.max() - dz.min() > max(1e-3, 0.01 * dz.mean()):
            raise ConversionError(
                f"slice positions of a DICOM series must be evenly spaced; got spacings from {dz.min():.4g} to "
                f"{dz.max():.4g} mm in {self._where()} (a slice is probably missing)."
            )
        spacing_z = float(dz.mean()) if len(dz) else float(first.thickness or 1.0)
        direction = np.column_stack([row, col, normal]).ravel()
        spacing_xyz = (first.pixel_spacing[1], first.pixel_spacing[0], spacing_z)
        return geometry_from_sitk_values(
            (first.cols, first.rows, len(self.slices)), spacing_xyz, self.slices[0].ipp, direction
        )

    def read(self, z0: int, z1: int) -> np.ndarray:
        import SimpleITK as sitk

        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(self._paths[z0:z1])
        try:
            image = reader.Execute()
        except RuntimeError as e:
            raise read_error(Path(self._paths[z0]).parent, e, self.case) from None
        arr = sitk.GetArrayFromImage(image)
        if arr.ndim == 2:
            arr = arr[None]
        return arr[None].astype(self.dtype, copy=False)

    def describe(self) -> str:
        return f"{self._where()} ({len(self._paths)} files)"

    @property
    def modality(self) -> str:
        """DICOM Modality of the series (CT, MR, PT, ...; "" when the files do not say)."""
        return self.slices[0].modality

    @property
    def frame_of_reference(self) -> str:
        return self.slices[0].frame_of_reference

    def referenced_uids(self) -> tuple[str, str]:
        """(SeriesInstanceUID, FrameOfReferenceUID) as a voxflow SEG of this series references them:
        the series' own, or for files anonymised without them the substitutes the SEG writer uses."""
        uid, frame = self.uid, self.frame_of_reference
        if not (uid and frame):
            first = series_reference(self._paths[:1])["sop_instance_uids"][0]
            uid = uid or substitute_uid("SeriesInstanceUID", first)
            frame = frame or substitute_uid("FrameOfReferenceUID", first)
        return uid, frame

    def dicom_reference(self) -> dict[str, Any]:
        """What a DICOM SEG of this series must reference (UIDs per slice, in z order); see ``_dicom_seg``."""
        return series_reference(self._paths)


def scan_dicom_series(root: Path, files: list[Path] | None = None) -> list[DicomSeries]:
    """Every DICOM image series under ``root``, grouped by (folder, SeriesInstanceUID); SEGs left out."""
    return scan_dicom(root, files)[0]


def scan_dicom(root: Path, files: list[Path] | None = None) -> tuple[list[DicomSeries], list[SegHeader]]:
    """Every DICOM image series under ``root`` (as :func:`scan_dicom_series`) and every DICOM SEG."""
    groups: dict[tuple[Path, str], list[_Slice]] = defaultdict(list)
    segs: list[SegHeader] = []
    for path in files if files is not None else find_dicom_files(root):
        try:
            s = _read_header(path)
        except _IsSeg:
            segs.append(read_seg_header(path))
            continue
        groups[(path.parent, s.uid)].append(s)
    series = []
    for (folder, uid), slices in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        desc = slices[0].desc
        series.append(
            DicomSeries(
                slices=slices,
                folder=folder,
                uid=uid,
                description=desc,
                number=slices[0].number,
                is_mask="mask" in desc.lower(),
            )
        )
    return series, segs


def _matches(a: Geometry, b: Geometry) -> bool:
    try:
        a.check_matches(b)
    except GeometryMismatchError:
        return False
    return True


def pair_masks(series: list[DicomSeries]) -> list[tuple[DicomSeries, DicomSeries | None]]:
    """(image series, its mask series or None) pairs; see the module docstring for the rule."""
    images = [s for s in series if not s.is_mask]
    masks = [s for s in series if s.is_mask]
    pairs: dict[int, DicomSeries] = {}
    for m in masks:
        cands = [i for i, s in enumerate(images) if _matches(s.geometry, m.geometry)]
        if len(cands) > 1:
            cands = [i for i in cands if images[i].folder.parent == m.folder.parent] or cands
        if len(cands) != 1:
            found = "no" if not cands else f"{len(cands)}"
            raise ConversionError(
                f"a DICOM mask series must have the geometry of exactly one image series; found {found} for "
                f"mask {m.describe()}. Keep each mask next to its image series (same study folder)."
            )
        if cands[0] in pairs:
            raise ConversionError(
                f"an image series may have one mask series; {images[cands[0]].describe()} matches both "
                f"{pairs[cands[0]].describe()} and {m.describe()}. Merge the masks into one label series."
            )
        pairs[cands[0]] = m
    return [(s, pairs.get(i)) for i, s in enumerate(images)]


def pair_segs(
    pairs: list[tuple[DicomSeries, DicomSeries | None]], segs: list[SegHeader]
) -> list[tuple[DicomSeries, DicomSeries | SegHeader | None]]:
    """(image series, its label: mask series, SEG header or None) pairs: each SEG labels the one image
    series its ReferencedSeriesSequence names, in the same frame of reference."""
    by_uid: dict[str, list[int]] = defaultdict(list)
    frames: dict[int, str] = {}
    for i, (img, _) in enumerate(pairs):
        uid, frames[i] = img.referenced_uids() if segs else (img.uid, img.frame_of_reference)
        by_uid[uid].append(i)
    out: list[tuple[DicomSeries, DicomSeries | SegHeader | None]] = list(pairs)
    for seg in segs:
        hits = sorted({i for uid in seg.referenced_series for i in by_uid.get(uid, [])})
        if len(hits) > 1:
            near = [
                i
                for i in hits
                if pairs[i][0].folder.parent == seg.path.parent.parent or pairs[i][0].folder == seg.path.parent
            ]
            hits = near if len(near) == 1 else hits
        if len(hits) != 1:
            what = "none is" if not hits else f"{len(hits)} are"
            raise ConversionError(
                f"a DICOM SEG must reference exactly one image series of the tree; {seg.describe()} references "
                f"series {list(seg.referenced_series) or '(none)'} and {what} in the tree. Put the SEG next to its "
                f"image series, or remove it."
            )
        img, label = out[hits[0]]
        if seg.frame_of_reference != frames[hits[0]]:
            raise ConversionError(
                f"a DICOM SEG must share the FrameOfReferenceUID of the image series it references; "
                f"{seg.describe()} has {seg.frame_of_reference!r}, {img.describe()} has "
                f"{frames[hits[0]]!r}. The SEG was made for other images: remove it or fix its references."
            )
        if label is not None:
            other = label.describe()
            raise ConversionError(
                f"an image series may have one label (mask series or SEG); {img.describe()} has both {other} and "
                f"{seg.describe()}. Merge them into one SEG or remove one."
            )
        out[hits[0]] = (img, seg)
    return out


def seg_label(seg: SegHeader, image: DicomSeries, regions_class_order: tuple[int, ...] | None) -> SegLabel:
    """The SEG as the label volume of ``image`` (its frames placed on the image's slices)."""
    first = image.slices[0]
    return SegLabel(
        header=seg,
        image_geometry=image.geometry,
        slice_positions=np.array([s.ipp for s in image.slices]),
        image_orientation=np.asarray(first.iop, float),
        image_pixel_spacing=np.asarray(first.pixel_spacing),
        regions_class_order=regions_class_order,
    )


_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def series_case_ids(root: Path, pairs: Sequence[tuple[DicomSeries, Any]]) -> list[str]:
    """Case id per image series: its folder relative to ``root`` (sanitised), plus ``_s<SeriesNumber>``
    when several image series share a folder (``_<SeriesInstanceUID>`` if their numbers clash)."""
    per_folder: dict[Path, list[DicomSeries]] = defaultdict(list)
    for s, _ in pairs:
        per_folder[s.folder].append(s)
    ids = []
    for s, _ in pairs:
        rel = s.folder.relative_to(root) if s.folder != root else Path(root.name)
        cid = _BAD.sub("_", "_".join(rel.parts)).strip("._-") or "series"
        siblings = per_folder[s.folder]
        if len(siblings) > 1:
            numbers = [x.number for x in siblings]
            unique = s.number and numbers.count(s.number) == 1
            cid += f"_s{_BAD.sub('_', s.number)}" if unique else f"_{_BAD.sub('_', s.uid)}"
        ids.append(cid)
    return ids
