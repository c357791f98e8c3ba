"""One training epoch and one validation pass: the inner loops of the trainer (no I/O)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from voxflow.train.distributed import DistInfo
from voxflow.train.labels import LabelSpec
from voxflow.train.losses import region_targets

__all__ = ["amp_dtype_for", "confusion_counts", "pseudo_dice", "train_epoch", "validate"]


def amp_dtype_for(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 on CUDA devices that support it, else fp16 (with a GradScaler); ``None`` (fp32) on CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def _targets(batch: Any) -> list[torch.Tensor]:
    t = batch.target
    return [t] if isinstance(t, torch.Tensor) else list(t)


def train_epoch(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, batches: Iterator[Any], *, n_iters: int, info: DistInfo,
                amp_dtype: torch.dtype | None, grad_clip: float, desc: str) -> float:
    """``n_iters`` optimiser steps; returns the mean training loss over ranks."""
    model.train()
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    bar = tqdm(range(n_iters), desc=desc, disable=not info.is_main, leave=False, dynamic_ncols=True)
    for _ in bar:
        batch = next(batches)
        image = batch.image.to(info.device, non_blocking=True)
        targets = [t.to(info.device, non_blocking=True) for t in _targets(batch)]
        optimizer.zero_grad(set_to_none=True)
        with _autocast(info.device, amp_dtype):
            out = model(image)
            loss = loss_fn(out, targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value}; lower train.lr or check the data")
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach()
        bar.set_postfix(loss=f"{value:.4f}")
    if info.distributed:
        torch.distributed.all_reduce(total)
    return float(total) / (n_iters * info.world_size)


def confusion_counts(logits: torch.Tensor, target: torch.Tensor, labels: LabelSpec) -> torch.Tensor:
    """(3, F) true positives, false positives, false negatives per foreground output (hard predictions),
    ignore-label voxels excluded. ``logits`` (B, K, ...), ``target`` (B, 1, ...)."""
    target = target.long()
    valid = (target != labels.ignore_label) if labels.ignore_label is not None else torch.ones_like(target, dtype=torch.bool)
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
def validate(model: nn.Module, loss_fn: nn.Module, batches: Iterator[Any], *, n_iters: int, info: DistInfo,
             amp_dtype: torch.dtype | None, labels: LabelSpec) -> tuple[float, torch.Tensor]:
    """Mean validation loss (full resolution) and summed confusion counts over ranks."""
    model.eval()
    counts = torch.zeros((3, labels.num_outputs if labels.uses_regions else labels.num_outputs - 1),
                         dtype=torch.float64, device=info.device)
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
