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

Under DDP (``distributed=True``) the loss is that of the *global* batch, as in nnU-Net: the batch
Dice statistics tp/fp/fn are summed over ranks with a gradient-carrying all-reduce, and every mean
(CE over valid voxels, per-sample Dice over samples) divides by the global count. Each rank returns
``world_size * (its share of the global sum)`` so that DDP's gradient averaging gives exactly the
gradient of the global-batch loss: N ranks with batch b/N take the same step as one process with
batch b (tested), also with uneven per-rank batches and ignore-label masks. The mean of the ranks'
returned values is the global-batch loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from voxflow.errors import PlanError
from voxflow.models import LabelSpec

__all__ = ["DeepSupervisionLoss", "SegmentationLoss", "deep_supervision_weights", "region_targets", "soft_dice"]


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """Loss weights of the ``n_outputs`` outputs a network builds (full resolution first):
    ``1/2**i`` normalised to sum 1.

    These are nnU-Net's weights: it halves the weight per scale over all ``n_outputs + 1`` decoder
    stages and sets the lowest-resolution one to 0; that output is not built here
    (``NetworkSpec.output_stages``), so every output carries a positive weight.
    """
    if n_outputs < 1:
        raise ValueError(f"need at least one output; got {n_outputs}")
    w = [1.0 / 2**i for i in range(n_outputs)]
    total = sum(w)
    return [x / total for x in w]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks.

    Every rank computes the same function of the global sum ``S``; the gradient reaching rank r's
    input is ``sum_r' dL_r'/dS`` (nnU-Net's ``AllGatherGrad`` followed by a sum, in one collective).
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.detach().clone().contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _world() -> int:
    """World size of the default process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def soft_dice(
    probs: torch.Tensor,
    onehot: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    batch_dice: bool = True,
    smooth: float = 1e-5,
    distributed: bool = False,
) -> torch.Tensor:
    """Per-class soft Dice: (K,) with ``batch_dice``, else (B, K). ``mask`` (B, 1, ...) in {0, 1}.

    ``distributed`` with ``batch_dice``: tp/fp/fn are summed over all DDP ranks (with gradient), so
    the result is the Dice of the global batch, the same on every rank.
    """
    if mask is not None:
        probs = probs * mask
        onehot = onehot * mask
    axes = tuple(range(2, probs.ndim))
    if batch_dice:
        axes = (0, *axes)
    tp = (probs * onehot).sum(axes)
    fp = probs.sum(axes) - tp
    fn = onehot.sum(axes) - tp
    if distributed and batch_dice and _world() > 1:
        tp, fp, fn = _AllReduceSum.apply(torch.stack([tp, fp, fn]))
    return (2 * tp + smooth) / torch.clamp(2 * tp + fp + fn + smooth, min=1e-8)


def region_targets(target: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, 1, ...) integer labels → (B, R, ...) float masks, channel r = label ∈ regions[r]."""
    return torch.cat(
        [torch.isin(target, torch.as_tensor(list(r), device=target.device)) for r in regions], dim=1
    ).float()


class SegmentationLoss(nn.Module):
    """Dice + CE (``kind="dice_ce"``), Dice only or CE only, for one output scale.

    ``class_weights`` (K,) weight the CE classes (softmax only), e.g. for extreme imbalance.
    ``distributed``: compute the loss of the global DDP batch (module docstring); needs an
    initialised process group and every rank calling the loss the same number of times.
    """

    def __init__(
        self,
        labels: LabelSpec,
        *,
        kind: str = "dice_ce",
        batch_dice: bool = True,
        smooth: float = 1e-5,
        class_weights: torch.Tensor | None = None,
        weight_dice: float = 1.0,
        weight_ce: float = 1.0,
        distributed: bool = False,
    ):
        super().__init__()
        if kind not in ("dice_ce", "dice", "ce"):
            raise PlanError(
                f"the loss (train.loss) must be dice_ce, dice or ce; got {kind!r}. Set one with "
                f"--set train.loss=dice_ce."
            )
        if class_weights is not None and labels.uses_regions:
            raise PlanError(
                "train.class_weighted_ce needs softmax labels (one class per voxel); got a "
                "region-based dataset (regions_class_order). Set train.class_weighted_ce=false."
            )
        self.labels = labels
        self.kind = kind
        self.batch_dice = batch_dice
        self.smooth = smooth
        self.weight_dice = weight_dice if kind != "ce" else 0.0
        self.weight_ce = weight_ce if kind != "dice" else 0.0
        self.distributed = distributed
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
            count = mask.sum() if mask is not None else ce.new_tensor(float(ce[:, :1].numel()))
            ce = (ce * mask).sum() if mask is not None else ce.sum()
            ce = ce / (self._mean_count(count).clamp(min=1.0) * onehot.shape[1])
        else:
            t = torch.where(target == ign, 0, target) if ign is not None else target
            ce = self._ce(logits, t[:, 0], mask)
            probs = torch.softmax(logits, 1)
            onehot = torch.zeros_like(probs).scatter_(1, t, 1.0)
            dice_classes = slice(1, None)
        loss = self.weight_ce * ce
        if self.weight_dice:
            dc = soft_dice(
                probs[:, dice_classes],
                onehot[:, dice_classes],
                mask,
                batch_dice=self.batch_dice,
                smooth=self.smooth,
                distributed=self.distributed,
            )
            if self.batch_dice:
                term = 1.0 - dc.mean()
            else:  # mean over the samples of the global batch
                term = (1.0 - dc.mean(1)).sum() / self._mean_count(dc.new_tensor(float(dc.shape[0])))
            loss = loss + self.weight_dice * term
        return loss

    def _mean_count(self, count: torch.Tensor) -> torch.Tensor:
        """Denominator of a mean over the global batch, as seen by one rank: the global count
        divided by the world size (so DDP's averaging of gradients yields the global mean)."""
        world = _world() if self.distributed else 1
        if world == 1:
            return count
        total = count.detach().double().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return (total / world).to(count.dtype)

    def _ce(self, logits: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Softmax CE averaged over valid voxels (class-weighted: a weighted mean, as torch's ``mean``)."""
        w = self.class_weights
        ce = F.cross_entropy(logits, t, weight=w, reduction="none")
        if mask is not None:
            valid = mask[:, 0]
            ce = ce * valid
            count = (w[t] * valid).sum() if w is not None else valid.sum()
        else:
            count = w[t].sum() if w is not None else ce.new_tensor(float(ce.numel()))
        return ce.sum() / self._mean_count(count).clamp(min=1e-8)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the outputs/targets of every scale (full resolution first).

    ``weights`` default to :func:`deep_supervision_weights`; there must be one per output (a
    network builds no output that carries no loss, see ``NetworkSpec.output_stages``).
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = list(weights) if weights is not None else None

    def forward(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], targets: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        tgts = [targets] if isinstance(targets, torch.Tensor) else list(targets)
        if len(tgts) < len(outs):
            raise ValueError(
                f"need one target per output scale; got {len(outs)} outputs and {len(tgts)} targets "
                f"(build the loader with ds_scales=deep_supervision_scales(spec))"
            )
        weights = self.weights if self.weights is not None else deep_supervision_weights(len(outs))
        if len(weights) != len(outs):
            raise ValueError(
                f"got {len(outs)} outputs for {len(weights)} deep-supervision weights; build the "
                f"network and the loss from the same NetworkSpec"
            )
        total = outs[0].new_zeros(())
        for w, o, t in zip(weights, outs, tgts[: len(outs)], strict=True):
            if o.shape[2:] != t.shape[2:]:
                raise ValueError(f"output and target shapes differ at one scale: {tuple(o.shape)} vs {tuple(t.shape)}")
            total = total + w * self.loss(o, t)
        return total
