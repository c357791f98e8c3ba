"""Inputs of `voxflow predict`: a voxflow store, a folder of images or image files; and the
preprocessed view of one case for one configuration.

Folders and files are converted into ``OUT/.input/input.zarr``, reading the user's files in place
(so errors name them). ``OUT/.input/inputs.json`` records every input file by resolved path, size
and modification time: a later call with the same, unchanged files reuses the converted store;
any other call converts afresh, so nothing from a previous call's inputs is kept. Each predicted
case records the files it was predicted from, and resuming redoes a case whose input changed.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np

from voxflow.errors import ConversionError, LayoutError
from voxflow.geometry import Geometry
from voxflow.infer._chunks import read_chunks
from voxflow.io import IMAGE_SUFFIXES, convert, file_stats, files_source, load_source, split_suffix
from voxflow.plan.schema import Configuration
from voxflow.preprocess import preprocess_case
from voxflow.store import Store

if TYPE_CHECKING:
    from voxflow.io import DatasetSource

__all__ = ["PreparedCase", "cases_to_predict", "describe_case", "input_signature", "open_input", "prepare_case"]

log = logging.getLogger(__name__)


def _image_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.is_file() and split_suffix(f.name)[1]))
        elif p.is_file():
            files.append(p)
        else:
            raise ConversionError(
                f"input {str(p)!r} must be an existing file, folder or voxflow store; it does not exist."
            )
    if not files:
        raise ConversionError(
            f"input {[str(p) for p in paths]} must contain image files ({', '.join(IMAGE_SUFFIXES)}); found none."
        )
    return files


def _manifest(source: DatasetSource) -> dict[str, Any]:
    """Every file a source reads, by resolved path, size and modification time."""
    paths = {
        str(Path(p).resolve())
        for c in source.cases
        for ref in (*c.images, *([c.label] if c.label is not None else []))
        for p in ref.paths
    }
    return {"format": source.format, "files": [file_stats(p) for p in sorted(paths)]}


def _reusable(dst: Path, manifest_path: Path, manifest: dict[str, Any], n_cases: int) -> Store | None:
    """The store converted by an earlier call from exactly these (unchanged) files, if complete."""
    try:
        if json.loads(manifest_path.read_text()) != manifest:
            return None
        store = Store.open(dst)
    except (OSError, ValueError, LayoutError):
        return None
    return store if len(store.case_ids()) == n_cases and not store.incomplete_case_ids() else None


def open_input(
    source: Store | str | Path | Sequence[str | Path], work_dir: Path, *, scheduler: str = "threads"
) -> Store:
    """A voxflow store for the input: opened as is, or converted into ``work_dir/input.zarr``.

    Image files are read where they are; two files that would be one case are refused (naming
    both). The converted store is reused only if the recorded inputs (resolved path, size, mtime)
    are the same files, unchanged; otherwise it is converted afresh from the current inputs alone.
    """
    if isinstance(source, Store):
        return source
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    if len(paths) == 1 and (paths[0] / "zarr.json").exists():
        return Store.open(paths[0])
    shutil.rmtree(work_dir / "input_files", ignore_errors=True)  # symlink staging of older versions
    src = load_source(paths[0]) if len(paths) == 1 and paths[0].is_dir() else files_source(_image_files(paths))
    dst, manifest_path = work_dir / "input.zarr", work_dir / "inputs.json"
    manifest = _manifest(src)
    reused = _reusable(dst, manifest_path, manifest, len(src.cases))
    if reused is not None:
        log.info("reusing %s: its %d input file(s) are unchanged", dst, len(manifest["files"]))
        return reused
    manifest_path.unlink(missing_ok=True)
    store = convert(src, dst, overwrite=True, scheduler=scheduler, progress=False)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return store


def input_signature(store: Store, case_id: str) -> Any:
    """What a case of an input store was converted from (files with size and mtime), or None."""
    return store.case_attrs(case_id).get("provenance")


def describe_case(store: Store, case_id: str) -> str:
    """Where a case comes from, for error messages: its source files, else the store."""
    prov = input_signature(store, case_id) or {}
    files = list(prov.get("image") or [])
    return f"from {files}" if files else f"in {store.path}"


def cases_to_predict(src: Store, out: Store, case_ids: Sequence[str]) -> list[str]:
    """Cases not complete in ``out``, or predicted from other input files than ``src`` holds now."""
    todo = []
    for cid in case_ids:
        if out.is_complete(cid):
            if out.case_attrs(cid).get("input") == input_signature(src, cid):
                continue
            log.info("case %s: its input changed since it was predicted; predicting it again", cid)
        todo.append(cid)
    return todo


@dataclass(frozen=True)
class PreparedCase:
    """One case on a configuration's preprocessed grid, with what is needed to undo it."""

    image: da.Array  # (C, z, y, x) float32, lazy
    original_geometry: Geometry
    crop_bbox_zyx: tuple[tuple[int, int], ...]
    shape_after_crop_zyx: tuple[int, int, int]


def prepare_case(
    store: Store, case_id: str, config: Configuration, *, out_chunks: Sequence[int] | None = None
) -> PreparedCase:
    """The lazy preprocessed image of a case for ``config`` (read as is from a preprocessed store).

    ``out_chunks`` (z, y, x) sets the dask chunks of the result (default: preprocessing's own, half
    the patch). Prediction asks for large chunks: the task graph of a 512 M-voxel case with
    half-patch chunks holds ~10^5 tasks, ~150 MB of Python objects.
    """
    if store.meta.kind == "preprocessed":
        have = store.meta.extra.get("configuration")
        if have != config.name:
            raise LayoutError(
                f"a preprocessed input store must match the model configuration {config.name!r}; "
                f"got {have!r} in {store.path}. Pass the raw images or the matching store."
            )
        a = store.case_attrs(case_id)
        img = store.image(case_id, chunks=read_chunks(store, case_id)).astype(np.float32)
        if out_chunks is not None:
            img = img.rechunk((img.shape[0], *(min(int(c), n) for c, n in zip(out_chunks, img.shape[1:]))))
        return PreparedCase(
            img,
            Geometry.from_dict(a["original_geometry"]),
            tuple((int(lo), int(hi)) for lo, hi in a["crop_bbox_zyx"]),
            tuple(int(s) for s in a["shape_after_crop_zyx"]),  # type: ignore[arg-type]
        )
    image, geometry = store.image(case_id, chunks=read_chunks(store, case_id)), store.geometry(case_id)
    if image.shape[0] != config.n_channels:
        raise LayoutError(
            f"images must have the {config.n_channels} channels the model was trained on; got "
            f"{image.shape[0]} for case {case_id!r} {describe_case(store, case_id)}. Give one "
            f"file per channel, named CASE_0000, CASE_0001, ... (nnU-Net style)."
        )
    pc = preprocess_case(image, geometry, config, case_id=case_id, out_chunks=out_chunks)
    return PreparedCase(
        pc.image,
        pc.original_geometry,
        tuple((int(lo), int(hi)) for lo, hi in pc.crop_bbox_zyx),
        tuple(int(s) for s in pc.shape_after_crop_zyx),  # type: ignore[arg-type]
    )
