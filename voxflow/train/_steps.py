"""One training epoch and one validation pass: the inner loops of the trainer (no I/O)."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from voxflow.errors import ConfigError, PlanError, TrainingDivergedError
from voxflow.models import LabelSpec
from voxflow.precision import amp_dtype_for, cpu_has_native_bf16
from voxflow.precision import resolve_precision as _resolve
from voxflow.train.distributed import DistInfo, any_rank
from voxflow.train.losses import region_targets

__all__ = [
    "EpochProgress",
    "amp_dtype_for",
    "confusion_counts",
    "cpu_has_native_bf16",
    "epoch_loss",
    "pseudo_dice",
    "resolve_precision",
    "train_epoch",
    "validate",
]


def resolve_precision(precision: str, device: torch.device, *, amp: bool = True) -> str:
    """:func:`voxflow.precision.resolve_precision` for ``train.precision`` (a :class:`PlanError`;
    ``auto`` is fp32 on every CPU)."""
    try:
        return _resolve(precision, device, amp=amp, setting="train.precision", for_training=True)
    except ConfigError as e:
        raise PlanError(f"{e} (or --set train.precision=...)") from None


@dataclass
class EpochProgress:
    """Where an epoch stands: optimiser steps done, their summed loss (this rank), and whether a
    stop was requested (every rank agrees on it)."""

    steps: int = 0
    loss_sum: float = 0.0
    stopped: bool = False
    wait_seconds: float = 0.0  # host time spent waiting for the loader's next batch
    step_seconds: float = 0.0  # host time of the whole steps (wait included; the loss read syncs CUDA)

    @property
    def data_wait_fraction(self) -> float:
        return self.wait_seconds / self.step_seconds if self.step_seconds > 0 else 0.0


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def _targets(batch: Any) -> list[torch.Tensor]:
    t = batch.target
    return [t] if isinstance(t, torch.Tensor) else list(t)


def train_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: Iterator[Any],
    *,
    n_iters: int,
    info: DistInfo,
    amp_dtype: torch.dtype | None,
    grad_clip: float,
    desc: str,
    progress: EpochProgress | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> EpochProgress:
    """Optimiser steps until ``n_iters`` are done (counting those already in ``progress``), or until
    ``stop_requested()`` is true on any rank after a step (preemption). Returns the progress; the
    mean training loss of a finished epoch over ranks is :func:`epoch_loss`."""
    model.train()
    progress = progress or EpochProgress()
    progress.stopped = False
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    bar = tqdm(
        range(progress.steps, n_iters),
        desc=desc,
        disable=not info.is_main,
        leave=False,
        dynamic_ncols=True,
        initial=progress.steps,
        total=n_iters,
    )
    for _ in bar:
        t0 = time.perf_counter()
        batch = next(batches)
        image = batch.image.to(info.device, non_blocking=True)
        targets = [t.to(info.device, non_blocking=True) for t in _targets(batch)]
        progress.wait_seconds += time.perf_counter() - t0
        optimizer.zero_grad(set_to_none=True)
        with _autocast(info.device, amp_dtype):
            out = model(image)
            loss = loss_fn(out, targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"the training loss must stay finite; it became {value} at step "
                f"{progress.steps}. Lower train.lr (--set train.lr=...) or check the "
                f"data for NaN/inf intensities."
            )
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach()
        progress.steps += 1
        progress.step_seconds += time.perf_counter() - t0
        bar.set_postfix(loss=f"{value:.4f}")
        if stop_requested is not None and progress.steps < n_iters and any_rank(stop_requested(), info):
            progress.stopped = True
            break
    bar.close()
    progress.loss_sum += float(total)
    return progress


def epoch_loss(progress: EpochProgress, info: DistInfo) -> float:
    """Mean training loss of an epoch over its steps and over ranks (the global-batch loss)."""
    total = torch.tensor([progress.loss_sum], dtype=torch.float64, device=info.device)
    if info.distributed:
        torch.distributed.all_reduce(total)
    return float(total) / (max(progress.steps, 1) * info.world_size)


def confusion_counts(logits: torch.Tensor, target: torch.Tensor, labels: LabelSpec) -> torch.Tensor:
    """(3, F) true positives, false positives, false negatives per foreground output (hard predictions),
    ignore-label voxels excluded. ``logits`` (B, K, ...), ``target`` (B, 1, ...)."""
    target = target.long()
    valid = (
        (target != labels.ignore_label)
        if labels.ignore_label is not None
        else torch.ones_like(target, dtype=torch.bool)
    )
    if labels.regions is not None:
        pred = torch.sigmoid(logits.float()) > 0.5
        gt = region_targets(target, labels.regions).bool()
    else:
        k = logits.shape[1]
        arg = logits.argmax(1, keepdim=True)
        classes = torch.arange(1, k, device=logits.device).view(1, -1, *([1] * (logits.ndim - 2)))
        pred, gt = arg == classes, target == classes
    pred, gt = pred & valid, gt & valid
    axes = (0, *range(2, pred.ndim))
    tp = (pred & gt).sum(axes)
    return torch.stack([tp, (pred & ~gt).sum(axes), (~pred & gt).sum(axes)]).double()


def pseudo_dice(counts: torch.Tensor) -> list[float]:
    """Per-output Dice ``2tp / (2tp + fp + fn)`` from :func:`confusion_counts`; NaN when a class is
    absent from both prediction and reference."""
    tp, fp, fn = counts
    denom = 2 * tp + fp + fn
    return [float(2 * t / d) if d > 0 else float("nan") for t, d in zip(tp, denom, strict=True)]


@torch.no_grad()
def validate(
    model: nn.Module,
    loss_fn: nn.Module,
    batches: Iterator[Any],
    *,
    n_iters: int,
    info: DistInfo,
    amp_dtype: torch.dtype | None,
    labels: LabelSpec,
) -> tuple[float, torch.Tensor]:
    """Mean validation loss (full resolution) and summed confusion counts over ranks."""
    model.eval()
    counts = torch.zeros(
        (3, labels.num_outputs if labels.uses_regions else labels.num_outputs - 1),
        dtype=torch.float64,
        device=info.device,
    )
    loss_sum = torch.zeros(2, dtype=torch.float64, device=info.device)
    for batch in itertools.islice(batches, n_iters):
        image = batch.image.to(info.device, non_blocking=True)
        target = _targets(batch)[0].to(info.device, non_blocking=True)
        with _autocast(info.device, amp_dtype):
            logits = model(image)
            if isinstance(logits, Sequence):
                logits = logits[0]
            loss_sum[0] += loss_fn(logits, target).detach().double()
        loss_sum[1] += 1
        counts += confusion_counts(logits, target, labels)
    if info.distributed:
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(loss_sum)
    model.train()
    return float(loss_sum[0] / loss_sum[1].clamp(min=1)), counts
