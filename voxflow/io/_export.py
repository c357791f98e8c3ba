"""Export store arrays back to image files, and summarise a store (``voxflow info``).

Export writes each case with the geometry recorded at conversion (spacing, origin, direction; a
2D source comes back as a 2D file), in the store's dtype: NIfTI, NRRD and MHA round-trip voxels
and geometry bit for bit. NIfTI (``.nii``, ``.nii.gz``) and NRRD files are streamed: SimpleITK's
own header (written for a one-voxel image of the same geometry and dtype, its size fields patched)
followed by the voxels slab by slab, so exporting needs memory for one slab, not the volume -- the
uncompressed bytes equal SimpleITK's whole-image write. Other formats (MHA: its header carries the
compressed size) are held in memory once while SimpleITK writes them. ``.dcm`` writes a DICOM SEG
per case (``_dicom_seg``), for cases converted from DICOM.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from dask.delayed import delayed

from voxflow._types import PathLikeStr
from voxflow.cluster import compute, scheduler_context
from voxflow.errors import CaseNotFoundError, ConversionError, StoreDamagedError
from voxflow.geometry import Geometry
from voxflow.io._dicom_seg import case_reference, write_case_seg
from voxflow.store import Store, is_checksummed, open_case

__all__ = ["export_store", "format_info", "store_info", "to_xarray"]

log = logging.getLogger(__name__)


def _as_store(store: Store | PathLikeStr) -> Store:
    return store if isinstance(store, Store) else Store.open(store)


def to_xarray(store: Store | PathLikeStr, case_id: str, *, name: str = "image") -> Any:
    """Lazy ``xarray.DataArray`` of one case (dims c, z, y, x; mm coordinates); see :func:`open_case`."""
    return open_case(_as_store(store), case_id, name=name)


def _sitk_image(volume: np.ndarray, geometry: Geometry) -> Any:
    """(Z, Y, X) numpy volume -> SimpleITK image with ``geometry`` (2D when the source was 2D)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(volume[0] if geometry.is_2d else volume))
    return geometry.apply_to_sitk(img)


_STREAMED_ENDINGS = (".nii", ".nii.gz", ".nrrd")
_SLAB_BYTES = 64 * 2**20


def _streamed_header(geometry: Geometry, dtype: np.dtype, shape_zyx: Sequence[int], ending: str) -> bytes | None:
    """SimpleITK's own header for a (Z, Y, X) volume of ``dtype`` on ``geometry``, without the volume:
    written for a one-voxel image, then its size fields set to (X, Y, Z) -- NIfTI-1 dim[1..3], NRRD
    ``sizes:`` (the only size-dependent fields). ``None`` when that cannot be done safely (NIfTI
    dims over int16, a header of another kind); the caller then writes with SimpleITK."""
    import SimpleITK as sitk

    xyz = tuple(int(n) for n in reversed(tuple(shape_zyx)))
    nifti = ending.startswith(".nii")
    if nifti and max(xyz) > 32767:
        return None
    with tempfile.TemporaryDirectory(prefix="voxflow-header-") as tmp:
        path = Path(tmp) / ("header.nii" if nifti else "header.nrrd")
        sitk.WriteImage(_sitk_image(np.zeros((1, 1, 1), dtype), geometry), str(path), not nifti)
        raw = path.read_bytes()
    if nifti:
        if struct.unpack_from("<i", raw, 0)[0] != 348 or struct.unpack_from("<h", raw, 40)[0] != 3:
            return None
        header = bytearray(raw[: int(struct.unpack_from("<f", raw, 108)[0])])
        struct.pack_into("<3h", header, 42, *xyz)
        return bytes(header)
    end = raw.find(b"\n\n")
    text = raw[: end + 2]
    if end < 0 or b"\nsizes: 1 1 1\n" not in text or b"\nencoding: gzip\n" not in text:
        return None
    return text.replace(b"\nsizes: 1 1 1\n", b"\nsizes: %d %d %d\n" % xyz)


