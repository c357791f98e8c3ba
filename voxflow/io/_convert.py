"""``convert``: any supported source -> voxflow dataset store, cases in parallel, volumes in slabs.

How a case is written:

1. *Plan* (headers only): open every channel and the label, check channel count and that all of
   them share one grid (:meth:`Geometry.check_matches`), and choose the slab height. A volume
   whose format streams (uncompressed NIfTI/MHA/NRRD, DICOM, TIFF) is read ``slab_z`` rows at a
   time, so memory stays bounded by ``max_memory_bytes`` whatever its size. A compressed file
   (``.nii.gz``) must be decompressed whole: if it does not fit, the case fails with an error
   saying so and how to make it stream.
2. *Write*: one Dask task per slab (slab boundaries on chunk boundaries, so no two tasks touch one
   Zarr chunk), checking images for NaN/Inf and labels for non-integer or undeclared values.
3. *Finish*: one task per case marks it complete only if every slab succeeded.

A failing case never stops the others; at the end a :class:`ConversionError` lists every failure.
Complete cases are skipped on a rerun; incomplete ones, ones with damaged metadata and ones whose
source files changed since (size or mtime in ns, recorded per file in the case's ``provenance``)
are redone (``overwrite=True`` redoes all). One writer at a time: the store's lock file
(``<dst>.lock``) is held while converting.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
from dask.delayed import delayed

from voxflow._lock import locked, store_lock_file
from voxflow._types import PathLikeStr
from voxflow.cluster import compute, compute_cases, is_small_case, scheduler_context, stage_bar
from voxflow.errors import ConversionError, GeometryMismatchError, VoxflowError
from voxflow.io._sources import CaseSpec, DatasetSource, load_source
from voxflow.io._volume import VolumeSource, gzip_hint
from voxflow.store import DEFAULT_CHUNKS_ZYX, DatasetMeta, Store, label_dtype_for, open_array_for_write

__all__ = ["convert", "default_max_memory", "file_stats"]

log = logging.getLogger(__name__)
_COPIES = 3  # read buffer + dtype copy + codec buffers, per slab in flight


def default_max_memory() -> int:
    """Half of the memory available now, in bytes."""
    import psutil

    return int(psutil.virtual_memory().available // 2)


def _n_workers() -> int:
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


@dataclass
class _CasePlan:
    case: CaseSpec
    images: list[VolumeSource]
    label: VolumeSource | None
    dtype: np.dtype
    slab_z: int


def _check_grid(ref: VolumeSource, other: VolumeSource, what: str, case: str) -> None:
    try:
        ref.geometry.check_matches(other.geometry, what=what, case=case)
    except GeometryMismatchError as e:
        raise GeometryMismatchError(
            f"{e} File {other.describe()!r} vs image {ref.describe()!r}. Resample it onto the image grid or "
            f"fix its header."
        ) from None


def _plan_case(case: CaseSpec, n_channels: int, chunks_zyx: Sequence[int], max_memory: int) -> _CasePlan:
    images = [ref.open(case.case_id) for ref in case.images]
    label = case.label.open(case.case_id) if case.label is not None else None
    got = sum(s.n_channels for s in images)
    if got != n_channels:
        raise ConversionError(
            f"a case must have {n_channels} channel(s) as declared; got {got} for case "
            f"{case.case_id!r} (files {[s.describe() for s in images]})."
        )
    for i, s in enumerate(images[1:], start=1):
        _check_grid(images[0], s, f"channel {i}", case.case_id)
    if label is not None:
        _check_grid(images[0], label, "label", case.case_id)
    vols = images + ([label] if label is not None else [])
    nz = images[0].geometry.shape_zyx[0]
    row_bytes = sum(v.nbytes for v in vols) // nz
    cz = max(1, min(int(chunks_zyx[0]), nz))
    per_task = max_memory // (_COPIES * _n_workers())
    if all(v.streamable for v in vols) and row_bytes * nz > per_task:
        slab_z = max(cz, (per_task // max(row_bytes, 1)) // cz * cz)
    else:
        slab_z = nz
        whole = [v for v in vols if not v.streamable]
        need = 2 * sum(v.nbytes for v in vols)
        if whole and need > max_memory:
            raise ConversionError(
                f"a volume must stream or fit in the converter's memory ({_mib(max_memory)}); "
                f"{whole[0].describe()!r} of case {case.case_id!r} needs about {_mib(need)}.{gzip_hint(whole[0])}, "
                f"or allow more memory with --max-memory."
            )
    dtype = np.result_type(*[s.dtype for s in images])
    return _CasePlan(case, images, label, np.dtype(dtype), slab_z)


def _refuse_2d_in_3d(plans: Sequence[_CasePlan], store: Store, done: set[str]) -> dict[str, str]:
    """Errors for cases read from 2D files when other cases are 3D volumes (1 x Y x X would pass)."""
    flat = [p for p in plans if any(v.ndim == 2 for v in [*p.images, *([p.label] if p.label else [])])]
    if not flat:
        return {}
    deep = next((p.images[0].describe() for p in plans if p.images[0].geometry.shape_zyx[0] > 1), None)
    if deep is None:
        deep = next((cid for cid in sorted(done) if store.geometry(cid).shape_zyx[0] > 1), None)
    if deep is None:
        return {}
    out = {}
    for p in flat:
        f = next(v for v in [*p.images, *([p.label] if p.label else [])] if v.ndim == 2)
        out[p.case.case_id] = (
            f"the cases of a dataset must all be 3D or all be 2D; {f.describe()!r} of case {p.case.case_id!r} is a 2D "
            f"image (shape {f.geometry.shape_zyx[1:]}), but {deep!r} is 3D. Remove the case, save it as a 3D "
            f"volume, or convert 2D and 3D data separately."
        )
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"


def _check_image(arr: np.ndarray, src: VolumeSource, case: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n_bad = int(arr.size - np.isfinite(arr).sum())
        raise ConversionError(
            f"images must be finite; got {n_bad} NaN/Inf voxels in {src.describe()!r} for case {case!r}. "
            f"Replace them (e.g. with the image minimum) before converting."
        )


def _prepare_label(
    arr: np.ndarray, src: VolumeSource, case: str, declared: tuple[int, ...], binary: bool, dtype: np.dtype
) -> np.ndarray:
    if binary:
        return (arr > 0).astype(dtype)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            bad = arr[~np.isfinite(arr) | (arr != np.round(arr))]
            values = np.unique(bad)
            shown = [float(v) for v in values[:5]] + (["..."] if values.size > 5 else [])
            raise ConversionError(
                f"label values must be integers; got {bad.size} voxel(s) with non-integer values {shown} in "
                f"{src.describe()!r} for case {case!r}. Labels are class ids, not probabilities: round or "
                f"threshold the label file, or fix how it was exported."
            )
    values = np.unique(arr)
    undeclared = sorted(set(values.tolist()) - set(declared))
    if undeclared:
        raise ConversionError(
            f"label values must be declared in the dataset labels {list(declared)}; got undeclared value(s) "
            f"{[int(v) for v in undeclared]} in {src.describe()!r} for case {case!r}. Add them to dataset.json "
            f"'labels' or fix the label file."
        )
    return arr.astype(dtype)


@dataclass(frozen=True)
class _SlabJob:
    store: str
    case: str
    z0: int
    z1: int
    images: tuple[VolumeSource, ...]
    label: VolumeSource | None
    declared: tuple[int, ...]
    binary: bool
    dtype: str
    label_dtype: str


def _write_slab(job: _SlabJob) -> str | None:
    """Read, check and write rows z0:z1 of one case; returns an error message instead of raising."""
    try:
        parts = []
        for src in job.images:
            arr = src.read(job.z0, job.z1)
            _check_image(arr, src, job.case)
            parts.append(arr.astype(job.dtype, copy=False))
        image = parts[0] if len(parts) == 1 else np.concatenate(parts)
        open_array_for_write(f"{job.store}/cases/{job.case}/image")[:, job.z0 : job.z1] = image
        del image, parts
        if job.label is not None:
            lab = job.label.read(job.z0, job.z1)[0]
            lab = _prepare_label(lab, job.label, job.case, job.declared, job.binary, np.dtype(job.label_dtype))
            open_array_for_write(f"{job.store}/cases/{job.case}/label")[job.z0 : job.z1] = lab
    except VoxflowError as e:
        return str(e)
    except (RuntimeError, OSError, ValueError, MemoryError) as e:
        return f"could not convert rows {job.z0}:{job.z1} of case {job.case!r}: {e}"
    return None


def _finish_case(store: str, case: str, *errors: str | None) -> str | None:
    failed = [e for e in errors if e]
    if failed:
        return failed[0]
    Store.open(store, mode="r+").mark_complete(case)
    return None


def _label_values(src: VolumeSource, slab_z: int) -> set[int]:
    out: set[int] = set()
    nz = src.geometry.shape_zyx[0]
    step = nz if not src.streamable else slab_z
    for z0 in range(0, nz, step):
        arr = src.read(z0, min(nz, z0 + step))
        out.update(int(v) for v in np.unique(arr) if float(v).is_integer())
    return out


def _scan_labels(source: DatasetSource, chunks_zyx: Sequence[int], *, progress: bool = True) -> dict[str, int]:
    """Labels of a source that declares none: every value found in its label files."""
    tasks = []
    for case in source.cases:
        if case.label is None:
            continue
        try:
            src = case.label.open(case.case_id)
        except VoxflowError:
            continue  # reported by the conversion itself
        tasks.append(delayed(_label_values)(src, max(1, int(chunks_zyx[0]))))
    values: set[int] = {0}
    for found in compute(*tasks, desc="scanning labels", progress=progress) if tasks else ():
        values |= found
    return {"background": 0, **{f"label_{v}": v for v in sorted(values) if v != 0}}


def file_stats(path: str | Path) -> dict[str, Any]:
    """Resolved path, size and modification time of a file: what tells a changed input apart."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "size": None, "mtime_ns": None}
    return {"path": str(p), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _case_files(case: CaseSpec) -> list[str]:
    """The source files of a case (images, then label), as the provenance records them."""
    refs = [*case.images, *([case.label] if case.label is not None else [])]
    return [str(p) for ref in refs for p in ref.paths]


def _source_changed(store: Store, case: CaseSpec) -> bool:
    """Whether the files of a complete case differ (set, size or mtime) from when it was written.
    Stores written before file stats were recorded count as unchanged."""
    recorded = store.case_attrs(case.case_id).get("provenance", {}).get("files")
    if not isinstance(recorded, list) or not all(isinstance(r, dict) for r in recorded):
        return False

    def key(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted((str(r.get("path")), r.get("size"), r.get("mtime_ns")) for r in rows)

    if key(recorded) != key([file_stats(f) for f in _case_files(case)]):
        log.warning("case %r: its source files changed since it was converted; converting it again", case.case_id)
        return True
    return False


def _case_attrs(plan: _CasePlan, source: DatasetSource, split: str) -> dict[str, Any]:
    files = [f for s in plan.images for f in s.files] + (list(plan.label.files) if plan.label is not None else [])
    provenance: dict[str, Any] = {
        "format": source.format,
        "image": [f for s in plan.images for f in s.files],
        "label": list(plan.label.files) if plan.label is not None else None,
        "files": [file_stats(f) for f in files],
    }
    reference = getattr(plan.images[0], "dicom_reference", None)
    if len(plan.images) == 1 and callable(reference):
        provenance["dicom"] = reference()  # what a DICOM SEG of this case must reference
    return {
        "provenance": provenance,
        "split": split,
        "source_dtype": str(plan.dtype),
    }


def _begin_case(
    store: Store, plan: _CasePlan, attrs: dict[str, Any], chunks_zyx: Sequence[int], label_dtype: np.dtype
) -> None:
    """Start the case on disk: its group (marked incomplete) and empty arrays."""
    geom = plan.images[0].geometry
    cid = plan.case.case_id
    store.begin_case(cid, geometry=geom, attrs=attrs)
    n_ch = sum(s.n_channels for s in plan.images)
    store.create_array(cid, "image", shape=(n_ch, *geom.shape_zyx), dtype=plan.dtype, chunks=(1, *chunks_zyx))
    if plan.label is not None:
        store.create_array(cid, "label", shape=geom.shape_zyx, dtype=label_dtype, chunks=chunks_zyx)


def _convert_small_case(
    store: str,
    plan: _CasePlan,
    attrs: dict[str, Any],
    chunks_zyx: tuple[int, ...],
    label_dtype: np.dtype,
    job: _SlabJob,
) -> str | None:
    """A small case start to finish in one task (begin, its one slab, finish): the same writes as
    the slab tasks of a big case, in parallel with other small cases. Returns an error or None."""
    try:
        _begin_case(Store.open(store, mode="r+"), plan, attrs, chunks_zyx, label_dtype)
    except (VoxflowError, RuntimeError, OSError, ValueError) as e:
        return f"could not start case {plan.case.case_id!r} in {store}: {e}"
    return _finish_case(store, plan.case.case_id, _write_slab(job))


def _one_task(plan: _CasePlan) -> bool:
    """Whether a case is converted by one task: one slab and fewer voxels than SMALL_CASE_VOXELS."""
    shape = plan.images[0].geometry.shape_zyx
    return plan.slab_z >= shape[0] and is_small_case(math.prod(shape))


def _start_case(
    store: Store, plan: _CasePlan, source: DatasetSource, split: str, chunks_zyx: Sequence[int], label_dtype: np.dtype
) -> list[Any]:
    """Begin the case on disk and return its delayed slab writes plus the finishing task; a small
    case (one slab, fewer voxels than :data:`~voxflow.cluster.SMALL_CASE_VOXELS`) is one task."""
    geom = plan.images[0].geometry
    cid = plan.case.case_id
    attrs = _case_attrs(plan, source, split)
    nz = geom.shape_zyx[0]
    if _one_task(plan):
        job = _SlabJob(
            str(store.path),
            cid,
            0,
            nz,
            tuple(plan.images),
            plan.label,
            store.meta.label_values,
            plan.case.binary_label,
            str(plan.dtype),
            str(label_dtype),
        )
        return [
            delayed(_convert_small_case, pure=False)(
                str(store.path),
                delayed(plan, traverse=False),
                attrs,
                tuple(chunks_zyx),
                label_dtype,
                delayed(job, traverse=False),
            )
        ]
    _begin_case(store, plan, attrs, chunks_zyx, label_dtype)
    declared = store.meta.label_values
    jobs = [
        _SlabJob(
            str(store.path),
            cid,
            z0,
            min(nz, z0 + plan.slab_z),
            tuple(plan.images),
            plan.label,
            declared,
            plan.case.binary_label,
            str(plan.dtype),
            str(label_dtype),
        )
        for z0 in range(0, nz, plan.slab_z)
    ]
    # traverse=False: dask would otherwise rebuild the dataclasses field by field inside the task
    slabs = [delayed(_write_slab, pure=False)(delayed(job, traverse=False)) for job in jobs]
    return [delayed(_finish_case, pure=False)(str(store.path), cid, *slabs)]


def _compute_conversions(
    tasks: Sequence[Any], ids: Sequence[str], small: set[str], *, progress: bool
) -> dict[str, str | None]:
    """Run every case's finishing task: ``small`` cases one task each (:func:`compute_cases`, one bar
    over cases), then the slab graphs of big ones (a bar over slabs). Case id -> error or None."""
    small_i = [i for i, cid in enumerate(ids) if cid in small]
    big = [i for i in range(len(tasks)) if i not in set(small_i)]
    out: dict[str, str | None] = {}
    with stage_bar(len(small_i), desc="convert", progress=progress) as bar:
        out.update(
            zip(
                [ids[i] for i in small_i],
                compute_cases([tasks[i] for i in small_i], bar=bar, preload=[__name__]),
                strict=True,
            )
        )
    if big:
        out.update(
            zip(
                [ids[i] for i in big], compute(*[tasks[i] for i in big], desc="convert", progress=progress), strict=True
            )
        )
    return out


def _override(
    source: DatasetSource,
    *,
    channel_names: Sequence[str] | None,
    labels: Mapping[str, Any] | None,
    regions_class_order: Sequence[int] | None,
) -> None:
    """Replace what ``source`` declares by the caller's channel names, labels and region order (where given)."""
    if channel_names is not None:
        source.channel_names = tuple(str(c) for c in channel_names)
    if labels is not None:
        source.labels = dict(labels)
    if regions_class_order is not None:
        source.regions_class_order = tuple(int(v) for v in regions_class_order)


def _plan_cases(
    cases: Sequence[Any], n_channels: int, chunks: tuple[int, ...], max_memory: int
) -> tuple[list[Any], dict[str, str]]:
    """:func:`_plan_case` of each case; the plans, and case id -> error for those that cannot be planned."""
    plans, errors = [], {}
    for case in cases:
        try:
            plans.append(_plan_case(case, n_channels, chunks, max_memory))
        except VoxflowError as e:
            errors[case.case_id] = str(e)
    return plans, errors


@locked(lambda a: store_lock_file(a["dst"]), command="convert")
def convert(
    src: PathLikeStr | DatasetSource,
    dst: PathLikeStr,
    *,
    overwrite: bool = False,
    scheduler: str = "threads",
    chunks_zyx: Sequence[int] = DEFAULT_CHUNKS_ZYX,
    max_memory_bytes: int | None = None,
    split: str = "train",
    format: str | None = None,
    progress: bool = True,
    memory_limit: str | None = None,
    channel_names: Sequence[str] | None = None,
    labels: Mapping[str, Any] | None = None,
    regions_class_order: Sequence[int] | None = None,
) -> Store:
    """Convert a dataset, series or file at ``src`` into the voxflow store ``dst``.

    ``src`` is auto-detected (see :mod:`voxflow.io._sources`; ``format`` forces one), or an already
    loaded :class:`DatasetSource` (e.g. :func:`files_source` of single files). ``split``
    picks training (``imagesTr``) or test (``imagesTs``) cases of nnU-Net/MSD datasets.
    ``chunks_zyx`` are the store chunks in voxels; ``max_memory_bytes`` bounds the converter's
    memory (default: half the available RAM); ``memory_limit`` is the per-worker limit of a
    ``local:N`` scheduler. ``channel_names``/``labels``/``regions_class_order`` override what the
    source declares (e.g. to convert a folder of test images with a training dataset's names, to
    name the channel of a NIfTI folder ``CT``, or to declare regions for DICOM SEGs whose segments
    overlap). A case converted from a DICOM series records its UIDs in ``provenance["dicom"]``
    (what a DICOM SEG of it must reference). Memory: each streamed slab
    task uses at most about ``max_memory_bytes / n_workers``; a volume that cannot stream is read
    whole by one task and must fit in ``max_memory_bytes``. Raises :class:`ConversionError` listing every case
    that failed; all other cases are written and marked complete. Holds the lock ``<dst>.lock``
    (:class:`~voxflow.errors.LockedError` if another process writes ``dst``).
    """
    source = src if isinstance(src, DatasetSource) else load_source(Path(src), split=split, format=format)
    _override(source, channel_names=channel_names, labels=labels, regions_class_order=regions_class_order)
    chunks = tuple(int(c) for c in chunks_zyx)
    max_memory = int(max_memory_bytes or default_max_memory())
    with scheduler_context(scheduler, memory_limit=memory_limit):
        labels = source.labels if source.labels is not None else _scan_labels(source, chunks, progress=progress)
        meta = DatasetMeta(
            channel_names=source.channel_names,
            labels=labels,
            regions_class_order=source.regions_class_order,
            file_ending=source.file_ending,
            name=source.name,
            extra={"source_format": source.format},
        )
        store = Store.create(dst, meta, overwrite=overwrite)
        label_dtype = label_dtype_for(max(meta.label_values))
        done = set(store.resumable_case_ids())
        todo = [c for c in source.cases if c.case_id not in done or _source_changed(store, c)]
        done -= {c.case_id for c in todo}
        tasks: list[Any] = []
        ids: list[str] = []
        plans, errors = _plan_cases(todo, len(meta.channel_names), chunks, max_memory)
        errors.update(_refuse_2d_in_3d(plans, store, done))
        for plan in plans:
            if plan.case.case_id not in errors:
                tasks += _start_case(store, plan, source, split, chunks, label_dtype)
                ids.append(plan.case.case_id)
        log.info(
            "converting %d case(s) from %s (%s); %d already complete", len(ids), source.root, source.format, len(done)
        )
        one_task = {p.case.case_id for p in plans if _one_task(p)}
        results = _compute_conversions(tasks, ids, one_task, progress=progress)
    errors.update({cid: err for cid, err in results.items() if err})
    if errors:
        first = next(iter(errors.values()))
        raise ConversionError(
            f"{len(errors)} of {len(source.cases)} case(s) could not be converted (left incomplete): "
            f"{sorted(errors)}. First error: {first}"
        )
    return Store.open(dst)
