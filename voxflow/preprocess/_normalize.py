"""Per-channel intensity normalisation following the plan's :class:`ChannelNormalization`.

Per-image statistics (``zscore``, ``rescale_0_1``) are small dask reductions inside the same graph
as the normalised output; nothing is computed here. To keep memory bounded, the statistics are
reduced from a *clone* of the input (its own reads, released block by block) and the normalised
branch is *bound* to them, so its reads start only once the scalars exist: the image is read
twice instead of being held in memory until the reduction finishes. (``dask.graph_manipulation``
``clone``/``bind`` would do this but lose keys of sliced arrays in dask 2026.8, hence
:func:`_rekeyed`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import dask.array as da
import numpy as np
from dask._task_spec import Task, TaskRef, convert_legacy_graph
from dask.base import tokenize
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph

from voxflow.errors import VoxflowError
from voxflow.plan.schema import ChannelNormalization

__all__ = ["normalize"]

_EPS = 1e-8


def _first(value: object, *_after: object) -> object:
    return value


def _rekeyed(x: da.Array, salt: str, *, after: Sequence[da.Array] = ()) -> da.Array:
    """An independent copy of ``x``'s graph (every key renamed), optionally starting after ``after``.

    The copy recomputes ``x`` from its sources instead of sharing results with other users of
    ``x``; with ``after`` its source tasks additionally wait for those (small) arrays.
    """
    keys = set(flatten(x.__dask_keys__()))
    graph = cast(HighLevelGraph, x.__dask_graph__())
    dsk = convert_legacy_graph(dict(graph.cull(keys)))
    suffix = f"-{salt}-{tokenize(x.name, salt, [a.name for a in after])[:10]}"

    def rename(k: object) -> object:
        return (f"{k[0]}{suffix}", *k[1:]) if isinstance(k, tuple) else f"{k}{suffix}"

    subs = {k: rename(k) for k in dsk}
    after_keys = [k for a in after for k in flatten(a.__dask_keys__())]
    new: dict[Any, Any] = {}
    for k, task in dsk.items():
        node = task.substitute(subs, key=subs[k])
        if after_keys and not task.dependencies:
            node = Task(subs[k], _first, node.substitute({}, key=f"{subs[k]}-inner"), *(TaskRef(a) for a in after_keys))
        new[subs[k]] = node
    name = f"{x.name}{suffix}"
    layers: dict[str, Any] = {name: new}
    deps: dict[str, set[str]] = {name: set()}
    for a in after:
        hlg = cast(HighLevelGraph, a.__dask_graph__())
        layers.update(hlg.layers)
        deps.update(hlg.dependencies)
        deps[name].add(a.name)
    graph = HighLevelGraph(layers, deps)
    return da.Array(graph, name, x.chunks, meta=x._meta)


def _stats(x: da.Array, mask: da.Array | None) -> dict[str, da.Array]:
    """Lazy float64 count, mean, std, min and max of ``x`` (within ``mask`` if given)."""
    x64 = x.astype(np.float64)
    if mask is None:
        n = da.asarray(float(np.prod(x.shape)))
        s1, s2 = x64.sum(), (x64 * x64).sum()
        lo, hi = x.min(), x.max()
    else:
        n = mask.sum(dtype=np.float64)
        s1, s2 = da.where(mask, x64, 0.0).sum(), da.where(mask, x64 * x64, 0.0).sum()
        lo, hi = da.where(mask, x, np.inf).min(), da.where(mask, x, -np.inf).max()
    safe_n = da.maximum(n, 1.0)
    mean = s1 / safe_n
    var = da.maximum(s2 / safe_n - mean * mean, 0.0)
    return {"n": n, "mean": mean, "std": da.sqrt(var), "min": lo, "max": hi}


def _apply(
    x: da.Array, spec: ChannelNormalization, stats: dict[str, da.Array] | None, mask: da.Array | None
) -> da.Array:
    x = x.astype(np.float32)
    if spec.scheme == "none":
        return x
    if spec.scheme == "ct":
        lower, upper = float(spec.lower or 0.0), float(spec.upper or 0.0)  # required by the schema for 'ct'
        out = (da.clip(x, lower, upper) - np.float32(spec.mean or 0.0)) / np.float32(max(spec.std or 0.0, _EPS))
        return out.astype(np.float32)
    if stats is None:
        raise VoxflowError(f"normalization scheme {spec.scheme!r} needs per-image statistics")
    empty = stats["n"] == 0
    if spec.scheme == "zscore":
        shift, scale = stats["mean"], da.maximum(stats["std"], _EPS)
    else:  # rescale_0_1
        shift, scale = stats["min"], da.maximum(stats["max"] - stats["min"], _EPS)
    shift = da.where(empty, 0.0, shift).astype(np.float32)
    scale = da.where(empty, 1.0, scale).astype(np.float32)
    out = (x - shift) / scale
    if mask is not None:
        out = da.where(mask, out, np.float32(0))
    return out.astype(np.float32)


def normalize(image: da.Array, schemes: Sequence[ChannelNormalization]) -> da.Array:
    """Normalise a (C, Z, Y, X) image channel by channel; lazy, float32, same chunks.

    ``ct``: clip to [lower, upper], then (x - mean) / std with the plan's dataset statistics.
    ``zscore``: (x - mean) / std of this image; with ``use_mask`` the statistics come from the
    nonzero mask (any channel nonzero) and voxels outside it are set to 0. ``rescale_0_1``:
    (x - min) / (max - min) of this image (within the mask if ``use_mask``). ``none``: cast.
    A std or range below 1e-8 counts as 1e-8; an empty mask leaves the channel unscaled.
    """
    if image.ndim != 4:
        raise VoxflowError(f"normalize expects a (C, Z, Y, X) image; got shape {image.shape}")
    if len(schemes) != image.shape[0]:
        raise VoxflowError(
            f"the plan must give one normalization per channel; got {len(schemes)} for an image with "
            f"{image.shape[0]} channels. Check that plans.json matches the dataset."
        )
    needs_stats = [s.scheme in ("zscore", "rescale_0_1") for s in schemes]
    any_mask = any(s.use_mask and st for s, st in zip(schemes, needs_stats, strict=True))
    if not any(needs_stats):
        return da.stack([_apply(image[c], s, None, None) for c, s in enumerate(schemes)])
    stats_src = _rekeyed(image, "stats")
    stats_mask = (stats_src != 0).any(axis=0) if any_mask else None
    stats: list[dict[str, da.Array] | None] = [
        _stats(stats_src[c], stats_mask if s.use_mask else None) if st else None
        for c, (s, st) in enumerate(zip(schemes, needs_stats, strict=True))
    ]
    scalars = [v for d in stats if d is not None for v in d.values()]
    src = _rekeyed(image, "normalize", after=scalars)
    mask = (src != 0).any(axis=0) if any_mask else None
    return da.stack(
        [_apply(src[c], s, stats[c], mask if (s.use_mask and needs_stats[c]) else None) for c, s in enumerate(schemes)]
    )
