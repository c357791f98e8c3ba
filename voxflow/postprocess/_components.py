"""Connected components of chunked (dask) masks, equal to ``scipy.ndimage.label`` up to a permutation.

Two passes over the mask, each holding one block per worker:

1. *Summary pass* -- every block is labelled on its own (cc3d, see ``_label_block``); the task keeps
   only the block's component count, its first/last plane along each axis (local labels), the local
   labels on the array border and, when asked, the local component sizes.
2. *Tables* (one small task) -- global labels are ``local + offset(block)``; the planes on both sides
   of every block boundary, assembled across the whole array, give the pairs of global labels that
   touch (for each structuring-element offset that crosses the boundary, so that edge and corner
   neighbours count under full connectivity); a union-find (``scipy.sparse.csgraph``) merges them.
   Each merged group keeps its smallest global label; final labels are the kept ones renumbered
   ``1..n`` in order.
3. *Relabel pass* -- each block is labelled again and mapped through its lookup table. Blocks the
   tables settle need no labelling: one with no component or a single one (its foreground takes one
   label), and, when selecting components, one whose components are all kept (its foreground) or
   none (background) -- most blocks of a segmentation, where the mask is one organ and a few specks.

Passes 1-2 are one ``dask.compute`` (small results); pass 3 is a lazy blockwise graph given the
computed tables. Keeping them apart means the mask is read twice instead of every block being
held in memory until the tables exist (a single graph would hold them: pass 3 of any block needs
the tables, which need every block). A lazy "second read" via ``dask.graph_manipulation.bind``
was tried and dropped: with dask 2026.8 it loses tasks of ``from_delayed(...).rechunk(...)``
graphs ("Missing dependency rechunk-split-...").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cc3d
import dask
import dask.array as da
import numpy as np
import scipy.ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from voxflow.errors import ConnectivityError, VoxflowError

__all__ = [
    "ComponentTables",
    "component_sizes",
    "connectivity_structure",
    "PendingFilter",
    "filter_components",
    "finish_filters",
    "label_components",
    "prepare_filter",
    "select_components",
]

Decide = Callable[["ComponentTables"], np.ndarray]


def connectivity_structure(ndim: int, connectivity: int) -> np.ndarray:
    """Structuring element for ``connectivity``.

    Accepts the rank form of ``scipy.ndimage.generate_binary_structure`` (1 = face neighbours,
    ``ndim`` = full) or the neighbour counts 4/8 (2D) and 6/18/26 (3D).
    """
    counts = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}.get(ndim, {})
    rank = counts.get(int(connectivity), int(connectivity))
    if not 1 <= rank <= ndim:
        allowed = sorted({*range(1, ndim + 1), *counts})
        raise ConnectivityError(
            f"connectivity must be one of {allowed} for a {ndim}-D mask; got {connectivity!r}. "
            f"Use 1 for face neighbours or {ndim} for full connectivity."
        )
    structure: np.ndarray = ndi.generate_binary_structure(ndim, rank)
    return structure


def _label_block(block: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """Label one block: ``connected-components-3d`` (cc3d) for 2-D/3-D blocks, scipy otherwise.

    Both number components 1..n; cc3d is several times faster than ``scipy.ndimage.label`` for the
    same partition (see ``benchmarks/components.py``), which the tests check against scipy.
    """
    mask = np.ascontiguousarray(block, dtype=bool)
    if mask.ndim in (2, 3) and mask.size:
        rank = int(np.abs(np.argwhere(structure) - 1).sum(axis=1).max())  # 1 faces .. ndim full
        # cc3d 4.1.1 mislabels 2-D arrays under 8-connectivity and 3-D arrays with a length-1 axis under
        # 26-connectivity (found by tests/postprocess/test_components.py). Label 2-D as one 3-D plane
        # (6/18 = 4/8 in-plane) and use 18 when an axis has length 1 (where it equals 26): the same
        # partition, on cc3d's correct paths.
        vol = mask[None] if mask.ndim == 2 else mask
        conn: Literal[6, 18, 26] = 6 if rank == 1 else 18 if rank == 2 else 26
        if conn == 26 and min(vol.shape) == 1:
            conn = 18
        lab, n = cc3d.connected_components(vol, connectivity=conn, return_N=True, out_dtype=np.uint32)
        # a view, not a copy: a block holds far fewer than 2**31 components, so the values fit int32
        return lab.reshape(mask.shape).view(np.int32), int(n)  # signed, as scipy's
    lab, n = ndi.label(mask, structure=structure)
    return lab, int(n)


def _small(a: np.ndarray, n: int) -> np.ndarray:
    return a.astype(np.uint16 if n < 2**16 else np.uint32)


def _block_summary(
    block: np.ndarray, structure: np.ndarray, index: tuple[int, ...], numblocks: tuple[int, ...], sizes: bool
) -> dict[str, Any]:
    """Pass 1 for one block: count, boundary planes, border labels, optional sizes."""
    lab, n = _label_block(block, structure)
    lo, hi, border = [], [], []
    for ax in range(lab.ndim):
        first, last = np.take(lab, 0, axis=ax), np.take(lab, -1, axis=ax)
        lo.append(_small(first, n) if index[ax] > 0 else None)
        hi.append(_small(last, n) if index[ax] < numblocks[ax] - 1 else None)
        if index[ax] == 0:
            border.append(_sorted_unique(first.ravel()))
        if index[ax] == numblocks[ax] - 1:
            border.append(_sorted_unique(last.ravel()))
    out: dict[str, Any] = {
        "n": n,
        "lo": lo,
        "hi": hi,
        "border": _sorted_unique(np.concatenate(border)) if border else np.zeros(0, np.int64),
    }
    if sizes:
        out["sizes"] = np.bincount(lab.ravel(), minlength=n + 1).astype(np.int64)
    return out


@dataclass(frozen=True)
class ComponentTables:
    """Everything needed to relabel blocks: offsets, merged labels, optional sizes/border flags.

    ``merged`` holds the sorted global labels absorbed into a smaller one and ``merged_final``
    the final label each of them maps to. ``sizes_vox[k]`` is the voxel count of final component
    ``k`` (index 0 = background, unset) and ``touches_border[k]`` whether it reaches the array border.
    """

    numblocks: tuple[int, ...]
    offsets: np.ndarray
    counts: np.ndarray
    merged: np.ndarray
    merged_final: np.ndarray
    n: int
    sizes_vox: np.ndarray | None = None
    touches_border: np.ndarray | None = None

    def lut(self, flat_index: int) -> np.ndarray:
        """Local label -> final label for one block (C-order block index)."""
        off, cnt = int(self.offsets[flat_index]), int(self.counts[flat_index])
        g = np.arange(off, off + cnt + 1, dtype=np.int64)
        out = g - np.searchsorted(self.merged, g)
        lo, hi = np.searchsorted(self.merged, [off + 1, off + cnt + 1])
        out[self.merged[lo:hi] - off] = self.merged_final[lo:hi]
        out[0] = 0
        return out


def _face_pairs(lower: np.ndarray, upper: np.ndarray, structure: np.ndarray, axis: int) -> np.ndarray:
    """Pairs (a, b) of nonzero labels across one boundary plane; ``lower`` is the plane before it."""
    pairs = []
    sub = np.take(structure, 2, axis=axis)  # offsets reaching into the next plane
    for off in zip(*np.nonzero(sub), strict=True):
        d = [int(o) - 1 for o in off]
        src = tuple(slice(max(0, -k), s - max(0, k)) for k, s in zip(d, lower.shape, strict=True))
        dst = tuple(slice(max(0, k), s - max(0, -k)) for k, s in zip(d, upper.shape, strict=True))
        a, b = lower[src].ravel(), upper[dst].ravel()
        keep = (a != 0) & (b != 0)
        if keep.any():
            pairs.append(_unique_pairs(a[keep], b[keep]))
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The distinct pairs ``(a[i], b[i])`` of non-negative labels (non-empty), as an (n, 2) int64 array
    in lexicographic order, as ``np.unique(axis=0)`` gives them.

    Neighbouring voxels of a plane mostly repeat a pair; runs are dropped first, and the rest are sorted
    as one int64 key per pair (below 2**31 labels): 0.10 s instead of 1.28 s for 1 M pairs here.
    """
    a, b = a.astype(np.int64, copy=False), b.astype(np.int64, copy=False)
    first = _run_starts(a, b)
    a, b = a[first], b[first]
    if max(int(a.max()), int(b.max())) >= 2**31:
        return np.unique(np.stack([a, b], axis=1), axis=0)
    key = _sorted_unique((a << 32) | b)
    return np.stack([key >> 32, key & 0xFFFFFFFF], axis=1)


