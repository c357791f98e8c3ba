"""Apply a postprocessing spec to a prediction store or a folder of label files (orchestrator)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from voxflow._types import PathLikeStr
from voxflow.cluster import compute, scheduler_context
from voxflow.errors import LayoutError
from voxflow.evaluate import Segmentation, open_segmentations
from voxflow.geometry import Geometry
from voxflow.postprocess._spec import PostprocessingSpec, _as_spec, apply_postprocessing_many
from voxflow.store import Store

__all__ = ["run_postprocess"]

log = logging.getLogger(__name__)


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def run_postprocess(
    source: Store | PathLikeStr,
    output: PathLikeStr,
    spec: PostprocessingSpec | dict[str, Any] | PathLikeStr,
    *,
    scheduler: str = "threads",
    memory_limit: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Postprocess every case of ``source`` into ``output``, in parallel over cases and blocks.

    One dask compute per operation (its summary pass over all cases) and one for the writes.

    A store gives a store (same metadata, ``label`` per case, case attrs plus ``postprocessing``;
    ``probs`` arrays are not copied, since they would no longer match the labels);
    a folder of label files gives a folder of ``.nii.gz``-style files with the same names and
    geometry. Returns ``output``.
    """
    spec = _as_spec(spec)
    out = Path(output)
    src_path = source.path if isinstance(source, Store) else Path(source)
    if out.resolve() == src_path.resolve():
        raise LayoutError(f"postprocess output must differ from its input; got {out} for both. Pick another path.")
    with scheduler_context(scheduler, memory_limit=memory_limit):
        if isinstance(source, Store) or _is_store(src_path):
            _run_store(
                source if isinstance(source, Store) else Store.open(src_path),
                out,
                spec,
                overwrite=overwrite,
                progress=progress,
            )
        else:
            _run_folder(src_path, out, spec, overwrite=overwrite, progress=progress)
    return out


def _run_store(src: Store, out: Path, spec: PostprocessingSpec, *, overwrite: bool, progress: bool) -> None:
    dst = Store.create(out, src.meta, overwrite=overwrite)
    cases = [cid for cid in src.case_ids() if src.has_array(cid, "label")]
    labels = [src.array(cid, "label") for cid in cases]
    results = apply_postprocessing_many(labels, spec, spacings=[src.geometry(cid).spacing_zyx for cid in cases])
    writes, done = [], []
    for cid, label, lazy in zip(cases, labels, results, strict=True):
        attrs = {k: v for k, v in src.case_attrs(cid).items() if k not in ("complete", "geometry")}
        attrs["postprocessing"] = spec.to_dict()
        geom = src.geometry(cid)
        dst.begin_case(cid, geometry=geom, attrs=attrs)
        target: Any = dst.create_array(
            cid,
            "label",
            shape=label.shape,
            dtype=label.dtype,  # dask's stubs
            chunks=tuple(c[0] for c in label.chunks),
        )  # do not know zarr arrays
        writes.append(da.store(lazy.rechunk(target.chunks), target, lock=False, compute=False))
        done.append(cid)
    if writes:
        compute(*writes, desc="postprocess", progress=progress)
    for cid in done:
        dst.mark_complete(cid)
    log.info("postprocessed %d cases into %s", len(done), out)


def _write_file(array: np.ndarray, geometry: Geometry, path: str) -> str:
    import SimpleITK as sitk

    arr = array[0] if geometry.is_2d else array
    dtype = np.uint8 if arr.size == 0 or arr.max() <= 255 else np.uint16 if arr.max() <= 65535 else np.uint32
    image = geometry.apply_to_sitk(sitk.GetImageFromArray(arr.astype(dtype)))
    sitk.WriteImage(image, path, useCompression=True)
    return path


def _run_folder(src: Path, out: Path, spec: PostprocessingSpec, *, overwrite: bool, progress: bool) -> None:
    segs: dict[str, Segmentation] = open_segmentations(src)
    for seg in segs.values():
        if (out / Path(seg.source).name).exists() and not overwrite:
            raise LayoutError(
                f"{out / Path(seg.source).name} exists; pass --overwrite to replace it or choose another output folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    results = apply_postprocessing_many(
        [s.array for s in segs.values()], spec, spacings=[s.geometry.spacing_zyx for s in segs.values()]
    )
    tasks = []
    for seg, lazy in zip(segs.values(), results, strict=True):
        name = Path(seg.source).name
        target = out / name
        tmp = out / f".{name}.part{''.join(Path(name).suffixes)}"
        tasks.append((dask.delayed(_write_file)(lazy, seg.geometry, str(tmp)), tmp, target))
    if tasks:
        compute(*[t for t, _, _ in tasks], desc="postprocess", progress=progress)
    for _, tmp, target in tasks:
        tmp.replace(target)
    log.info("postprocessed %d files into %s", len(tasks), out)
