"""Segmentations to evaluate or postprocess: a folder of label files or a voxflow store.

Either source gives, per case id, a lazy ``(Z, Y, X)`` integer array and its :class:`Geometry`.
Files are read with SimpleITK (NIfTI, NRRD, MHA/MHD, TIFF, PNG, ...); a 2D file becomes a
``(1, Y, X)`` volume, as everywhere in voxflow. Case ids are file names without their extension.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from voxflow._types import PathLikeStr
from voxflow.errors import CaseNotFoundError, ConversionError, GeometryMismatchError, LayoutError
from voxflow.geometry import Geometry
from voxflow.store import DEFAULT_CHUNKS_ZYX, Store

__all__ = ["Segmentation", "case_id_of", "declared_labels", "open_segmentations", "pair_segmentations"]

log = logging.getLogger(__name__)
_EXTENSIONS = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
    ".tif",
    ".tiff",
    ".png",
    ".bmp",
    ".gipl",
    ".gipl.gz",
    ".hdr",
    ".vtk",
    ".img",
    ".jpg",
)


@dataclass(frozen=True)
class Segmentation:
    """One case's label map: lazy ``array`` (Z, Y, X), its ``geometry`` and where it came from."""

    case_id: str
    array: da.Array
    geometry: Geometry
    source: str


def case_id_of(path: Path) -> str | None:
    """Case id of a label file (its name without a known image extension), else ``None``."""
    name = path.name
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return None


def _read_label_file(path: str) -> np.ndarray:
    import SimpleITK as sitk

    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(path))
    except RuntimeError as e:
        raise ConversionError(f"cannot read label file {path}: {e}. Is it an image SimpleITK can open?") from e
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ConversionError(f"a label file must be 2D or 3D with one component; got shape {arr.shape} in {path}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ConversionError(f"labels must be integers; {path} holds non-integer values. Round or re-export it.")
    if arr.size and arr.min() < 0:
        raise ConversionError(f"labels must be >= 0; {path} holds {arr.min()}. Fix the file.")
    return arr.astype(np.int32, copy=False)


def _file_segmentation(path: Path, case_id: str, chunks: tuple[int, int, int]) -> Segmentation:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ConversionError(f"cannot read the header of {path}: {e}") from e
    geom = _geometry_from_reader(reader)
    arr = da.from_delayed(
        dask.delayed(_read_label_file, pure=True)(str(path)),
        shape=geom.shape_zyx,
        dtype=np.int32,
        meta=np.empty((0, 0, 0), np.int32),
    )
    return Segmentation(case_id, arr.rechunk(chunks), geom, str(path))


def _geometry_from_reader(reader: Any) -> Geometry:
    dim = reader.GetDimension()

    class _Info:  # duck-typed like a SimpleITK image for Geometry.from_sitk
        def GetDimension(self) -> int:  # noqa: N802
            return int(dim)

        def GetSize(self) -> tuple[int, ...]:  # noqa: N802
            return tuple(reader.GetSize())

        def GetSpacing(self) -> tuple[float, ...]:  # noqa: N802
            return tuple(reader.GetSpacing())

        def GetOrigin(self) -> tuple[float, ...]:  # noqa: N802
            return tuple(reader.GetOrigin())

        def GetDirection(self) -> tuple[float, ...]:  # noqa: N802
            return tuple(reader.GetDirection())

    return Geometry.from_sitk(_Info())


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def open_segmentations(
    source: Store | PathLikeStr, *, chunks: tuple[int, int, int] = DEFAULT_CHUNKS_ZYX
) -> dict[str, Segmentation]:
    """Label maps of every case in a store (its ``label`` arrays) or a folder of label files."""
    if isinstance(source, Store):
        return _store_segmentations(source)
    path = Path(source)
    if _is_store(path):
        return _store_segmentations(Store.open(path))
    if not path.is_dir():
        raise CaseNotFoundError(f"segmentations must be a folder of label files or a voxflow store; {path} is neither")
    out: dict[str, Segmentation] = {}
    for f in sorted(path.iterdir()):
        cid = case_id_of(f) if f.is_file() else None
        if cid is not None:
            out[cid] = _file_segmentation(f, cid, chunks)
    if not out:
        raise LayoutError(f"{path} holds no label files SimpleITK can read (.nii.gz, .nrrd, .mha, ...)")
    return out


def _store_segmentations(store: Store) -> dict[str, Segmentation]:
    out: dict[str, Segmentation] = {}
    for cid in store.case_ids():
        lab = store.label(cid)
        if lab is not None:
            out[cid] = Segmentation(cid, lab, store.geometry(cid), f"{store.path}#cases/{cid}/label")
    if not out:
        raise LayoutError(f"store {store.path} has no complete case with a 'label' array to evaluate")
    return out


def pair_segmentations(
    pred: Mapping[str, Segmentation], ref: Mapping[str, Segmentation]
) -> list[tuple[Segmentation, Segmentation]]:
    """Match predictions to references by case id; geometries must agree.

    Raises :class:`CaseNotFoundError` for a prediction without reference and
    :class:`GeometryMismatchError` when a pair's grids differ.
    """
    missing = sorted(set(pred) - set(ref))
    if missing:
        raise CaseNotFoundError(
            f"every prediction needs a reference with the same case id; no reference for {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} cases). Check the folders or case names."
        )
    extra = sorted(set(ref) - set(pred))
    if extra:
        log.info("%d reference cases have no prediction and are not evaluated (e.g. %s)", len(extra), extra[0])
    pairs = []
    for cid in sorted(pred):
        p, r = pred[cid], ref[cid]
        try:
            r.geometry.check_matches(p.geometry, what="prediction", case=cid)
        except GeometryMismatchError as e:
            raise GeometryMismatchError(f"{e} (prediction {p.source}, reference {r.source})") from None
        pairs.append((p, r))
    return pairs


def declared_labels(source: Store | PathLikeStr) -> dict[str, Any] | None:
    """Label names -> value or region declared by a store, or a ``dataset.json`` next to a folder."""
    if isinstance(source, Store):
        return dict(source.meta.labels)
    path = Path(source)
    if _is_store(path):
        try:
            return dict(Store.open(path).meta.labels)
        except LayoutError:
            return None
    for cand in (path / "dataset.json", path.parent / "dataset.json"):
        if cand.is_file():
            try:
                labels = json.loads(cand.read_text()).get("labels")
            except (OSError, ValueError):
                return None
            return dict(labels) if isinstance(labels, dict) else None
    return None
