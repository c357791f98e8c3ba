from __future__ import annotations

import math

import pytest
import torch

from voxflow.store import DatasetMeta
from voxflow.train.labels import LabelSpec
from voxflow.train.losses import DeepSupervisionLoss, SegmentationLoss, deep_supervision_weights, soft_dice

SOFTMAX = LabelSpec(2, ("fg",))


def _hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    # class-1 logit minus class-0 logit: 0, ln 3, 0, -ln 3 -> p1 = 0.5, 0.75, 0.5, 0.25
    d = torch.tensor([0.0, math.log(3), 0.0, -math.log(3)])
    logits = torch.stack([torch.zeros(4), d]).reshape(1, 2, 4, 1, 1)
    target = torch.tensor([0, 1, 1, 0]).reshape(1, 1, 4, 1, 1)
    return logits, target


def test_dice_ce_matches_hand_computation() -> None:
    logits, target = _hand_example()
    # CE: voxels 0 and 3 have p(target) = 0.5 and 0.75 as do voxels 2 and 1 -> mean = (ln 2 - ln 0.75) / 2
    ce = (math.log(2) - math.log(0.75)) / 2
    # Dice(fg): tp = 0.75 + 0.5, fp = 0.5 + 0.25, fn = 0.25 + 0.5 -> 2.5 / (2.5 + 1.5)
    dice = 2.5 / 4.0
    got = SegmentationLoss(SOFTMAX, smooth=0.0)(logits, target)
    assert float(got) == pytest.approx(ce + 1 - dice, rel=1e-6)
    assert float(SegmentationLoss(SOFTMAX, kind="ce")(logits, target)) == pytest.approx(ce, rel=1e-6)
    assert float(SegmentationLoss(SOFTMAX, kind="dice", smooth=0.0)(logits, target)) == pytest.approx(1 - dice)


def test_soft_dice_smooth_term_keeps_absent_class_at_one() -> None:
    probs = torch.zeros(1, 1, 3)
    assert float(soft_dice(probs, torch.zeros(1, 1, 3))[0]) == pytest.approx(1.0)
    per_sample = soft_dice(torch.ones(2, 1, 3), torch.ones(2, 1, 3), batch_dice=False)
    assert per_sample.shape == (2, 1)


def test_ignore_label_voxels_do_not_count() -> None:
    g = torch.Generator().manual_seed(0)
    labels = LabelSpec(3, ("a", "b"), ignore_label=3)
    logits = torch.randn(2, 3, 5, 4, 3, generator=g)
    target = torch.randint(0, 4, (2, 1, 5, 4, 3), generator=g)
    loss = SegmentationLoss(labels)
    ref = loss(logits, target)
    ignored = target == 3
    assert ignored.any()
    # changing logits at ignored voxels changes nothing
    noisy = logits + 10 * torch.randn(logits.shape, generator=g) * ignored
    assert float(loss(noisy, target)) == pytest.approx(float(ref), rel=1e-6)
    # and the loss equals the loss on the valid voxels alone (batch Dice: voxels pooled)
    keep = ~ignored[:, 0]
    flat_logits = logits.permute(1, 0, 2, 3, 4)[:, keep].T.reshape(1, -1, 3).permute(0, 2, 1)[..., None, None]
    flat_target = target[:, 0][keep].reshape(1, 1, -1, 1, 1)
    plain = SegmentationLoss(LabelSpec(3, ("a", "b")))
    assert float(plain(flat_logits, flat_target)) == pytest.approx(float(ref), rel=1e-5)


def test_regions_use_sigmoid_per_region() -> None:
    meta = DatasetMeta(channel_names=("t1",), labels={"background": 0, "whole": [1, 2], "core": [2]})
    labels = LabelSpec.from_meta(meta)
    assert labels.uses_regions
    assert labels.num_outputs == 2
    assert labels.regions == ((1, 2), (2,))
    target = torch.tensor([0, 1, 2, 2]).reshape(1, 1, 4, 1, 1)
    masks = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float32).reshape(1, 2, 4, 1, 1)
    perfect = (masks * 2 - 1) * 20
    assert float(SegmentationLoss(labels)(perfect, target)) < 1e-6
    # BCE by hand for zero logits: ln 2; Dice per region with p = 0.5: whole 3/(3+0.5*... )
    zero = torch.zeros(1, 2, 4, 1, 1)
    dice_whole = 2 * 1.5 / (2 * 1.5 + 0.5 + 1.5)
    dice_core = 2 * 1.0 / (2 * 1.0 + 1.0 + 1.0)
    expected = math.log(2) + 1 - (dice_whole + dice_core) / 2
    assert float(SegmentationLoss(labels, smooth=0.0)(zero, target)) == pytest.approx(expected, rel=1e-6)


def test_label_spec_from_meta() -> None:
    meta = DatasetMeta(channel_names=("ct",), labels={"background": 0, "organ": 1, "lesion": 2, "ignore": 3})
    spec = LabelSpec.from_meta(meta)
    assert (spec.num_outputs, spec.names, spec.ignore_label) == (3, ("organ", "lesion"), 3)


def test_class_weighted_ce() -> None:
    logits, target = _hand_example()
    w = torch.tensor([1.0, 3.0])
    got = SegmentationLoss(SOFTMAX, kind="ce", class_weights=w)(logits, target)
    per_voxel = [math.log(2), -math.log(0.75), math.log(2), -math.log(0.75)]
    weights = [1, 3, 3, 1]
    assert float(got) == pytest.approx(
        sum(a * b for a, b in zip(per_voxel, weights, strict=True)) / sum(weights), rel=1e-6
    )


def _nnunet_weights(n_decoder_outputs: int) -> list[float]:
    """nnU-Net v2's ``_get_deep_supervision_scales`` weights: halve per scale, the lowest 0, normalised."""
    w = [1 / 2**i for i in range(n_decoder_outputs)]
    w[-1] = 0.0
    return [x / sum(w) for x in w]


def test_deep_supervision_weights_are_nnunets_without_the_zero_weight_output() -> None:
    assert deep_supervision_weights(1) == [1.0]
    w = deep_supervision_weights(3)
    assert w == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert sum(w) == pytest.approx(1.0)
    for n_dec in range(2, 8):
        assert deep_supervision_weights(n_dec - 1) == pytest.approx(_nnunet_weights(n_dec)[:-1])
    with pytest.raises(ValueError, match="at least one"):
        deep_supervision_weights(0)


def test_deep_supervision_loss_weights_each_scale() -> None:
    g = torch.Generator().manual_seed(1)
    base = SegmentationLoss(LabelSpec(3, ("a", "b")))
    outs = [
        torch.randn(2, 3, 8, 8, 8, generator=g),
        torch.randn(2, 3, 4, 4, 4, generator=g),
        torch.randn(2, 3, 2, 2, 2, generator=g),
    ]
    tgts = [torch.randint(0, 3, (2, 1, *o.shape[2:]), generator=g) for o in outs]
    got = DeepSupervisionLoss(base)(outs, tgts)
    expected = (4 * base(outs[0], tgts[0]) + 2 * base(outs[1], tgts[1]) + base(outs[2], tgts[2])) / 7
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="one target per output"):
        DeepSupervisionLoss(base)(outs, tgts[:1])
    with pytest.raises(ValueError, match="3 outputs for 2"):
        DeepSupervisionLoss(base, [2 / 3, 1 / 3])(outs, tgts)
    with pytest.raises(ValueError, match="shapes differ"):
        DeepSupervisionLoss(base)(outs, tgts[::-1])