def _run_starts(*columns: np.ndarray) -> np.ndarray:
    """Where a run of equal rows starts: True at 0 and wherever any of the equal-length ``columns`` changes."""
    first = np.zeros(len(columns[0]), dtype=bool)
    first[:1] = True
    for c in columns:
        first[1:] |= c[1:] != c[:-1]
    return first


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique(x)`` of a 1-D array by sorting: numpy 2.4's ``np.unique`` hashes, which took 1.1 s
    for 1 M distinct int64 values here against 0.02 s for a sort."""
    s = np.sort(x)
    out: np.ndarray = s[_run_starts(s)]
    return out


def _assemble_plane(summaries: np.ndarray, offsets: np.ndarray, axis: int, i: int, side: str) -> np.ndarray:
    """Global-label plane across the whole array: ``side`` planes of the blocks at index ``i``."""
    sl = np.take(summaries, i, axis=axis)
    off = np.take(offsets.reshape(summaries.shape), i, axis=axis)
    tiles = np.empty(sl.shape, dtype=object)
    for idx in np.ndindex(sl.shape):
        p = sl[idx][side][axis].astype(np.int64)
        tiles[idx] = np.where(p > 0, p + off[idx], 0)
    return np.block(tiles.tolist()) if tiles.ndim else tiles[()]


def _build_tables(
    summaries_list: list[dict[str, Any]], numblocks: tuple[int, ...], structure: np.ndarray
) -> ComponentTables:
    flat = np.empty(len(summaries_list), dtype=object)
    flat[:] = summaries_list
    summaries = flat.reshape(numblocks)
    counts = np.array([s["n"] for s in summaries_list], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    total = int(counts.sum())
    pairs = [np.zeros((0, 2), np.int64)]
    for ax, nb in enumerate(numblocks):
        for i in range(nb - 1):
            lower = _assemble_plane(summaries, offsets, ax, i, "hi")
            upper = _assemble_plane(summaries, offsets, ax, i + 1, "lo")
            pairs.append(_face_pairs(lower, upper, structure, ax))
    allp = np.concatenate(pairs)
    merged, merged_final = _merge(allp)
    # final label of a kept global label g: g minus the merged labels below it
    merged_final = merged_final - np.searchsorted(merged, merged_final)
    tables = ComponentTables(
        numblocks=numblocks,
        offsets=offsets,
        counts=counts,
        merged=merged,
        merged_final=merged_final,
        n=total - len(merged),
    )
    return _with_extras(tables, summaries_list)


def _merge(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over label pairs: (absorbed labels sorted, the smallest label of their group)."""
    if len(pairs) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, inv = np.unique(pairs.ravel(), return_inverse=True)
    inv = inv.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(inv), np.int8), (inv[:, 0], inv[:, 1])), shape=(len(nodes),) * 2)
    _, comp = connected_components(graph, directed=False)
    rep = np.full(comp.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(rep, comp, nodes)
    root = rep[comp]
    absorbed = nodes != root
    return nodes[absorbed], root[absorbed]


def _with_extras(tables: ComponentTables, summaries: list[dict[str, Any]]) -> ComponentTables:
    touches = np.zeros(tables.n + 1, dtype=bool)
    sizes = np.zeros(tables.n + 1, dtype=np.int64) if "sizes" in summaries[0] else None
    for b, s in enumerate(summaries):
        lut = tables.lut(b)
        touches[lut[s["border"]]] = True
        if sizes is not None:
            np.add.at(sizes, lut[1:], s["sizes"][1:])
    touches[0] = False
    return ComponentTables(**{**tables.__dict__, "sizes_vox": sizes, "touches_border": touches})


def _tables_graph(mask: da.Array, structure: np.ndarray, sizes: bool) -> Any:
    """A delayed :class:`ComponentTables` for ``mask`` (pass 1 + merge)."""
    blocks = mask.to_delayed()
    summary = dask.delayed(_block_summary, pure=True)
    parts = [summary(blocks[idx], structure, idx, mask.numblocks, sizes) for idx in np.ndindex(mask.numblocks)]
    return dask.delayed(_build_tables, pure=True)(parts, mask.numblocks, structure)


def _check_mask(mask: da.Array) -> da.Array:
    if not isinstance(mask, da.Array):
        mask = da.asarray(mask)
    if mask.ndim < 2 or any(np.isnan(c) for cs in mask.chunks for c in cs):
        raise VoxflowError(f"mask must be a dask array with known chunks; got shape {mask.shape} chunks {mask.chunks}")
    return mask


def _relabel(
    block: np.ndarray,
    tables: ComponentTables,
    structure: np.ndarray,
    dtype: np.dtype,
    block_id: tuple[int, ...] | None = None,
) -> np.ndarray:
    assert block_id is not None  # dask's map_blocks always passes it
    flat = int(np.ravel_multi_index(block_id, tables.numblocks))
    lut = tables.lut(flat).astype(dtype)
    if tables.counts[flat] <= 1:  # no component, or one: its voxels are the foreground, no labelling
        return np.where(np.asarray(block) != 0, lut[-1], 0).astype(dtype, copy=False)
    lab, _ = _label_block(block, structure)
    # gather through a lookup table of the output dtype: half the memory traffic of an int64 table
    # followed by a cast (the gather costs about as much as labelling the block)
    out: np.ndarray = lut[lab]
    return out


def _select(
    block: np.ndarray,
    tables: ComponentTables,
    keep: np.ndarray,
    structure: np.ndarray,
    block_id: tuple[int, ...] | None = None,
) -> np.ndarray:
    assert block_id is not None  # dask's map_blocks always passes it
    lut = tables.lut(int(np.ravel_multi_index(block_id, tables.numblocks)))
    kept = keep[lut]
    if not kept[1:].any():  # no component of this block kept (or none there): no labelling
        return np.zeros(block.shape, dtype=bool)
    if kept[1:].all():  # every component kept: the result is the block's foreground
        foreground: np.ndarray = np.asarray(block) != 0
        return foreground
    lab, _ = _label_block(block, structure)
    out: np.ndarray = kept[lab]
    return out


def label_components(mask: da.Array, *, connectivity: int = 1) -> tuple[da.Array, int]:
    """Label the connected components of a chunked boolean mask.

    Parameters
    ----------
    mask : dask array, any dimensionality (``(Z, Y, X)`` or ``(Y, X)``), nonzero = foreground.
    connectivity : 1 (faces; 6 in 3D, 4 in 2D) up to ``ndim`` (full; 26 / 8), or a neighbour count.

    Returns
    -------
    (labels, n) : lazy int32 labels (0 = background, ``1..n``), chunked like ``mask``, the same
    partition as ``scipy.ndimage.label`` with the same structure; and the number of components.
    Finding ``n`` runs the summary pass over the mask now (one block per task, small results);
    the returned labels stay lazy.
    """
    mask = _check_mask(mask)
    structure = connectivity_structure(mask.ndim, connectivity)
    tables: ComponentTables = _tables_graph(mask, structure, sizes=False).compute()
    dtype = np.dtype(np.int32 if tables.n < 2**31 - 1 else np.int64)
    labels = da.map_blocks(
        _relabel, mask, tables, structure, dtype, dtype=dtype, meta=np.empty((0,) * mask.ndim, dtype=dtype)
    )
    return labels, tables.n


def component_sizes(
    mask: da.Array, *, connectivity: int = 1, spacing: tuple[float, ...] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sizes of the components :func:`label_components` finds, without loading the volume.

    Returns ``(sizes_vox, sizes_mm3)`` indexed by final label (index 0 unused, 0); ``sizes_mm3`` is
    ``None`` without ``spacing`` (mm per voxel along each axis, array order).
    """
    mask = _check_mask(mask)
    structure = connectivity_structure(mask.ndim, connectivity)
    tables: ComponentTables = _tables_graph(mask, structure, sizes=True).compute()
    sizes = tables.sizes_vox
    assert sizes is not None  # built with sizes=True
    mm3 = sizes * float(np.prod(spacing)) if spacing is not None else None
    return sizes, mm3


def select_components(mask: da.Array, decide: Decide, *, connectivity: int = 1, sizes: bool = True) -> da.Array:
    """Boolean mask of the components for which ``decide(tables)[final_label]`` is true.

    ``decide`` receives the :class:`ComponentTables` (with ``sizes_vox`` when ``sizes`` and
    ``touches_border``) and returns a bool array of length ``n + 1``. The summary pass runs now;
    the returned mask is lazy.
    """
    return filter_components(mask, _identity, decide, _kept_only, connectivity=connectivity, sizes=sizes)


def _identity(mask: da.Array) -> da.Array:
    return mask


def _kept_only(_source: da.Array, _mask: da.Array, kept: da.Array) -> da.Array:
    return kept


@dataclass(frozen=True)
class PendingFilter:
    """A component filter whose tables are still a lazy (delayed) summary pass over ``source``."""

    source: da.Array
    to_mask: Callable[[da.Array], da.Array]
    decide: Decide
    combine: Callable[[da.Array, da.Array, da.Array], da.Array]
    structure: np.ndarray
    tables: Any

    def finish(self, tables: ComponentTables) -> da.Array:
        """The lazy result, given the computed tables: one more blockwise pass over ``source``."""
        keep = _keep_array(tables, self.decide)
        mask = self.to_mask(self.source)
        kept = da.map_blocks(
            _select, mask, tables, keep, self.structure, dtype=bool, meta=np.empty((0,) * mask.ndim, dtype=bool)
        )
        return self.combine(self.source, mask, kept)


def prepare_filter(
    source: da.Array,
    to_mask: Callable[[da.Array], da.Array],
    decide: Decide,
    combine: Callable[[da.Array, da.Array, da.Array], da.Array],
    *,
    connectivity: int = 1,
    sizes: bool = True,
) -> PendingFilter:
    """Build (lazily) the summary pass of a filter on ``mask = to_mask(source)``; see :func:`finish_filters`."""
    mask = _check_mask(to_mask(source))
    structure = connectivity_structure(mask.ndim, connectivity)
    return PendingFilter(source, to_mask, decide, combine, structure, _tables_graph(mask, structure, sizes=sizes))


def finish_filters(pending: Sequence[PendingFilter]) -> list[da.Array]:
    """Compute the tables of several filters in one dask call (parallel over cases and blocks).

    The results are lazy and read their sources again block by block, so no block is held
    between the two passes and chains of filters stay linear in work.
    """
    tables = dask.compute(*[p.tables for p in pending])
    return [p.finish(t) for p, t in zip(pending, tables, strict=True)]


def filter_components(
    source: da.Array,
    to_mask: Callable[[da.Array], da.Array],
    decide: Decide,
    combine: Callable[[da.Array, da.Array, da.Array], da.Array],
    *,
    connectivity: int = 1,
    sizes: bool = True,
) -> da.Array:
    """``combine(source, mask, kept)``, ``mask = to_mask(source)``, ``kept`` flagging its chosen components.

    The building block of the label-map operations: the summary pass over ``source`` runs now
    (streaming, one block per task), the result is lazy.
    """
    return finish_filters([prepare_filter(source, to_mask, decide, combine, connectivity=connectivity, sizes=sizes)])[0]


def _keep_array(tables: ComponentTables, decide: Decide) -> np.ndarray:
    keep = np.asarray(decide(tables), dtype=bool)
    if keep.shape != (tables.n + 1,):
        raise VoxflowError(f"a component filter must return n + 1 = {tables.n + 1} flags; got shape {keep.shape}")
    kept: np.ndarray = keep.copy()
    kept[0] = False
    return kept
