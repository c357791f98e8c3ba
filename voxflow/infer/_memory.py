"""Keep the allocator from hoarding memory during long tile loops.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB on 64-bit), after
which tile-sized tensors and numpy buffers come from per-thread heaps that rarely shrink: measured
on a 4M-voxel, 8-class prediction, peak RSS was 1.05 GB with the default and 0.53 GB with a fixed
1 MiB threshold. Fixing the threshold makes every large buffer a private mapping that goes back to
the OS when freed.

The price is paid in the tile loop: every forward pass allocates its activations afresh, and as
mappings each of them is page-faulted in (and zeroed by the kernel) again (5 hippocampus cases,
CPU-preset network with TTA: 5.5 s system time beside 19.1 s user, 1.69 M minor faults). So during the
tile loop of a small volume (:func:`tile_loop_allocations`) every buffer comes from glibc's heap (no
mmap at all, ``M_MMAP_MAX`` 0: glibc caps the mmap threshold at 32 MiB, below the activations of a large
tile) and up to one forward pass's memory of free heap is kept, so the next pass reuses the same pages;
after the loop mmap is back, with the fixed threshold, and the heap is trimmed, so what the loop kept
never adds to the write phase. Measured on nnU-Net's 6-stage CT network (one 96 x 192 x 192 volume,
eight 80 x 160 x 160 tiles, 2 threads): 29.1 s system time beside 137.7 s user and 8.7 M minor faults
with the 32 MiB threshold alone, 11.1 s beside 134.8 s and 3.2 M with no mmap: 89.5 s -> 79.5 s wall, at
a higher peak RSS (2.84 -> 3.57 GB, the heap's fragmentation; most likely torch's aligned requests do not fit a
freed chunk of the same size that a small allocation now follows, so the heap grows by a few buffers
before it reuses them). Transparent huge pages
(``THP_MEM_ALLOC_ENABLE=1``) cut the faults to 0.37 M but doubled the system time (61 s: compaction).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = [
    "DEFAULT_FORWARD_BYTES",
    "forward_bytes_per_voxel",
    "release_large_allocations",
    "tile_loop_allocations",
    "trim_heap",
]

log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536  # glibc's
_DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's
_INT_MAX = 2**31 - 1  # mallopt takes a C int
_fixed_threshold: list[int] = []  # the threshold release_large_allocations() set in this process


def _glibc_call(name: str, *args: int) -> int | None:
    """``name(*args)`` from glibc, or ``None`` where there is no glibc (other platforms, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return int(getattr(ctypes.CDLL("libc.so.6"), name)(*args))
    except (OSError, AttributeError):
        return None


def release_large_allocations(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations of at least ``threshold_bytes`` with mmap (glibc only; process-wide).

    Returns whether the setting was applied (False on other platforms or C libraries).
    """
    ok = bool(_glibc_call("mallopt", _M_MMAP_THRESHOLD, int(threshold_bytes)))
    log.debug("glibc mmap threshold fixed at %d bytes: %s", threshold_bytes, ok)
    if ok:
        _fixed_threshold[:] = [int(threshold_bytes)]
    return ok


@contextlib.contextmanager
def tile_loop_allocations(keep_bytes: int, *, enabled: bool = True) -> Iterator[bool]:
    """Inside: every buffer from glibc's heap (no mmap) and up to ``keep_bytes`` of free heap kept (not
    given back), so successive forward passes reuse their pages instead of faulting fresh mappings in.
    On exit mmap and the threshold of :func:`release_large_allocations` are back and the heap is
    trimmed. Does nothing (yields False) unless that threshold was fixed in this process,
    or with ``enabled=False``.

    For small volumes only (the engine enables it below :data:`~voxflow.cluster.SMALL_CASE_VOXELS`): on
    a volume larger than its memory cap (``tests/infer/test_infer_memory.py``, 128 MiB tile cache) the
    heap kept growing with the partial blocks allocated and freed between the passes and the run failed
    at the cap, where the fixed 1 MiB threshold stays flat."""
    if not _fixed_threshold or not enabled:
        yield False
        return
    applied = bool(_glibc_call("mallopt", _M_MMAP_MAX, 0)) and bool(
        _glibc_call("mallopt", _M_TRIM_THRESHOLD, min(int(keep_bytes), _INT_MAX))
    )
    try:
        yield applied
    finally:
        _glibc_call("mallopt", _M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        _glibc_call("mallopt", _M_MMAP_THRESHOLD, _fixed_threshold[0])
        _glibc_call("mallopt", _M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        trim_heap()


def trim_heap() -> bool:
    """Give the free pages of glibc's heaps back to the OS (``malloc_trim(0)``).

    Buffers below the mmap threshold (the accumulator's 256 KiB blocks, dask's small chunks) are
    freed into the heap, which keeps their pages: without a trim between the tile loop and the
    write phase, their peaks add up (measured at 512 M voxels with a 256 MB tile cache: 288 MB of
    free heap still resident during the write). Returns whether a trim ran (glibc only).
    """
    return _glibc_call("malloc_trim", 0) is not None


#: default memory for the activations of one forward pass (``PredictOptions.forward_bytes``)
DEFAULT_FORWARD_BYTES = 2 * 2**30


def forward_bytes_per_voxel(spec: Any, patch_size_vox: Sequence[int], in_channels: int, n_outputs: int) -> float:
    """Bytes per tile voxel a forward pass takes with tiles of about ``patch_size_vox`` (z, y, x), for
    ``TilePredictor(voxel_bytes=...)``: how many mirrored tiles, and how large a whole-image tile,
    fit ``PredictOptions.forward_bytes``.

    Priced with the planner's memory model (:func:`voxflow.architectures.estimate_training_memory_bytes`
    of one fp32 sample, parameters left out): what training keeps for autograd, an upper bound of what
    an inference pass holds at once. ``spec`` is a :class:`~voxflow.plan.NetworkSpec`.
    """
    from voxflow.architectures import estimate_training_memory_bytes

    total = estimate_training_memory_bytes(
        spec, patch_size_vox, 1, in_channels, n_outputs, bytes_per_element=4, n_parameters=0
    )
    return max(total, 1) / math.prod(int(p) for p in patch_size_vox)
