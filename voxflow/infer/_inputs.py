"""Inputs of `voxflow predict`: a voxflow store, a folder of images or image files; and the
preprocessed view of one case for one configuration."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from voxflow.errors import ConversionError, LayoutError
from voxflow.geometry import Geometry
from voxflow.infer._chunks import read_chunks
from voxflow.io import convert
from voxflow.plan.schema import Configuration
from voxflow.preprocess import preprocess_case
from voxflow.store import Store

__all__ = ["PreparedCase", "open_input", "prepare_case"]

log = logging.getLogger(__name__)
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".tif", ".tiff", ".png")


def _split_suffix(name: str) -> tuple[str, str]:
    for suf in _IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)], suf
    return name, ""


def _image_files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.is_file() and _split_suffix(f.name)[1]))
        elif p.is_file():
            files.append(p)
        else:
            raise ConversionError(f"input {str(p)!r} must be an existing file, folder or voxflow store; "
                                  f"it does not exist.")
    if not files:
        raise ConversionError(f"input {[str(p) for p in paths]} must contain image files "
                              f"({', '.join(_IMAGE_SUFFIXES)}); found none.")
    return files


def open_input(source: Store | str | Path | Sequence[str | Path], work_dir: Path, *,
               scheduler: str = "threads") -> Store:
    """A voxflow store for the input: opened as is, or converted into ``work_dir/input.zarr``."""
    if isinstance(source, Store):
        return source
    paths = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    if len(paths) == 1 and (paths[0] / "zarr.json").exists():
        return Store.open(paths[0])
    dst = work_dir / "input.zarr"
    if len(paths) == 1 and paths[0].is_dir():
        return convert(paths[0], dst, overwrite=True, scheduler=scheduler, progress=False)
    staging = work_dir / "input_files"
    staging.mkdir(parents=True, exist_ok=True)
    for f in _image_files(paths):
        link = staging / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    return convert(staging, dst, overwrite=True, scheduler=scheduler, progress=False)


@dataclass(frozen=True)
class PreparedCase:
    """One case on a configuration's preprocessed grid, with what is needed to undo it."""

    image: da.Array  # (C, z, y, x) float32, lazy
    original_geometry: Geometry
    crop_bbox_zyx: tuple[tuple[int, int], ...]
    shape_after_crop_zyx: tuple[int, int, int]


def prepare_case(store: Store, case_id: str, config: Configuration, *,
                 out_chunks: Sequence[int] | None = None) -> PreparedCase:
    """The lazy preprocessed image of a case for ``config`` (read as is from a preprocessed store).

    ``out_chunks`` (z, y, x) sets the dask chunks of the result (default: preprocessing's own, half
    the patch). Prediction asks for large chunks: the task graph of a 512 M-voxel case with
    half-patch chunks holds ~10^5 tasks, ~150 MB of Python objects.
    """
    if store.meta.kind == "preprocessed":
        have = store.meta.extra.get("configuration")
        if have != config.name:
            raise LayoutError(f"a preprocessed input store must match the model configuration {config.name!r}; "
                              f"got {have!r} in {store.path}. Pass the raw images or the matching store.")
        a = store.case_attrs(case_id)
        img = store.image(case_id, chunks=read_chunks(store, case_id)).astype(np.float32)
        if out_chunks is not None:
            img = img.rechunk((img.shape[0], *(min(int(c), n) for c, n in zip(out_chunks, img.shape[1:]))))
        return PreparedCase(img, Geometry.from_dict(a["original_geometry"]),
                            tuple((int(lo), int(hi)) for lo, hi in a["crop_bbox_zyx"]),
                            tuple(int(s) for s in a["shape_after_crop_zyx"]))  # type: ignore[arg-type]
    image, geometry = store.image(case_id, chunks=read_chunks(store, case_id)), store.geometry(case_id)
    if image.shape[0] != config.n_channels:
        raise LayoutError(f"images must have the {config.n_channels} channels the model was trained on; got "
                          f"{image.shape[0]} for case {case_id!r} in {store.path}.")
    pc = preprocess_case(image, geometry, config, case_id=case_id, out_chunks=out_chunks)
    return PreparedCase(pc.image, pc.original_geometry,
                        tuple((int(lo), int(hi)) for lo, hi in pc.crop_bbox_zyx),
                        tuple(int(s) for s in pc.shape_after_crop_zyx))  # type: ignore[arg-type]

