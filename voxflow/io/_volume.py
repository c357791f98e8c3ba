"""Volume readers: one image file, DICOM series, TIFF stack or slice folder, read in z slabs.

Every reader knows its :class:`~voxflow.geometry.Geometry` (from headers only), its dtype and
channel count, and reads rows ``z0:z1`` as a (C, Z', Y, X) array. ``streamable`` says whether a
slab read touches only that slab: true for uncompressed NIfTI/MHA/MHD/NRRD (SimpleITK region
reading), DICOM series (one file per slice), TIFF stacks and slice folders; false for compressed
files such as ``.nii.gz``, which can only be decompressed whole.

A gzip-compressed file is checked before it is read (SimpleITK reads a truncated ``.nii.gz`` as
complete, zero-filled): its gzip stream must end with a valid CRC and length trailer, and a NIfTI
stream must hold at least the bytes its header promises (``vox_offset + voxels * bitpix / 8``).
The check streams the file once (1 MiB at a time, bounded memory) beside SimpleITK's own read.

Note: SimpleITK's NIfTI reader turns NaN voxels into 0 as it reads, so NaN/Inf can only be
detected (and are refused) in the other formats (NRRD, MHA, TIFF, ...).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from voxflow.errors import ConversionError
from voxflow.geometry import Geometry

__all__ = ["SitkFile", "SliceStack", "VolumeSource", "check_gzip_stream", "read_error"]

_STREAM_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".nii")


def read_error(path: Path | str, exc: BaseException, case: str | None = None) -> ConversionError:
    """A ConversionError for a file SimpleITK/tifffile could not read (unreadable or truncated)."""
    where = f" for case {case!r}" if case else ""
    msg = str(exc).strip().splitlines()
    detail = msg[-1] if msg else type(exc).__name__
    if isinstance(exc, MemoryError) or "bad_alloc" in str(exc) or "allocate memory" in str(exc):
        return ConversionError(
            f"reading an image must fit in memory; ran out of memory reading {str(path)!r}{where} ({detail}). "
            f"Lower --max-memory so that volumes stream in thinner slabs, use a streamable format "
            f"(.nii, .mha, .nrrd, DICOM, TIFF), or run on a machine with more memory."
        )
    return ConversionError(
        f"image files must be readable and complete; could not read {str(path)!r}{where} ({detail}). "
        f"Check that the file is not truncated or corrupt, or remove the case from the source."
    )


class VolumeSource:
    """Base class: a (C, Z, Y, X) volume read in z slabs. Subclasses set the attributes below."""

    geometry: Geometry
    dtype: np.dtype
    n_channels: int
    streamable: bool
    files: tuple[str, ...]
    ndim: int = 3  # spatial dimensions of the file: 2 for a 2D image (read as 1 x Y x X)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.geometry.shape_zyx)) * self.n_channels * self.dtype.itemsize

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Rows ``z0:z1`` as (C, z1 - z0, Y, X) in :attr:`dtype`."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.files[0] if len(self.files) == 1 else f"{Path(self.files[0]).parent} ({len(self.files)} files)"


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


_GZ_IN, _GZ_OUT = 1 << 20, 4 << 20  # bytes read / decompressed per step of check_gzip_stream


def _nifti_promised_bytes(head: bytes) -> int | None:
    """``vox_offset + voxels * bitpix / 8`` from the first bytes of a NIfTI-1/2 stream (None: not NIfTI)."""
    for order in "<>":
        size = struct.unpack_from(order + "i", head, 0)[0] if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348:
            dims = struct.unpack_from(order + "8h", head, 40)
            bitpix = struct.unpack_from(order + "h", head, 72)[0]
            offset = int(struct.unpack_from(order + "f", head, 108)[0])
            break
        if size == 540 and len(head) >= 540:
            dims = struct.unpack_from(order + "8q", head, 16)
            bitpix = struct.unpack_from(order + "h", head, 14)[0]
            offset = int(struct.unpack_from(order + "q", head, 168)[0])
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or min(dims[1 : 1 + dims[0]]) < 0:
        return None
    return max(offset, size) + int(np.prod(dims[1 : 1 + dims[0]], dtype=np.int64)) * int(bitpix) // 8


def check_gzip_stream(path: Path | str, *, case: str | None = None) -> int:
    """Decompress a gzip file once, streaming, and return its uncompressed size in bytes.

    Memory: 1 MiB of compressed input and at most 4 MiB of output at a time. zlib checks each
    member's CRC-32 and length trailer itself. Raises :class:`ConversionError` naming the file when
    the stream is cut short or fails its CRC, or (NIfTI) holds fewer bytes than its header promises.
    """
    where = f" for case {case!r}" if case else ""
    total, head = 0, b""
    try:
        with open(path, "rb") as f:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data = f.read(_GZ_IN)
            if not data:
                raise EOFError("the file is empty")
            while True:
                out = d.decompress(data, _GZ_OUT)
                total += len(out)
                if len(head) < 540:
                    head += out[: 540 - len(head)]
                data = d.unconsumed_tail
                if d.eof:  # end of one gzip member: another may follow (concatenated gzip)
                    rest = d.unused_data or f.read(_GZ_IN)
                    if not rest.strip(b"\0"):
                        break
                    d, data = zlib.decompressobj(16 + zlib.MAX_WBITS), rest
                elif not data:
                    data = f.read(_GZ_IN)
                    if not data and not out:  # input and zlib's buffered output both exhausted
                        raise EOFError("the compressed data ends before the end-of-stream marker")
    except (EOFError, zlib.error, OSError) as e:
        raise ConversionError(
            f"gzip-compressed image files must be complete; {str(path)!r}{where} is cut short or corrupt "
            f"({type(e).__name__}: {e}). Copy or export it again."
        ) from None
    promised = _nifti_promised_bytes(head)
    if promised is not None and total < promised:
        raise ConversionError(
            f"image files must hold every voxel their header declares; {str(path)!r}{where} decompresses to "
            f"{total} bytes but its NIfTI header promises {promised} (the file is truncated). "
            f"Copy or export it again."
        )
    return total


def _components_first(arr: np.ndarray, image: Any) -> np.ndarray:
    """(Z, Y, X[, comp]) or (T, Z, Y, X) or (Y, X[, comp]) sitk array -> (C, Z, Y, X)."""
    dim = image.GetDimension()
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None] if dim != 4 else arr
    if dim == 2:
        arr = arr[:, None]
    return arr


@dataclass
class SitkFile(VolumeSource):
    """One file SimpleITK reads (NIfTI, NRRD, MHA, PNG, ...; 4D NIfTI as channels)."""

    path: Path
    case: str | None = None

    def __post_init__(self) -> None:
        import SimpleITK as sitk

        self.path = Path(self.path)
        if not self.path.is_file():
            raise ConversionError(
                f"an image file must exist; {str(self.path)!r} is missing"
                f"{f' for case {self.case!r}' if self.case else ''}."
            )
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(self.path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise read_error(self.path, e, self.case) from None
        dim = reader.GetDimension()
        size = reader.GetSize()
        ncomp = reader.GetNumberOfComponents()
        self.n_channels = int(size[3]) if dim == 4 else int(ncomp)
        if dim == 4 and ncomp > 1:
            raise ConversionError(f"4D images must have scalar pixels; got {ncomp} components in {str(self.path)!r}.")
        self.dtype = _dtype_of_pixel_id(reader.GetPixelID())
        self.ndim = 2 if dim == 2 else 3
        self.geometry = _geometry_from_reader(reader)
        self.files = (str(self.path),)
        gz = self.path.name.endswith(".gz") or _is_gzip(self.path)
        self.streamable = dim == 3 and not gz and self.path.name.lower().endswith(_STREAM_SUFFIXES)
        self._gzip = gz
        self._gzip_checked = False
        if not gz:
            self._check_size()

    def _check_size(self) -> None:
        """Uncompressed single-file formats must hold all voxel bytes (SimpleITK may not notice)."""
        name = self.path.name.lower()
        if not name.endswith((".nii", ".mha", ".nrrd")):
            return
        head = self.path.open("rb").read(4096)
        if name.endswith(".mha") and re.search(rb"CompressedData\s*=\s*True", head):
            return
        if name.endswith(".nrrd") and not re.search(rb"encoding:\s*raw", head):
            return
        header = 348 if name.endswith(".nii") else 0
        have = self.path.stat().st_size
        if have < header + self.nbytes:
            raise ConversionError(
                f"image files must be complete; {str(self.path)!r}{f' for case {self.case!r}' if self.case else ''} "
                f"holds {have} bytes but its voxels need {self.nbytes} (the file is truncated). "
                f"Copy or export it again."
            )

    def read(self, z0: int, z1: int) -> np.ndarray:
        import SimpleITK as sitk

        if self._gzip and not self._gzip_checked:
            check_gzip_stream(self.path, case=self.case)
            self._gzip_checked = True
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(self.path))
        full = (z0, z1) == (0, self.geometry.shape_zyx[0])
        try:
            if not full:
                if not self.streamable:
                    raise ConversionError(f"{str(self.path)!r} cannot be read in slabs")
                nx, ny = self.geometry.shape_zyx[2], self.geometry.shape_zyx[1]
                reader.SetExtractIndex((0, 0, int(z0)))
                reader.SetExtractSize((int(nx), int(ny), int(z1 - z0)))
            image = reader.Execute()
        except RuntimeError as e:
            raise read_error(self.path, e, self.case) from None
        arr = _components_first(sitk.GetArrayFromImage(image), image)
        return arr.astype(self.dtype, copy=False)


def _dtype_of_pixel_id(pixel_id: int) -> np.dtype:
    import SimpleITK as sitk

    return np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype)


def _geometry_from_reader(reader: Any) -> Geometry:
    """Geometry from a SimpleITK reader's header information (no pixel data read)."""
    import SimpleITK as sitk

    dim = reader.GetDimension()
    n = min(dim, 3)
    probe = sitk.Image([1] * n, sitk.sitkUInt8)
    probe.SetSpacing(reader.GetSpacing()[:n])
    probe.SetOrigin(reader.GetOrigin()[:n])
    direction = np.asarray(reader.GetDirection(), float).reshape(dim, dim)[:n, :n]
    probe.SetDirection(tuple(direction.ravel()))
    geom = Geometry.from_sitk(probe)
    size = reader.GetSize()
    shape = (1, size[1], size[0]) if n == 2 else (size[2], size[1], size[0])
    return geom.with_shape(shape)