def _write_streaming(arr: zarr.Array, channel: int | None, geometry: Geometry, path: Path, ending: str) -> bool:
    """Write ``arr`` (Z, Y, X), or channel ``channel`` of a (C, Z, Y, X) array, as NIfTI or NRRD
    (``ending``, one of ``_STREAMED_ENDINGS``) slab by slab; False (nothing written) when the header
    cannot be made this way. The file appears under its name only when complete (written as
    ``<name>.part``, then renamed)."""
    shape = tuple(int(n) for n in arr.shape[-3:])
    header = _streamed_header(geometry, arr.dtype, shape, ending)
    if header is None:
        return False
    slice_bytes = shape[1] * shape[2] * arr.dtype.itemsize
    step = max(1, min(int(arr.chunks[-3]), _SLAB_BYTES // max(slice_bytes, 1)))
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb") as raw:
            if ending == ".nrrd":  # NRRD: a plain text header, then gzip-encoded voxels
                raw.write(header)
            data: Any = (
                raw
                if ending == ".nii"
                else gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0)
            )
            if ending != ".nrrd":  # NIfTI: the header is part of the (.nii.gz: gzip) stream
                data.write(header)
            for z0 in range(0, shape[0], step):
                zs = slice(z0, min(z0 + step, shape[0]))
                slab = arr[zs] if channel is None else arr[channel, zs]
                data.write(np.ascontiguousarray(slab).tobytes())
            if data is not raw:
                data.close()
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return True


def _write_case(
    store_path: str,
    case_id: str,
    array: str,
    out_dir: str,
    file_ending: str,
    reference_store: str | None = None,
    model_name: str | None = None,
) -> list[str]:
    import SimpleITK as sitk

    store = Store.open(store_path)
    if file_ending.lower() == ".dcm":
        ref = Store.open(reference_store) if reference_store else None
        path = Path(out_dir) / f"{case_id}.dcm"
        return [str(write_case_seg(store, case_id, path, array=array, reference_store=ref, model_name=model_name))]
    arr = store.zarr_array(case_id, array)
    geometry = store.geometry(case_id)
    out = Path(out_dir)
    if arr.ndim == 3:
        targets: list[tuple[Path, int | None]] = [(out / f"{case_id}{file_ending}", None)]
    else:
        targets = [(out / f"{case_id}_{c:04d}{file_ending}", c) for c in range(arr.shape[0])]
    ending = file_ending.lower()
    stream = ending in _STREAMED_ENDINGS and not geometry.is_2d
    for path, channel in targets:
        if stream and _write_streaming(arr, channel, geometry, path, ending):
            continue
        vol = np.asarray(arr[...] if channel is None else arr[channel])
        sitk.WriteImage(_sitk_image(vol, geometry), str(path), True)
    return [str(p) for p, _ in targets]


def _check_seg_export(st: Store, ids: Sequence[str], array: str, reference: Store | None) -> None:
    """Before any work: a DICOM SEG export needs a label array and a DICOM source record per case."""
    for cid in ids:
        if case_reference(st, cid, reference) is None:
            hint = (
                f"nor does case {cid!r} of the reference store {reference.path}"
                if reference is not None
                else "pass --dicom-reference with the dataset store converted from the DICOM series"
            )
            raise ConversionError(
                f"a DICOM SEG can only be written for a case converted from a DICOM series; case {cid!r} in "
                f"{st.path} has no DICOM source record ({hint}). Export it as NIfTI instead (--file-ending .nii.gz)."
            )
        if st.zarr_array(cid, array).ndim != 3:
            raise ConversionError(
                f"a DICOM SEG holds a label (Z, Y, X); array {array!r} of case {cid!r} in "
                f"{st.path} is not one. Export --array label, or choose another file ending."
            )


def export_store(
    store: Store | PathLikeStr,
    out_dir: PathLikeStr,
    *,
    case_ids: Sequence[str] | None = None,
    file_ending: str = ".nii.gz",
    array: str = "label",
    scheduler: str = "threads",
    progress: bool = True,
    memory_limit: str | None = None,
    dicom_reference: Store | PathLikeStr | None = None,
    model_name: str | None = None,
) -> list[Path]:
    """Write ``array`` of each complete case to ``out_dir`` with the case's original geometry.

    Labels (Z, Y, X) become ``<case><file_ending>``; images and other (C, Z, Y, X) arrays become one
    file per channel, ``<case>_<CCCC><file_ending>`` (nnU-Net naming). Cases without ``array`` are
    skipped unless named in ``case_ids``. Returns the written paths.

    ``file_ending=".dcm"`` writes one DICOM SEG per case (see :func:`voxflow.io.write_dicom_seg`),
    referencing the DICOM series the case was converted from: recorded in the case itself (dataset
    stores, and prediction stores of DICOM inputs), else in the same case of ``dicom_reference``
    (a dataset store). ``model_name`` goes into the SEG's algorithm identification.
    """
    st = _as_store(store)
    out = Path(out_dir)
    if case_ids is None:
        ids = [c for c in st.case_ids() if st.has_array(c, array)]
    else:
        ids = list(case_ids)
        for cid in ids:
            if not st.has_array(cid, array):
                raise CaseNotFoundError(
                    f"case {cid!r} in {st.path} has no {array!r} array to export; choose another --array or case."
                )
            st.zarr_array(cid, array)  # raises for incomplete cases
    ref = None if dicom_reference is None else _as_store(dicom_reference)
    if file_ending.lower() == ".dcm":
        _check_seg_export(st, ids, array, ref)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [
        delayed(_write_case, pure=False)(
            str(st.path), cid, array, str(out), file_ending, None if ref is None else str(ref.path), model_name
        )
        for cid in ids
    ]
    with scheduler_context(scheduler, memory_limit=memory_limit):
        results = compute(*tasks, desc="export", progress=progress) if tasks else ()
    log.info("exported %s of %d case(s) to %s", array, len(ids), out)
    return [Path(p) for paths in results for p in paths]


# ---------------------------------------------------------------------- info
def _case_entry(st: Store, cid: str, verify: bool) -> dict[str, Any]:
    """One case of :func:`store_info`; ``problems`` maps an array (or ``(case)``) to what is wrong."""
    entry: dict[str, Any] = {"case_id": cid, "complete": False, "shape_zyx": None, "spacing_zyx": None, "problems": {}}
    try:
        attrs = st.case_attrs(cid)
        g = st.case_group(cid)
    except StoreDamagedError:
        entry["problems"] = {"(case)": "zarr.json is unreadable"}
        return entry
    geom = attrs.get("geometry", {})
    entry.update(
        complete=bool(attrs.get("complete", False)),
        shape_zyx=geom.get("shape_zyx"),
        spacing_zyx=geom.get("spacing_zyx"),
    )
    for name in ("image", "label", "probs"):
        try:
            arr = g[name] if name in g else None
        except (ValueError, KeyError, OSError):
            entry["problems"][name] = "zarr.json is unreadable"
            continue
        if isinstance(arr, zarr.Array):
            entry[f"{name}_dtype"] = str(arr.dtype)
            entry[f"{name}_shape"] = list(arr.shape)
            if is_checksummed(arr) and arr.nchunks_initialized != arr.nchunks:
                entry["problems"][name] = (
                    f"{arr.nchunks - arr.nchunks_initialized} of {arr.nchunks} chunk files missing"
                )
    if verify and entry["complete"]:
        entry["problems"].update(st.verify_case(cid))
    return entry


def store_info(store: Store | PathLikeStr, *, verify: bool = False) -> dict[str, Any]:
    """A JSON-able summary: metadata, size on disk, and per case shape, spacing, dtypes, status.

    A case's ``status`` is ``ok``, ``incomplete`` or ``damaged`` (unreadable metadata, missing chunk
    files; with ``verify``, also any chunk of a complete case that fails to decode or its checksum:
    every chunk is read, one at a time). ``damaged_cases`` lists the damaged ones."""
    st = _as_store(store)
    cases = []
    for cid in st.all_case_ids():
        entry = _case_entry(st, cid, verify)
        entry["status"] = "damaged" if entry["problems"] else "ok" if entry["complete"] else "incomplete"
        cases.append(entry)
    meta = st.meta
    return {
        "path": str(st.path),
        "kind": meta.kind,
        "name": meta.name,
        "channel_names": list(meta.channel_names),
        "labels": meta.to_dict()["labels"],
        "regions_class_order": meta.to_dict()["regions_class_order"],
        "file_ending": meta.file_ending,
        "n_cases": sum(c["status"] == "ok" for c in cases),
        "incomplete_cases": [c["case_id"] for c in cases if c["status"] == "incomplete"],
        "damaged_cases": [c["case_id"] for c in cases if c["status"] == "damaged"],
        "verified": verify,
        "size_on_disk_bytes": st.nbytes_on_disk(),
        "cases": cases,
    }


def _fmt_tuple(v: Any, fmt: str = "{}") -> str:
    return "-" if v is None else "x".join(fmt.format(x) for x in v)


def format_info(info: dict[str, Any], *, max_cases: int = 50) -> str:
    """Human-readable text of :func:`store_info`."""
    size = info["size_on_disk_bytes"]
    lines = [
        f"store     {info['path']}  ({info['kind']}, {size / 2**20:.1f} MiB on disk)",
        f"name      {info['name'] or '-'}",
        f"channels  {', '.join(info['channel_names'])}",
        f"labels    {', '.join(f'{k}={v}' for k, v in info['labels'].items())}",
        f"cases     {info['n_cases']} complete, {len(info['incomplete_cases'])} incomplete, "
        f"{len(info['damaged_cases'])} damaged{' (every chunk read and checked)' if info['verified'] else ''}",
    ]
    if info["regions_class_order"]:
        lines.append(f"regions   class order {info['regions_class_order']}")
    if info["incomplete_cases"]:
        lines.append(f"incomplete: {', '.join(info['incomplete_cases'])} (rerun the command that wrote them)")
    for c in info["cases"]:
        for name, problem in c["problems"].items():
            lines.append(f"DAMAGED: case {c['case_id']!r} array {name!r}: {problem}")
    if info["damaged_cases"]:
        lines.append("(rerun the command that wrote the store: it redoes damaged cases)")
    cases = info["cases"]
    if cases:
        shapes = np.array([c["shape_zyx"] for c in cases if c["shape_zyx"]], float)
        spac = np.array([c["spacing_zyx"] for c in cases if c["spacing_zyx"]], float)
        if len(shapes):
            lines.append(
                f"shape_zyx    median {_fmt_tuple(np.median(shapes, 0), '{:.0f}')}  "
                f"min {_fmt_tuple(shapes.min(0), '{:.0f}')}  max {_fmt_tuple(shapes.max(0), '{:.0f}')}"
            )
            lines.append(
                f"spacing_zyx  median {_fmt_tuple(np.median(spac, 0), '{:.3g}')} mm  "
                f"min {_fmt_tuple(spac.min(0), '{:.3g}')}  max {_fmt_tuple(spac.max(0), '{:.3g}')}"
            )
        w = max(len(c["case_id"]) for c in cases)
        lines.append("")
        lines.append(f"{'case':<{w}}  {'shape_zyx':<14} {'spacing_zyx (mm)':<22} {'image':<9} {'label':<7} status")
        for c in cases[:max_cases]:
            lines.append(
                f"{c['case_id']:<{w}}  {_fmt_tuple(c['shape_zyx']):<14} "
                f"{_fmt_tuple(c['spacing_zyx'], '{:.4g}'):<22} {c.get('image_dtype', '-'):<9} "
                f"{c.get('label_dtype', '-'):<7} {c['status'] if c['status'] == 'ok' else c['status'].upper()}"
            )
        if len(cases) > max_cases:
            lines.append(f"... {len(cases) - max_cases} more (use --json for all)")
    return "\n".join(lines)
