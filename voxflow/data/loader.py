"""Streaming batch loaders: background threads read patches, the consumer augments on the device.

Each of ``num_workers`` threads owns a :class:`~voxflow.data.sampling.PatchSampler` with its own
random stream (seed, rank, worker) and fills its own bounded queue with raw patches plus the
augmentation :class:`~voxflow.data.augment.Params` of that batch. The consumer takes batch ``k``
from worker ``k % num_workers``, so the sequence of batches depends only on (seed, rank,
num_workers), not on thread timing. Reading and decompressing Zarr chunks releases the GIL, so
threads overlap I/O with the consumer's augmentation (torch ops on ``device``) and training step.

Shutdown: :meth:`BatchLoader.close` (or leaving the ``with`` block) stops and joins the threads;
any exception in a worker is re-raised in the consumer, and any exception or ``KeyboardInterrupt``
raised while the consumer waits closes the loader before propagating. Threads are daemons, so a
forgotten loader never blocks interpreter exit.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from voxflow._types import PathLikeStr
from voxflow.data._cache import ChunkCache
from voxflow.data._transforms import input_footprint
from voxflow.data.augment import AugmentConfig, Params, apply, enlarged_patch_size, sample_params
from voxflow.data.sampling import CaseHandle, PatchSampler, open_cases, stream_rng
from voxflow.errors import ConfigError, LayoutError
from voxflow.plan.schema import Configuration
from voxflow.store import Store

__all__ = ["Batch", "BatchLoader", "build_loader"]

log = logging.getLogger(__name__)
_POLL_S = 0.1


@dataclass
class Batch:
    """One training batch on the loader's device.

    ``image`` (B, C, Z, Y, X) float32 ((B, C, Y, X) for 2D configurations); ``target`` one int64
    (B, 1, ...) label tensor per deep supervision scale, full resolution first; ``case_ids`` and
    ``params`` (the augmentation drawn) for logging.
    """

    image: torch.Tensor
    target: list[torch.Tensor]
    case_ids: tuple[str, ...] = ()
    params: Params | None = field(default=None, repr=False)


@dataclass
class _Raw:
    image: torch.Tensor  # (B, C, *F): the samples without spatial transform
    label: torch.Tensor | None
    case_ids: tuple[str, ...]
    params: Params
    spatial_image: torch.Tensor | None  # (n, C, *P'): footprints of the transformed samples
    spatial_label: torch.Tensor | None


@dataclass
class _Failure:
    error: BaseException


@dataclass(frozen=True, kw_only=True)
class LoaderSpec:
    """What one loader produces (derived from a Configuration by :func:`build_loader`)."""

    batch_size: int
    read_patch_vox: tuple[int, int, int]
    final_patch_vox: tuple[int, ...]  # spatial axes of the network input: 3 (z, y, x) or 2 (y, x)
    n_channels: int
    oversample_foreground: float
    augment: AugmentConfig | None
    ds_scales: tuple[tuple[float, ...], ...] | None
    purpose: str = "train"
    previous_labels: tuple[int, ...] = ()  # a cascade's previous-stage values: one-hot input channels


class BatchLoader:
    """Iterable of :class:`Batch`; infinite when ``n_batches`` is ``None``, else ``n_batches`` long
    and identical on every pass (each ``iter()`` restarts the streams). Use as a context manager."""

    def __init__(
        self,
        cases: Sequence[CaseHandle],
        spec: LoaderSpec,
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        rank: int = 0,
        num_workers: int = 2,
        n_batches: int | None = None,
        prefetch: int = 2,
        cache: ChunkCache | None = None,
    ) -> None:
        self.cases = list(cases)
        self.cache = cache
        self.spec = spec
        self.device = torch.device(device)
        self.seed, self.rank = int(seed), int(rank)
        self.num_workers = max(0, int(num_workers))
        self.n_batches = n_batches
        self.prefetch = max(1, int(prefetch))
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue[Any]] = []
        self._stop = threading.Event()
        self._inline: _Producer | None = None
        self._step = 0
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        self.close()
        self._stop = threading.Event()
        self._step = 0
        self._started = True
        if self.num_workers == 0:
            self._inline = self._producer(0)
            return
        self._queues = [queue.Queue(maxsize=self.prefetch) for _ in range(self.num_workers)]
        self._threads = [
            threading.Thread(
                target=_work,
                daemon=True,
                name=f"voxflow-loader-r{self.rank}-w{w}",
                args=(self._producer(w), w, self.num_workers, self.n_batches, self._queues[w], self._stop),
            )
            for w in range(self.num_workers)
        ]
        for t in self._threads:
            t.start()

    def _producer(self, worker: int) -> _Producer:
        return _Producer(
            self.spec,
            self.cases,
            seed=self.seed,
            rank=self.rank,
            worker=worker,
            pin=self.device.type == "cuda",
            cache=self.cache,
        )

    def close(self) -> None:
        """Stop and join the worker threads; safe to call more than once."""
        self._stop.set()
        for q in self._queues:
            while not q.empty():
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
        for t in self._threads:
            t.join(timeout=10)
            if t.is_alive():  # pragma: no cover - a read stuck in the OS
                log.warning("loader thread %s did not stop within 10 s", t.name)
        self._threads, self._queues, self._inline = [], [], None
        self._started = False

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # ------------------------------------------------------------------ workers
    def _get(self) -> _Raw:
        if self._inline is not None:
            return self._inline.next()
        w = self._step % self.num_workers
        q, t = self._queues[w], self._threads[w]
        while True:
            try:
                item = q.get(timeout=_POLL_S)
            except queue.Empty:
                if not t.is_alive() and q.empty():
                    raise RuntimeError(f"loader thread {t.name} stopped without a batch or an error") from None
                continue
            if isinstance(item, _Failure):
                raise item.error
            return item

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Batch]:
        if self.n_batches is not None or not self._started:
            self._start()
        return self

    def __len__(self) -> int:
        if self.n_batches is None:
            raise TypeError("a training loader is infinite and has no length")
        return self.n_batches

    def __next__(self) -> Batch:
        if not self._started:
            self._start()
        if self.n_batches is not None and self._step >= self.n_batches:
            self.close()
            raise StopIteration
        try:
            raw = self._get()
            self._step += 1
            return self._finish(raw)
        except BaseException:
            self.close()
            raise

    def _finish(self, raw: _Raw) -> Batch:
        """Move to the device and augment (centre crop + targets only when augmentation is off)."""
        nb = self.device.type == "cuda"
        image = raw.image.to(self.device, non_blocking=nb)
        label = None if raw.label is None else raw.label.to(self.device, non_blocking=nb)
        spatial = None
        if raw.spatial_image is not None:
            spatial = (
                raw.spatial_image.to(self.device, non_blocking=nb),
                None if raw.spatial_label is None else raw.spatial_label.to(self.device, non_blocking=nb),
            )
        image, targets = apply(
            image,
            label,
            raw.params,
            patch_size=self.spec.final_patch_vox,
            ds_scales=self.spec.ds_scales,
            spatial_input=spatial,
            previous_labels=self.spec.previous_labels,
        )
        return Batch(image=image, target=targets, case_ids=raw.case_ids, params=raw.params)


def _work(
    producer: _Producer, w: int, n_workers: int, n_batches: int | None, q: queue.Queue[Any], stop: threading.Event
) -> None:
    """Worker thread body: batches w, w + n_workers, ... into ``q`` until stopped or done.

    It holds no reference to the loader, so a loader dropped without ``close()`` is still
    collected and its ``__del__`` stops the threads.
    """
    try:
        k = w
        while not stop.is_set() and (n_batches is None or k < n_batches):
            item: Any = producer.next()
            while not stop.is_set():
                try:
                    q.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            k += n_workers
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
        while not stop.is_set():
            try:
                q.put(_Failure(e), timeout=_POLL_S)
                return
            except queue.Full:
                continue


class _Producer:
    """One worker's sampler and parameter stream."""

    def __init__(
        self,
        spec: LoaderSpec,
        cases: Sequence[CaseHandle],
        *,
        seed: int,
        rank: int,
        worker: int,
        pin: bool,
        cache: ChunkCache | None,
    ) -> None:
        self.spec = spec
        self.rng = stream_rng(seed, rank=rank, worker=worker, purpose=spec.purpose)
        self.sampler = PatchSampler(
            cases,
            spec.read_patch_vox,
            final_patch_size_vox=_final_3d(spec),
            rng=self.rng,
            oversample_foreground=spec.oversample_foreground,
            cache=cache,
        )
        self.pin = pin

    def _params(self) -> Params:
        spec, dims = self.spec, len(self.spec.final_patch_vox)
        if spec.augment is None:
            return Params.identity(spec.batch_size, spec.n_channels, dims)
        return sample_params(
            self.rng,
            spec.batch_size,
            n_channels=spec.n_channels,
            spatial_dims=dims,
            config=spec.augment,
            patch_size=spec.final_patch_vox,
            n_previous=len(spec.previous_labels),
        )

    def _read(
        self, cases: list[CaseHandle], corners: np.ndarray, which: np.ndarray, size: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stacked reads of the ``which`` samples, boxes of ``size`` (spatial axes) centred in their patch."""
        size3 = (1, *size) if len(size) == 2 else tuple(size)
        reads = [self.sampler.read(cases[b], corners[b], size3) for b in which]
        image = torch.from_numpy(np.stack([r[0] for r in reads]))
        labels = [r[1] for r in reads]
        label = None if any(x is None for x in labels) else torch.from_numpy(np.stack(labels))  # type: ignore[arg-type]
        if len(size) == 2:  # (n, C, 1, Y, X) -> (n, C, Y, X)
            image = image[:, :, 0]
            label = None if label is None else label[:, 0]
        return image, label

    def next(self) -> _Raw:
        """One batch: non-transformed samples read at the final size, transformed ones at the
        largest footprint among them (never more than the enlarged patch)."""
        spec = self.spec
        cases, corners, _ = self.sampler.draw(spec.batch_size)
        params = self._params()
        final = tuple(spec.final_patch_vox)
        sizes = input_footprint(params, final, spec.read_patch_vox[-len(final) :])
        plain, moved = np.flatnonzero(~params.spatial), np.flatnonzero(params.spatial)
        image, label = (
            self._read(cases, corners, np.arange(spec.batch_size), final)
            if len(moved) == 0
            else self._read_split(cases, corners, plain, final)
        )
        s_image: torch.Tensor | None = None
        s_label: torch.Tensor | None = None
        if len(moved):
            s_image, s_label = self._read(cases, corners, moved, tuple(int(v) for v in sizes[moved].max(0)))
        if self.pin:
            image = image.pin_memory()
            label, s_image, s_label = (None if t is None else t.pin_memory() for t in (label, s_image, s_label))
        return _Raw(image, label, tuple(c.case_id for c in cases), params, s_image, s_label)

    def _read_split(
        self, cases: list[CaseHandle], corners: np.ndarray, plain: np.ndarray, final: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, *F) batch with the ``plain`` samples read and zeros for the transformed ones."""
        spec = self.spec
        image = torch.zeros((spec.batch_size, spec.n_channels, *final))
        lead = (2,) if spec.previous_labels else ()  # reference + previous stage (a cascade)
        label: torch.Tensor | None = torch.zeros((spec.batch_size, *lead, *final), dtype=torch.uint8)
        if len(plain):
            img, lab = self._read(cases, corners, plain, final)
            image[torch.from_numpy(plain)] = img
            if lab is None:
                label = None
            else:
                label[torch.from_numpy(plain)] = lab  # type: ignore[index]
        return image, label


def _final_3d(spec: LoaderSpec) -> tuple[int, int, int]:
    if len(spec.final_patch_vox) == 2:
        return (1, *spec.final_patch_vox)  # type: ignore[return-value]
    return tuple(spec.final_patch_vox)  # type: ignore[return-value]


def loader_spec(
    config: Configuration,
    *,
    train: bool,
    augment: bool | AugmentConfig,
    ds_scales: Sequence[Sequence[float]] | None,
    batch_size: int | None = None,
    n_channels: int | None = None,
    previous_labels: Sequence[int] = (),
) -> LoaderSpec:
    """Patch sizes, augmentation and targets of a loader for ``config`` (see :func:`build_loader`)."""
    final = tuple(config.patch_size_vox[1:]) if config.is_2d else tuple(config.patch_size_vox)
    aug: AugmentConfig | None = None
    if train and augment is not False:
        if isinstance(augment, AugmentConfig):
            aug = augment
        else:  # the plan's mirror axes are volume axes (z, y, x); a 2D patch has only (y, x)
            axes = config.train.mirror_axes
            aug = AugmentConfig(mirror_axes=tuple(a - 1 for a in axes if a > 0) if config.is_2d else axes)
    read = enlarged_patch_size(final, aug) if aug is not None else final
    read3 = (1, *read) if config.is_2d else read
    scales = None if ds_scales is None else tuple(tuple(float(v) for v in s) for s in ds_scales)
    if scales is not None and any(len(s) != len(final) for s in scales):
        raise ConfigError(
            f"ds_scales entries must have {len(final)} factors (one per patch axis); got {scales!r}. "
            f"Build them with voxflow.nets.deep_supervision_scales(config.network)."
        )
    return LoaderSpec(
        batch_size=int(batch_size or config.batch_size),
        read_patch_vox=read3,  # type: ignore[arg-type]
        final_patch_vox=final,
        n_channels=int(n_channels or config.n_channels),
        oversample_foreground=config.train.oversample_foreground,
        augment=aug,
        ds_scales=scales,
        purpose="train" if train else "val",
        previous_labels=tuple(int(v) for v in previous_labels),
    )


def build_loader(
    store: Store | PathLikeStr,
    case_ids: Sequence[str],
    config: Configuration,
    *,
    train: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    ds_scales: Sequence[Sequence[float]] | None = None,
    augment: bool | AugmentConfig = True,
    n_batches: int | None = None,
    batch_size: int | None = None,
    prefetch: int = 2,
    cache_mb: float = 256,
) -> BatchLoader:
    """Loader of patches from a preprocessed store for one configuration.

    ``train=True``: infinite, augmented (``augment`` True = nnU-Net defaults with the plan's
    mirror axes, an :class:`AugmentConfig` to customise, False for none). ``train=False``:
    ``n_batches`` (default ``config.train.val_iters``) unaugmented batches, the same on every pass;
    foreground oversampling applies to both, as in nnU-Net. Each DDP ``rank`` draws its own stream;
    ``batch_size`` (default the plan's) is per rank. ``ds_scales`` from
    :func:`voxflow.nets.deep_supervision_scales`. ``n_batches`` also makes a training loader finite.
    A cascade's second stage (``config.previous_stage``) reads each case's ``prev_seg`` with the
    label and gives it as one-hot channels after the image's (:func:`voxflow.data.augment.apply`).
    ``cache_mb`` bounds the loader's decoded-chunk cache (shared by its threads; 0 disables it):
    small datasets end up served from memory, large ones are streamed chunk by chunk.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(
            f"rank must be in [0, world_size={world_size}); got {rank!r}. Pass the process's DDP "
            f"rank and the number of processes (torch.distributed.get_rank/get_world_size)."
        )
    st = store if isinstance(store, Store) else Store.open(store)
    cascade = config.previous_stage is not None
    cases = open_cases(st, list(case_ids), require_label=True, previous=cascade)
    for c in cases:
        if c.image.shape[0] != config.n_channels:
            raise LayoutError(
                f"configuration {config.name!r} expects {config.n_channels} channels; got "
                f"{c.image.shape[0]} for case {c.case_id!r} in {st.path}. Preprocess with this plan."
            )
    previous: tuple[int, ...] = ()
    if cascade:
        from voxflow.models import previous_stage_labels

        previous = previous_stage_labels(st.meta)
    spec = loader_spec(
        config, train=train, augment=augment, ds_scales=ds_scales, batch_size=batch_size, previous_labels=previous
    )
    if not train and n_batches is None:
        n_batches = config.train.val_iters
    log.info(
        "loader rank %d: %d cases, read patch %s -> %s, batch %d, %s",
        rank,
        len(cases),
        spec.read_patch_vox,
        spec.final_patch_vox,
        spec.batch_size,
        "augmented" if spec.augment else "plain",
    )
    cache = ChunkCache(int(cache_mb * 2**20)) if cache_mb > 0 else None
    return BatchLoader(
        cases,
        spec,
        device=device,
        seed=seed,
        rank=rank,
        num_workers=num_workers,
        n_batches=n_batches,
        prefetch=prefetch,
        cache=cache,
    )
