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
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voxflow.errors import ConversionError, GeometryMismatchError
from voxflow.geometry import Geometry
from voxflow.io._volume import VolumeSource, geometry_from_sitk_values, read_error

__all__ = ["DicomSeries", "find_dicom_files", "is_dicom", "pair_masks", "scan_dicom_series"]

log = logging.getLogger(__name__)

_TAGS = {"uid": "0020|000e", "ipp": "0020|0032", "iop": "0020|0037", "spacing": "0028|0030",
         "thickness": "0018|0050", "desc": "0008|103e", "number": "0020|0011", "rows": "0028|0010",
         "cols": "0028|0011"}


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
        raise ConversionError(f"DICOM tag {tag} must hold {n} numbers; got {text!r} in {str(path)!r}. "
                              f"The file is not a usable image slice; remove it from the folder.")
    return vals


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
    ipp = _floats(get("ipp"), 3, "ImagePositionPatient (0020,0032)", path)
    iop = _floats(get("iop", "1\\0\\0\\0\\1\\0"), 6, "ImageOrientationPatient (0020,0037)", path)
    sp = _floats(get("spacing", "1\\1"), 2, "PixelSpacing (0028,0030)", path)
    try:
        thickness = float(get("thickness", "1") or 1)
    except ValueError:
        thickness = 1.0
    return _Slice(path=path, uid=get("uid"), ipp=ipp, iop=iop, pixel_spacing=sp, rows=int(size[1]),
                  cols=int(size[0]), desc=get("desc"), number=get("number"), thickness=thickness,
                  pixel_id=r.GetPixelID())


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
            raise ConversionError(f"all slices of a DICOM series must share ImageOrientationPatient; they differ "
                                  f"in {self._where()}.")
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
                f"{self._paths[i + 1]!r} share ImagePositionPatient in {self._where()}. Remove duplicates.")
        if len(dz) and dz.max() - dz.min() > max(1e-3, 0.01 * dz.mean()):
            raise ConversionError(
                f"slice positions of a DICOM series must be evenly spaced; got spacings from {dz.min():.4g} to "
                f"{dz.max():.4g} mm in {self._where()} (a slice is probably missing).")
        spacing_z = float(dz.mean()) if len(dz) else float(first.thickness or 1.0)
        direction = np.column_stack([row, col, normal]).ravel()
        spacing_xyz = (first.pixel_spacing[1], first.pixel_spacing[0], spacing_z)
        return geometry_from_sitk_values((first.cols, first.rows, len(self.slices)), spacing_xyz,
                                         self.slices[0].ipp, direction)

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


def scan_dicom_series(root: Path, files: list[Path] | None = None) -> list[DicomSeries]:
    """Every DICOM series under ``root``, grouped by (folder, SeriesInstanceUID)."""
    groups: dict[tuple[Path, str], list[_Slice]] = defaultdict(list)
    for path in files if files is not None else find_dicom_files(root):
        s = _read_header(path)
        groups[(path.parent, s.uid)].append(s)
    series = []
    for (folder, uid), slices in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        desc = slices[0].desc
        series.append(DicomSeries(slices=slices, folder=folder, uid=uid, description=desc,
                                  number=slices[0].number, is_mask="mask" in desc.lower()))
    return series


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
                f"mask {m.describe()}. Keep each mask next to its image series (same study folder).")
        if cands[0] in pairs:
            raise ConversionError(
                f"an image series may have one mask series; {images[cands[0]].describe()} matches both "
                f"{pairs[cands[0]].describe()} and {m.describe()}. Merge the masks into one label series.")
        pairs[cands[0]] = m
    return [(s, pairs.get(i)) for i, s in enumerate(images)]


_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def series_case_ids(root: Path, pairs: list[tuple[DicomSeries, Any]]) -> list[str]:
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
