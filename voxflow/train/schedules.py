"""Optimisers and learning-rate schedules selected by name from a :class:`~voxflow.plan.schema.TrainSpec`.

The learning rate is set once per epoch (as nnU-Net does), from the epoch index alone, so a resumed
run continues the schedule exactly:

* ``poly``: ``lr · (1 - epoch / epochs) ** poly_exponent``
* ``cosine``: linear warm-up over ``warmup_epochs`` (``lr · (epoch + 1) / warmup_epochs``), then
  ``lr · ½ (1 + cos(π · (epoch - warmup) / (epochs - warmup)))``.

``warmup_epochs`` also applies to ``poly`` when set (the poly decay then starts after the warm-up).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from voxflow.plan.schema import TrainSpec

__all__ = ["build_optimizer", "lr_at", "set_lr"]


def build_optimizer(params: Iterable[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (nnU-Net: lr 1e-2, momentum 0.99, weight decay 3e-5) or AdamW."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, nesterov=True, weight_decay=spec.weight_decay
        )
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def lr_at(epoch: int, spec: TrainSpec) -> float:
    """Learning rate of epoch ``epoch`` (0-based) under ``spec.schedule``."""
    warm = min(spec.warmup_epochs, spec.epochs - 1)
    if epoch < warm:
        return spec.lr * (epoch + 1) / warm
    span = max(spec.epochs - warm, 1)
    t = min(max(epoch - warm, 0) / span, 1.0)
    if spec.schedule == "poly":
        return spec.lr * (1.0 - t) ** spec.poly_exponent
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
