"""Gaussian-weighted sliding-window prediction of one volume into a (Zarr) accumulator."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxflow.infer._accumulator import DEFAULT_CACHE_BYTES, TileAccumulator, order_tiles
from voxflow.infer._gaussian import gaussian_importance_map
from voxflow.infer._tiling import TileGrid, tile_grid

__all__ = ["read_tile", "sliding_window_predict", "sliding_window_predict_in_memory"]

log = logging.getLogger(__name__)
Predictor = Callable[[np.ndarray], "torch.Tensor | np.ndarray"]


def read_tile(image: Any, grid: TileGrid, start: Sequence[int]) -> np.ndarray:
    """The (C, *patch) tile at ``start`` (padded grid) of a (C, Z, Y, X) array; zeros outside."""
    vol, loc = grid.region(start)
    src = (slice(None), *(slice(lo, hi) for lo, hi in vol))
    data = np.asarray(image[src], dtype=np.float32)
    if all(hi - lo == p for (lo, hi), p in zip(loc, grid.patch_size_vox)):
        return data
    tile = np.zeros((data.shape[0], *grid.patch_size_vox), np.float32)
    dst = (slice(None), *(slice(lo, hi) for lo, hi in loc))
    tile[dst] = data
    return tile


def _batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def sliding_window_predict(
    image: Any,
    predictor: Predictor,
    *,
    patch_size_vox: Sequence[int],
    n_classes: int,
    out: Any = None,
    step: float = 0.5,
    batch_size: int = 1,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    block_zyx: Sequence[int] | None = None,
    scratch_dir: str | Path | None = None,
    progress: bool = False,
    desc: str = "tiles",
    importance_map: np.ndarray | None = None,
    whole_image_voxels: int = 0,
    divisor_zyx: Sequence[int] | None = None,
) -> Any:
    """Predict class probabilities of a (C, Z, Y, X) volume tile by tile.

    Each tile's probabilities are weighted with :func:`gaussian_importance_map` and accumulated by a
    :class:`TileAccumulator`; the result is ``sum(w * p) / sum(w)`` per voxel, shape (K, Z, Y, X).

    Parameters
    ----------
    image : (C, Z, Y, X) array read by slicing (a Zarr array, numpy array or dask array); only the
        tiles being predicted are read, the next batch while the current one runs.
    predictor : maps (B, C, *patch) float32 tiles to (B, K, *patch) scores -- probabilities, or
        logits for nnU-Net models (a :class:`TilePredictor`).
    out : (K, Z, Y, X) destination (e.g. a float32 Zarr array); a numpy array when ``None``.
    block_zyx : accumulation block; defaults to ``out``'s spatial chunks, or the patch size.
    cache_bytes : memory for partial blocks before they spill to ``scratch_dir``.
    importance_map : tile weights of shape ``patch_size_vox`` instead of
        :func:`gaussian_importance_map` (e.g. nnU-Net's own map for nnU-Net models); all > 0.
    whole_image_voxels, divisor_zyx : whole-image tiles up to that many voxels, divisible by
        ``divisor_zyx`` (see :func:`~voxflow.infer.tile_grid`); every voxel then lies in one tile, and
        the weights are uniform (they cancel).
    """
    shape = tuple(int(s) for s in image.shape[1:])
    grid = tile_grid(shape, patch_size_vox, step=step, whole_image_voxels=whole_image_voxels, divisor_zyx=divisor_zyx)
    if grid.patch_size_vox != tuple(int(p) for p in patch_size_vox):
        importance_map = np.ones(grid.patch_size_vox, np.float32)
    if out is None:
        out = np.zeros((n_classes, *shape), np.float32)
    if block_zyx is None:
        chunks = getattr(out, "chunks", None)
        block_zyx = tuple(chunks[1:]) if chunks is not None else tuple(grid.patch_size_vox)
    starts = grid.start_array()  # (n, 3): per-tile bookkeeping stays numpy, ~50 bytes per tile
    vol_boxes = grid.volume_boxes(starts)
    gauss = _tile_weights(importance_map, grid)
    with TileAccumulator(out, vol_boxes, block_zyx=block_zyx, cache_bytes=cache_bytes, scratch_dir=scratch_dir) as acc:
        order = order_tiles(vol_boxes, block_zyx=acc.block_zyx, block_nbytes=acc.block_nbytes, cache_bytes=cache_bytes)
        del vol_boxes
        bar = _bar(len(starts), desc, progress)
        _accumulate(image, predictor, grid, starts, _batches(order, batch_size), gauss, acc, bar)
        if bar is not None:
            bar.close()
        if acc.n_spills:
            log.info(
                "sliding window: %d block spills to disk (cache %d MiB, spill file peak %d MiB)",
                acc.n_spills,
                cache_bytes >> 20,
                acc.spill_file_bytes >> 20,
            )
    return out


def _tile_weights(importance_map: np.ndarray | None, grid: TileGrid) -> torch.Tensor:
    """The tile weights: ``importance_map`` (checked) or :func:`gaussian_importance_map`."""
    if importance_map is None:
        importance_map = gaussian_importance_map(grid.patch_size_vox)
    elif tuple(np.shape(importance_map)) != tuple(grid.patch_size_vox) or not np.all(np.asarray(importance_map) > 0):
        raise ValueError(
            f"importance_map must have the patch shape {tuple(grid.patch_size_vox)} and positive "
            f"values; got shape {np.shape(importance_map)}."
        )
    return torch.from_numpy(np.ascontiguousarray(importance_map, dtype=np.float32))


def weighted_batches(
    image: Any,
    predictor: Predictor,
    grid: TileGrid,
    starts: np.ndarray,
    batches: Sequence[np.ndarray],
    weights: torch.Tensor,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per batch: its tile indices and the weighted scores ``predictor(tiles) * weights`` (B, K, *patch)
    float32 on the host, reading the next batch's tiles in a background thread while one runs.

    The one place this arithmetic lives: the single-process accumulator and the cluster's block
    tasks (:mod:`voxflow.infer._blocks`) both use it, so their sums are bit-identical."""
    if not len(batches):
        return
    on_device: dict[torch.device, torch.Tensor] = {}
    # a predictor whose output is its own (TilePredictor) is weighted in place: one batch of scores less
    # at the loop's peak; any other callable's output may be an array it keeps, so it is copied
    fresh = bool(getattr(predictor, "fresh_output", False))

    def load(idx: np.ndarray) -> np.ndarray:
        return np.stack([read_tile(image, grid, starts[i]) for i in idx])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxflow-tile-reader") as pool:
        pending = pool.submit(load, batches[0])
        for bi, idx in enumerate(batches):
            tiles = pending.result()
            if bi + 1 < len(batches):
                pending = pool.submit(load, batches[bi + 1])
            probs = torch.as_tensor(predictor(tiles))
            w = on_device.setdefault(probs.device, weights.to(probs.device))
            with torch.inference_mode():  # the predictor's output is an inference tensor
                weighted = probs.mul_(w) if fresh and probs.dtype == w.dtype else probs * w
            yield idx, weighted.cpu().numpy()


def _accumulate(
    image: Any,
    predictor: Predictor,
    grid: TileGrid,
    starts: np.ndarray,
    batches: list[np.ndarray],
    gauss: torch.Tensor,
    acc: TileAccumulator,
    bar: Any,
) -> None:
    """Predict the batches and add them to ``acc``."""
    gauss_np = gauss.numpy()
    for idx, weighted in weighted_batches(image, predictor, grid, starts, batches, gauss):
        for j, i in enumerate(idx):
            vol, loc = grid.region(starts[i])
            sl = tuple(slice(lo, hi) for lo, hi in loc)
            every_class = (slice(None), *sl)
            acc.add(vol, weighted[j][every_class], gauss_np[sl])
        if bar is not None:
            bar.update(len(idx))


def sliding_window_predict_in_memory(
    image: np.ndarray, predictor: Predictor, *, patch_size_vox: Sequence[int], n_classes: int, step: float = 0.5
) -> np.ndarray:
    """Reference (nnU-Net style): the whole volume and two whole-volume accumulators in memory.

    Same tiles, same Gaussian weighting as :func:`sliding_window_predict`; used as its test oracle
    and as the memory baseline in ``benchmarks/predict.py``.
    """
    image = np.asarray(image, dtype=np.float32)
    grid = tile_grid(image.shape[1:], patch_size_vox, step=step)
    pad = [(0, 0)] + [
        (lo, max(p - s, 0) - lo) for lo, p, s in zip(grid.pad_lo_zyx, grid.patch_size_vox, image.shape[1:])
    ]
    padded = np.pad(image, pad)
    gauss = gaussian_importance_map(grid.patch_size_vox)
    acc = np.zeros((n_classes, *padded.shape[1:]), np.float32)
    wsum = np.zeros(padded.shape[1:], np.float32)
    for start in grid.tiles():
        sl = tuple(slice(s, s + p) for s, p in zip(start, grid.patch_size_vox))
        every_class = (slice(None), *sl)
        probs = torch.as_tensor(predictor(padded[every_class][None])).cpu().numpy()[0]
        acc[every_class] += probs * gauss
        wsum[sl] += gauss
    acc /= wsum
    crop = tuple(slice(lo, lo + s) for lo, s in zip(grid.pad_lo_zyx, image.shape[1:]))
    inside = (slice(None), *crop)
    return acc[inside]


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tile", leave=False)
