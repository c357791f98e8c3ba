"""Segmentation losses: soft Dice + cross-entropy (softmax) or + BCE (sigmoid regions), deep supervision.

Conventions: ``logits`` (B, K, *spatial); ``target`` (B, 1, *spatial) integer label values (the
raw label map, also for regions: the region masks are derived here). Voxels equal to the ignore
label count in neither term.

Soft Dice (nnU-Net's ``MemoryEfficientSoftDiceLoss``): with probabilities ``p`` and one-hot ``g``
summed over the batch and all voxels ("batch Dice", the default) or per sample,
``tp = Σ p·g``, ``fp = Σ p·(1-g)``, ``fn = Σ (1-p)·g`` and
``dice_k = (2·tp + smooth) / max(2·tp + fp + fn + smooth, 1e-8)`` with ``smooth = 1e-5``: the smooth
term only keeps an absent class (tp = fp = fn = 0) at dice 1 instead of 0/0, and is too small to
bias present classes. Softmax Dice skips the background class; region Dice uses every region.
The Dice term is ``1 - mean_k dice_k`` (so the loss is >= 0; nnU-Net reports ``-mean``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from voxflow.train.labels import LabelSpec

__all__ = ["DeepSupervisionLoss", "SegmentationLoss", "deep_supervision_weights", "region_targets", "soft_dice"]


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's weights: ``1/2**i`` for output ``i`` (full resolution first), the lowest
    resolution set to 0 when there is more than one output, normalised to sum 1."""
    w = [1.0 / 2**i for i in range(n_outputs)]
    if n_outputs > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, mask: torch.Tensor | None = None, *,
              batch_dice: bool = True, smooth: float = 1e-5) -> torch.Tensor:
    """Per-class soft Dice: (K,) with ``batch_dice``, else (B, K). ``mask`` (B, 1, ...) in {0, 1}."""
    if mask is not None:
        probs = probs * mask
        onehot = onehot * mask
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0, *axes)
    tp = (probs * onehot).sum(axes)
    fp = probs.sum(axes) - tp
    fn = onehot.sum(axes) - tp
    return (2 * tp + smooth) / torch.clamp(2 * tp + fp + fn + smooth, min=1e-8)


def region_targets(target: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, 1, ...) integer labels → (B, R, ...) float masks, channel r = label ∈ regions[r]."""
    return torch.cat([torch.isin(target, torch.as_tensor(list(r), device=target.device)) for r in regions],
                     dim=1).float()


class SegmentationLoss(nn.Module):
    """Dice + CE (``kind="dice_ce"``), Dice only or CE only, for one output scale.

    ``class_weights`` (K,) weight the CE classes (softmax only), e.g. for extreme imbalance.
    """

    def __init__(self, labels: LabelSpec, *, kind: str = "dice_ce", batch_dice: bool = True,
                 smooth: float = 1e-5, class_weights: torch.Tensor | None = None,
                 weight_dice: float = 1.0, weight_ce: float = 1.0):
        super().__init__()
        if kind not in ("dice_ce", "dice", "ce"):
            raise ValueError(f"kind must be dice_ce, dice or ce; got {kind!r}")
        if class_weights is not None and labels.uses_regions:
            raise ValueError("class-weighted CE is defined for softmax labels only, not for regions")
        self.labels = labels
        self.kind = kind
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.weight_dice = weight_dice if kind != "ce" else 0.0
        self.weight_ce = weight_ce if kind != "dice" else 0.0
        self.class_weights: torch.Tensor | None
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.long()
        ign = self.labels.ignore_label
        mask = (target != ign).float() if ign is not None else None
        if self.labels.regions is not None:
            onehot = region_targets(target, self.labels.regions)
            ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            probs, dice_classes = torch.sigmoid(logits), slice(None)
            ce = (ce * mask).sum() / (mask.sum().clamp(min=1.0) * onehot.shape[1]) if mask is not None else ce.mean()
        else:
            t = torch.where(target == ign, 0, target) if ign is not None else target
            ce = self._ce(logits, t[:, 0], mask)
            probs = torch.softmax(logits, 1)
            onehot = torch.zeros_like(probs).scatter_(1, t, 1.0)
            dice_classes = slice(1, None)
        loss = self.weight_ce * ce
        if self.weight_dice:
            dc = soft_dice(probs[:, dice_classes], onehot[:, dice_classes], mask,
                           batch_dice=self.batch_dice, smooth=self.smooth)
            loss = loss + self.weight_dice * (1.0 - dc.mean())
        return loss

    def _ce(self, logits: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax CE averaged over valid voxels (class-weighted: a weighted mean, as torch's ``mean``)."""
        w = self.class_weights
        ce = F.cross_entropy(logits, t, weight=w, reduction="none")
        if mask is not None:
            valid = mask[:, 0]
            denom = (w[t] * valid).sum() if w is not None else valid.sum()
            return (ce * valid).sum() / denom.clamp(min=1e-8)
        return ce.sum() / w[t].sum() if w is not None else ce.mean()


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the outputs/targets of every scale (full resolution first).

    ``weights`` default to :func:`deep_supervision_weights`; a zero weight skips its scale.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = list(weights) if weights is not None else None

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor],
                targets: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        tgts = [targets] if isinstance(targets, torch.Tensor) else list(targets)
        if len(tgts) < len(outs):
            raise ValueError(f"need one target per output scale; got {len(outs)} outputs and {len(tgts)} targets "
                             f"(build the loader with ds_scales=deep_supervision_scales(spec))")
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(outs))
        total = outs[0].new_zeros(())
        for w, o, t in zip(weights, outs, tgts, strict=False):  # extra targets unused
            if w:
                if o.shape[2:] != t.shape[2:]:
                    raise ValueError(f"output and target shapes differ at one scale: {tuple(o.shape)} vs "
                                     f"{tuple(t.shape)}")
                total = total + w * self.loss(o, t)
        return total
