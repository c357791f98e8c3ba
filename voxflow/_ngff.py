"""OME-NGFF 0.5 views of voxflow cases: metadata (pure functions) and multiscale pyramids.

Every complete case of every store kind is a valid NGFF 0.5 node, so napari (with
``napari-ome-zarr``), ``ome_zarr`` and other NGFF tools open ``STORE.zarr/cases/<case_id>``::

    cases/<case_id>/            ome.multiscales: the case's image -- ``image`` (dataset, preprocessed)
                                or ``probs`` (prediction; one channel per class) -- at every level
      image | probs             level 0 (the array voxflow reads; unchanged)
      levels/<name>/<k>         pyramid level k >= 1 (ignored by voxflow's readers and `voxflow info`)
      label, label_raw          voxflow's label arrays (unchanged)
      labels/                   ome.labels: ["label", ("label_raw")]
        label/                  NGFF label image: multiscales + image-label (a colour and a name
          0, 1, ...             per class from dataset.json); 0 is a copy of ``label``, k >= 1 levels

A prediction case without ``probs`` has no image: its case group is itself the label image
(multiscales over ``label``, ``levels/label/<k>`` + image-label), with nothing copied.

Levels halve every axis whose spacing is within 2x of the finest one (so an anisotropic CT is
first made isotropic-ish, as nnU-Net does), until a level has at most :data:`MAX_LEVEL_VOXELS`
voxels. Images are averaged over the 2-blocks (edges padded by repetition), labels take every
second voxel (nearest; no new values). The NGFF scale and translation of each level place its
voxel centres exactly. Levels are built lazily with dask from the level below, one compute per
case, and every dask chunk covers whole Zarr chunks (the arrays are not sharded), so parallel
writes never share a chunk.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from voxflow.cluster import is_small_case

__all__ = [
    "LEVELS_GROUP",
    "MAX_LEVEL_VOXELS",
    "NGFF_VERSION",
    "downsample_image",
    "downsample_label",
    "image_label_metadata",
    "label_names",
    "level_geometry",
    "multiscales_metadata",
    "pyramid_factors",
    "write_case_ngff",
]

NGFF_VERSION = "0.5"
MAX_LEVEL_VOXELS = 256**3
LEVELS_GROUP = "levels"
_MAX_LEVELS = 12
_IMAGE_ARRAYS = ("image", "probs")
_LABEL_ARRAYS = ("label", "label_raw")
# Distinct, colour-blind-friendly colours (Okabe-Ito, then tab10); background is transparent.
_PALETTE = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


# ---------------------------------------------------------------------------------------- pure helpers
def pyramid_factors(
    shape_zyx: Sequence[int], spacing_zyx: Sequence[float], *, max_voxels: int = MAX_LEVEL_VOXELS
) -> list[tuple[int, int, int]]:
    """Per-level downsampling factors relative to level 0, level 0 (``(1, 1, 1)``) included.

    An axis is halved when it has more than one voxel and its spacing is at most twice the finest
    spacing among such axes; levels are added until one has at most ``max_voxels`` voxels.

    >>> pyramid_factors((600, 512, 512), (1.0, 1.0, 1.0))
    [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    >>> pyramid_factors((100, 1024, 1024), (5.0, 0.7, 0.7))[:3]
    [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    """
    shape = [int(n) for n in shape_zyx]
    spacing = [float(s) for s in spacing_zyx]
    factor = [1, 1, 1]
    out = [(1, 1, 1)]
    while math.prod(shape) > max_voxels and len(out) < _MAX_LEVELS:
        finest = min(sp for sp, n in zip(spacing, shape, strict=True) if n > 1)
        for ax in range(3):
            if shape[ax] > 1 and spacing[ax] <= 2 * finest:
                shape[ax] = -(-shape[ax] // 2)
                spacing[ax] *= 2
                factor[ax] *= 2
        out.append((factor[0], factor[1], factor[2]))
    return out


def level_shape(shape_zyx: Sequence[int], factor: Sequence[int]) -> tuple[int, int, int]:
    """Shape of a level: ``ceil(n / f)`` per axis."""
    return (-(-int(shape_zyx[0]) // factor[0]), -(-int(shape_zyx[1]) // factor[1]), -(-int(shape_zyx[2]) // factor[2]))


def level_geometry(
    spacing_zyx: Sequence[float], origin_zyx: Sequence[float], factor: Sequence[int], *, mean: bool
) -> tuple[list[float], list[float]]:
    """(scale, translation) in mm of a level: averaged blocks are centred ``(f - 1) / 2`` voxels in;
    taking every f-th voxel (labels) keeps the first voxel's centre."""
    scale = [float(s) * f for s, f in zip(spacing_zyx, factor, strict=True)]
    shift = [(f - 1) / 2 * float(s) if mean else 0.0 for s, f in zip(spacing_zyx, factor, strict=True)]
    return scale, [float(o) + d for o, d in zip(origin_zyx, shift, strict=True)]


def multiscales_metadata(
    *,
    name: str,
    paths: Sequence[str],
    spacing_zyx: Sequence[float],
    origin_zyx: Sequence[float],
    factors: Sequence[Sequence[int]],
    channel: bool,
    mean: bool,
) -> dict[str, Any]:
    """One NGFF 0.5 ``multiscales`` entry: axes ((c,) z, y, x in mm) and per-level scale/translation.

    NGFF before 0.6 knows only scale and translation: the direction matrix stays in voxflow's own
    attributes, so an oblique image shows axis-aligned in NGFF viewers.
    """
    axes = ([{"name": "c", "type": "channel"}] if channel else []) + [
        {"name": ax, "type": "space", "unit": "millimeter"} for ax in "zyx"
    ]
    lead = [1.0] if channel else []
    zero = [0.0] if channel else []
    datasets = []
    for path, factor in zip(paths, factors, strict=True):
        scale, translation = level_geometry(spacing_zyx, origin_zyx, factor, mean=mean)
        datasets.append(
            {
                "path": path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": lead + scale},
                    {"type": "translation", "translation": zero + translation},
                ],
            }
        )
    return {"name": name, "axes": axes, "datasets": datasets}


def label_names(
    labels: Mapping[str, Any], regions_class_order: Sequence[int] | None, *, predicted: bool
) -> dict[int, str]:
    """Label value -> class name from dataset.json ``labels`` (background included).

    Region-based datasets: a prediction writes region ``i`` as ``regions_class_order[i]``, so
    predicted values are named after their region; raw labels keep the plain integer classes.
    """
    names: dict[int, str] = {}
    plain = {k: v for k, v in labels.items() if not isinstance(v, tuple)}
    regions = [k for k, v in labels.items() if isinstance(v, tuple)]
    for k, v in plain.items():
        names.setdefault(int(v), k)
    if predicted and regions and regions_class_order is not None:
        for name, value in zip(regions, regions_class_order, strict=False):
            names[int(value)] = name
    return dict(sorted(names.items()))


def image_label_metadata(names: Mapping[int, str], *, source: str | None) -> dict[str, Any]:
    """NGFF ``image-label`` block: a colour and a name per label value; background transparent."""
    colors, props = [], []
    fg = 0
    for value, name in sorted(names.items()):
        if value == 0:
            rgba = [0, 0, 0, 0]
        else:
            rgba = [*_PALETTE[fg % len(_PALETTE)], 255]
            fg += 1
        colors.append({"label-value": int(value), "rgba": rgba})
        props.append({"label-value": int(value), "name": str(name)})
    out: dict[str, Any] = {"version": NGFF_VERSION, "colors": colors, "properties": props}
    if source is not None:
        out["source"] = {"image": source}
    return out


# ---------------------------------------------------------------------------------------- lazy levels
def _pad_to_multiple(x: da.Array, step: Sequence[int]) -> da.Array:
    pad = [(0, 0)] * (x.ndim - 3) + [(0, (-n) % s) for n, s in zip(x.shape[-3:], step, strict=True)]
    return da.pad(x, pad, mode="edge") if any(p for _, p in pad) else x


def downsample_image(x: da.Array, step: Sequence[int]) -> da.Array:
    """Average ``step``-blocks over the last three axes (edges padded by repetition); same dtype.

    The result has ``ceil(n / step)`` voxels per axis; integer images are rounded back.
    """
    if all(s == 1 for s in step):
        return x
    axes = {x.ndim - 3 + i: int(s) for i, s in enumerate(step) if s > 1}
    padded = _pad_to_multiple(x, step)
    # coarsen needs chunks divisible by the step: rechunk to multiples of it (a no-op for even chunks)
    padded = padded.rechunk(
        tuple(c if ax not in axes else _multiple_chunks(c, axes[ax]) for ax, c in enumerate(padded.chunks))
    )
    mean = da.coarsen(np.mean, padded.astype(np.float32), axes, trim_excess=False)
    if np.dtype(x.dtype).kind in "iub":
        info = np.iinfo(x.dtype) if x.dtype.kind != "b" else None
        mean = da.round(mean)
        if info is not None:
            mean = da.clip(mean, info.min, info.max)
    return mean.astype(x.dtype)


def _multiple_chunks(chunks: Sequence[int], step: int) -> tuple[int, ...]:
    total = sum(chunks)
    size = max(step, (max(chunks) // step) * step)
    n, rest = divmod(total, size)
    return (size,) * n + ((rest,) if rest else ())


def downsample_label(x: da.Array, step: Sequence[int]) -> da.Array:
    """Every ``step``-th voxel along the last three axes (nearest; values unchanged)."""
    index = (Ellipsis, *(slice(None, None, int(s)) for s in step))
    return x[index]


# ---------------------------------------------------------------------------------------- writing
def _create_level(
    group: zarr.Group, path: str, *, like: zarr.Array, shape: Sequence[int], dims: Sequence[str]
) -> zarr.Array:
    chunks = tuple(max(1, min(int(c), int(s))) for c, s in zip(like.chunks, shape, strict=True))
    return group.create_array(
        path,
        shape=tuple(int(s) for s in shape),
        dtype=like.dtype,
        chunks=chunks,
        compressors=like.compressors,
        fill_value=like.fill_value,
        dimension_names=dims,
        overwrite=True,
    )


def _pyramid(
    group: zarr.Group,
    base: zarr.Array,
    paths: Sequence[str],
    factors: Sequence[Sequence[int]],
    *,
    mean: bool,
    dims: Sequence[str],
    copy_base: bool,
    eager: bool = False,
) -> list[Any]:
    """Delayed writes of the levels at ``paths`` (relative to ``group``) downsampled from ``base``.

    ``paths[0]`` is ``base`` itself, or, with ``copy_base``, where a copy of it goes. ``eager`` (a
    small array): ``base`` is read once, each level computed in memory by the same graph and written
    with one ``setitem`` (the same chunks), and nothing is returned."""
    writes: list[Any] = []
    if len(paths) == 1 and not copy_base:
        return writes  # one level, the base itself: nothing to read or write
    lazy = da.from_array(base[...], chunks=base.chunks) if eager else da.from_zarr(base, chunks=base.chunks)
    lead = tuple(base.shape[:-3])
    prev: tuple[int, ...] = (1, 1, 1)
    for k, (path, factor) in enumerate(zip(paths, factors, strict=True)):
        if k == 0 and not copy_base:
            continue
        step = [f // p for f, p in zip(factor, prev, strict=True)]
        lazy = (downsample_image if mean else downsample_label)(lazy, step)
        parent, _, leaf = path.rpartition("/")
        where = _require_groups(group, parent)
        target: Any = _create_level(
            where, leaf, like=base, shape=(*lead, *level_shape(base.shape[-3:], factor)), dims=dims
        )
        lazy = lazy.rechunk(target.chunks)  # one dask chunk per Zarr chunk: no two tasks share a chunk
        if eager:
            target[...] = lazy.compute(scheduler="sync")
        else:
            writes.append(da.store(lazy, target, lock=False, compute=False))
        prev = tuple(factor)
    return writes


def _require_groups(group: zarr.Group, path: str) -> zarr.Group:
    for part in filter(None, path.split("/")):
        group = group.require_group(part)
    return group


def _level_paths(name: str, n: int, *, in_label_group: bool) -> list[str]:
    if in_label_group:
        return [str(k) for k in range(n)]
    return [name] + [f"{LEVELS_GROUP}/{name}/{k}" for k in range(1, n)]


def _scheduler() -> str | None:
    """The active scheduler on the main thread; synchronous inside a task (e.g. convert's finisher)."""
    if threading.current_thread() is not threading.main_thread():
        return "sync"
    try:
        from distributed import get_worker

        get_worker()
    except ValueError:  # not in a worker
        return None
    return "sync"


def _label_images(
    case: zarr.Group,
    label_arrays: Mapping[str, zarr.Array],
    names: Mapping[int, str],
    factors: Sequence[Sequence[int]],
    spacing: Sequence[float],
    origin: Sequence[float],
    *,
    eager: bool,
) -> list[Any]:
    """The ``labels/`` group beside an image: one NGFF label image per label array; returns the level writes."""
    # attributes given at creation: one metadata write per group
    group = case.create_group("labels", attributes={"ome": {"version": NGFF_VERSION, "labels": list(label_arrays)}})
    writes: list[Any] = []
    for name, array in label_arrays.items():
        lpaths = _level_paths(name, len(factors), in_label_group=True)
        sub = group.create_group(
            name,
            attributes={
                "ome": {
                    "version": NGFF_VERSION,
                    "multiscales": [
                        multiscales_metadata(
                            name=name,
                            paths=lpaths,
                            spacing_zyx=spacing,
                            origin_zyx=origin,
                            factors=factors,
                            channel=False,
                            mean=False,
                        )
                    ],
                    "image-label": image_label_metadata(names, source="../../"),
                }
            },
        )
        writes += _pyramid(sub, array, lpaths, factors, mean=False, dims=("z", "y", "x"), copy_base=True, eager=eager)
    return writes


def write_case_ngff(
    case: zarr.Group,
    *,
    case_id: str,
    geometry: Any,
    labels: Mapping[str, Any],
    regions_class_order: Sequence[int] | None,
    kind: str,
    max_voxels: int | None = None,
    compute: bool = True,
    attrs: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Write the NGFF metadata and pyramid of one case whose arrays are all written.

    ``geometry`` is the case's :class:`~voxflow.geometry.Geometry`; levels are added until one has
    at most ``max_voxels`` voxels (default :data:`MAX_LEVEL_VOXELS`, read at call time). Returns the delayed level writes
    (already computed, unless ``compute=False``). Safe to rerun: levels are rewritten. ``attrs`` are
    written into the case's attributes with the ``ome`` block, in the same (last) metadata write.
    """
    arrays = {n: a for n in (*_IMAGE_ARRAYS, *_LABEL_ARRAYS) if isinstance(a := case.get(n), zarr.Array)}
    image_name = next((n for n in _IMAGE_ARRAYS if n in arrays), None)
    label_arrays = [n for n in _LABEL_ARRAYS if n in arrays]
    if image_name is None and not label_arrays:
        return []
    base = arrays[image_name or label_arrays[0]]
    eager = compute and is_small_case(math.prod(base.shape))  # levels computed in memory
    limit = MAX_LEVEL_VOXELS if max_voxels is None else int(max_voxels)
    factors = pyramid_factors(base.shape[-3:], geometry.spacing_zyx, max_voxels=limit)
    spacing, origin = geometry.spacing_zyx, geometry.origin_zyx
    names = label_names(labels, regions_class_order, predicted=kind == "prediction")
    for stale in (LEVELS_GROUP, "labels"):
        if stale in case:
            del case[stale]
    writes: list[Any] = []
    ome: dict[str, Any] = {"version": NGFF_VERSION}
    if image_name is None:  # a prediction without probabilities: the case is the label image
        name = label_arrays[0]
        paths = _level_paths(name, len(factors), in_label_group=False)
        writes += _pyramid(
            case, arrays[name], paths, factors, mean=False, dims=("z", "y", "x"), copy_base=False, eager=eager
        )
        ome["multiscales"] = [
            multiscales_metadata(
                name=case_id,
                paths=paths,
                spacing_zyx=spacing,
                origin_zyx=origin,
                factors=factors,
                channel=False,
                mean=False,
            )
        ]
        ome["image-label"] = image_label_metadata(names, source=None)
    else:
        paths = _level_paths(image_name, len(factors), in_label_group=False)
        writes += _pyramid(
            case, base, paths, factors, mean=True, dims=("c", "z", "y", "x"), copy_base=False, eager=eager
        )
        ome["multiscales"] = [
            multiscales_metadata(
                name=case_id,
                paths=paths,
                spacing_zyx=spacing,
                origin_zyx=origin,
                factors=factors,
                channel=True,
                mean=True,
            )
        ]
        if label_arrays:
            writes += _label_images(
                case, {n: arrays[n] for n in label_arrays}, names, factors, spacing, origin, eager=eager
            )
    if compute and writes:
        sched = _scheduler()
        with dask.config.set(scheduler=sched) if sched else contextlib.nullcontext():
            dask.compute(*writes)
    case.attrs.update({"ome": ome, **dict(attrs or {})})
    return writes