def geometry_from_sitk_values(
    size_xyz: Sequence[int], spacing_xyz: ArrayLike, origin_xyz: ArrayLike, direction_xyz: ArrayLike
) -> Geometry:
    """Geometry from SimpleITK-order values (via :meth:`Geometry.from_sitk`, the one conversion)."""
    import SimpleITK as sitk

    probe = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    probe.SetSpacing(tuple(float(s) for s in np.ravel(spacing_xyz)))
    probe.SetOrigin(tuple(float(o) for o in np.ravel(origin_xyz)))
    probe.SetDirection(tuple(float(d) for d in np.ravel(direction_xyz)))
    return Geometry.from_sitk(probe).with_shape((size_xyz[2], size_xyz[1], size_xyz[0]))


@dataclass
class SliceStack(VolumeSource):
    """A volume made of 2D slices: a multi-page TIFF, or one 2D file per slice (PNG/TIFF/...).

    Spacing is 1 mm unless ``spacing_zyx`` is given (or read from ImageJ TIFF metadata).
    """

    paths: tuple[Path, ...]
    spacing_zyx: tuple[float, float, float] | None = None
    case: str | None = None

    def __post_init__(self) -> None:
        self.paths = tuple(Path(p) for p in self.paths)
        self.files = tuple(str(p) for p in self.paths)
        self.streamable = True
        self._multipage = len(self.paths) == 1
        first = self._read_pages(0, 1) if self._multipage else self._read_file(self.paths[0])[None]
        if first.ndim not in (3, 4):
            raise ConversionError(f"slices must be 2D images; got shape {first.shape[1:]} in {self.files[0]!r}.")
        self.n_channels = first.shape[-1] if first.ndim == 4 else 1
        self.dtype = first.dtype
        nz = self._n_pages() if self._multipage else len(self.paths)
        self.ndim = 2 if nz == 1 else 3
        spacing = self.spacing_zyx or self._tiff_spacing() or (1.0, 1.0, 1.0)
        self.geometry = Geometry(shape_zyx=(nz, first.shape[1], first.shape[2]), spacing_zyx=spacing)

    def _n_pages(self) -> int:
        import tifffile

        with tifffile.TiffFile(self.paths[0]) as tf:
            return len(tf.pages)

    def _tiff_spacing(self) -> tuple[float, float, float] | None:
        if not self.paths[0].suffix.lower().startswith(".tif"):
            return None
        import tifffile

        try:
            with tifffile.TiffFile(self.paths[0]) as tf:
                ij = tf.imagej_metadata or {}
                page: Any = tf.pages[0]
                xr = page.tags.get("XResolution")
                yr = page.tags.get("YResolution")
                if not ij and xr is None:
                    return None
                sx = xr.value[1] / xr.value[0] if xr is not None and xr.value[0] else 1.0
                sy = yr.value[1] / yr.value[0] if yr is not None and yr.value[0] else 1.0
                return (float(ij.get("spacing", 1.0)), float(sy), float(sx))
        except Exception:  # noqa: BLE001 - metadata is optional; geometry then defaults to 1 mm
            return None

    def _read_file(self, path: Path) -> np.ndarray:
        try:
            if path.suffix.lower() in (".tif", ".tiff"):
                import tifffile

                return np.asarray(tifffile.imread(path))
            import SimpleITK as sitk

            return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        except Exception as e:  # noqa: BLE001 - tifffile/SimpleITK raise many types for corrupt files
            raise read_error(path, e, self.case) from None

    def _read_pages(self, z0: int, z1: int) -> np.ndarray:
        import tifffile

        try:
            with tifffile.TiffFile(self.paths[0]) as tf:
                return np.stack([tf.pages[i].asarray() for i in range(z0, z1)])
        except Exception as e:  # noqa: BLE001
            raise read_error(self.paths[0], e, self.case) from None

    def read(self, z0: int, z1: int) -> np.ndarray:
        if self._multipage:
            arr = self._read_pages(z0, z1)
        else:
            slices = [self._read_file(p) for p in self.paths[z0:z1]]
            shapes = {s.shape for s in slices}
            if len(shapes) > 1 or slices[0].shape[:2] != self.geometry.shape_zyx[1:]:
                raise ConversionError(
                    f"all slices of a stack must have the same size; got {sorted(shapes)} in "
                    f"{str(self.paths[0].parent)!r}."
                )
            arr = np.stack(slices)
        arr = np.moveaxis(arr, -1, 0) if arr.ndim == 4 else arr[None]
        return arr.astype(self.dtype, copy=False)


def gzip_hint(src: VolumeSource) -> str:
    name = src.files[0]
    if name.endswith(".gz") or (Path(name).is_file() and _is_gzip(Path(name))):
        return (
            " It is gzip-compressed (e.g. .nii.gz), which cannot be read in parts: decompress it "
            "(`gunzip`, giving .nii) or convert it to .mha/.nrrd so that it streams slab by slab"
        )
    return " This format cannot be read in parts"
