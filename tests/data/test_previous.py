"""A cascade's previous-stage channels in augmentation: nnU-Net's perturbations (fixed seeds, scipy
oracles) and their path through :func:`voxflow.data.augment.apply`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from voxflow.data import AugmentConfig, Params, apply, sample_params
from voxflow.data._previous import (
    OPERATORS,
    PreviousParams,
    binary_operator,
    perturb_sample,
    sample_previous_params,
)


def _ball(r: float) -> np.ndarray:
    n = int(np.floor(r))
    g = np.mgrid[-n : n + 1, -n : n + 1, -n : n + 1]
    return (g**2).sum(0) <= r * r


def _blobs(rng: np.random.Generator, shape: tuple[int, ...] = (20, 22, 18)) -> np.ndarray:
    return ndi.gaussian_filter(rng.normal(size=shape), 2.0) > 0.05


@pytest.mark.parametrize("radius", [1.0, 2.0, 2.7])
def test_binary_operators_match_scipy_with_a_ball(radius: float) -> None:
    x = _blobs(np.random.default_rng(0))
    ball = _ball(radius)
    # inside the patch; scipy's erosion treats outside as foreground with border_value=1, as the
    # zero-padded convolution of nnU-Net's ~dilate(~x) does
    dil = ndi.binary_dilation(x, ball)
    ero = ndi.binary_erosion(x, ball, border_value=1)
    np.testing.assert_array_equal(binary_operator(x, "dilation", radius), dil)
    np.testing.assert_array_equal(binary_operator(x, "erosion", radius), ero)
    np.testing.assert_array_equal(binary_operator(x, "closing", radius), ndi.binary_erosion(dil, ball, border_value=1))
    np.testing.assert_array_equal(binary_operator(x, "opening", radius), ndi.binary_dilation(ero, ball))


def test_perturbation_draws_follow_nnunet_probabilities() -> None:
    cfg = AugmentConfig()
    p = sample_previous_params(np.random.default_rng(1), 20000, 2, cfg)
    assert p.binary_on.mean() == pytest.approx(0.4 * 0.5, abs=0.01)
    assert p.component_on.mean() == pytest.approx(0.2 * 0.5, abs=0.01)
    assert p.binary_radius.min() >= 1.0
    assert p.binary_radius.max() <= 8.0
    assert set(np.unique(p.binary_op)) == set(range(len(OPERATORS)))
    assert all(sorted(o) == [0, 1] for o in p.binary_order[:50])
    off = sample_previous_params(np.random.default_rng(1), 100, 2, AugmentConfig.off())
    assert not off.any().any()


def _params(b: int, k: int, **kw: np.ndarray) -> PreviousParams:
    base = dict(
        binary_order=np.tile(np.arange(k), (b, 1)),
        binary_on=np.zeros((b, k), bool),
        binary_op=np.zeros((b, k), int),
        binary_radius=np.ones((b, k)),
        component_order=np.tile(np.arange(k), (b, 1)),
        component_on=np.zeros((b, k), bool),
        component_pick=np.zeros((b, k)),
    )
    base.update(kw)
    return PreviousParams(**base)  # type: ignore[arg-type]


def test_dilating_one_class_takes_its_gain_from_the_others() -> None:
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[3:6, 3:9, 3:9] = 1
    lab[6:9, 3:9, 3:9] = 2
    onehot = np.stack([lab == 1, lab == 2])
    p = _params(
        1, 2, binary_on=np.array([[True, False]]), binary_op=np.array([[0, 0]]), binary_radius=np.array([[2.0, 1.0]])
    )
    out = perturb_sample(onehot, p, 0)
    np.testing.assert_array_equal(out[0], ndi.binary_dilation(lab == 1, _ball(2.0)))
    np.testing.assert_array_equal(out[1], (lab == 2) & ~out[0])
    assert not (out[0] & out[1]).any()


def test_component_removal_drops_one_small_component_only() -> None:
    x = np.zeros((20, 20, 20), bool)
    x[1:3, 1:3, 1:3] = True  # 8 voxels
    x[10:13, 10:13, 10:13] = True  # 27 voxels
    x[:, :, 15:] = True  # 2000 voxels = 25% of the patch: never removed
    lab, _ = ndi.label(x, structure=np.ones((3, 3, 3)))
    for pick, gone in ((0.0, (1, 1, 1)), (0.99, (11, 11, 11))):
        p = _params(1, 1, component_on=np.array([[True]]), component_pick=np.array([[pick]]))
        out = perturb_sample(x[None], p, 0)[0]
        removed = x & ~out
        assert removed.any()
        assert np.all(lab[removed] == lab[gone])
        assert out[:, :, 15:].all()


def test_perturbations_are_deterministic_given_the_seed() -> None:
    onehot = np.stack([_blobs(np.random.default_rng(s)) for s in (3, 4)])
    onehot[1] &= ~onehot[0]
    outs = []
    for _ in range(2):
        p = sample_previous_params(
            np.random.default_rng(7), 8, 2, AugmentConfig(p_previous_binary=1.0, p_previous_remove_component=1.0)
        )
        outs.append(np.stack([perturb_sample(onehot, p, b) for b in range(8)]))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert any((o != onehot).any() for o in outs[0])


def test_apply_appends_one_hot_previous_channels_transformed_like_the_label() -> None:
    rng = np.random.default_rng(5)
    b, size = 3, (12, 14, 16)
    image = torch.from_numpy(rng.normal(size=(b, 1, *size)).astype(np.float32))
    label = torch.from_numpy(rng.integers(0, 3, size=(b, *size)).astype(np.uint8))
    prev = torch.from_numpy(rng.integers(0, 3, size=(b, *size)).astype(np.uint8))
    both = torch.stack([label, prev], 1)
    ident = Params.identity(b, 1, 3)
    out, targets = apply(image, both, ident, patch_size=size, previous_labels=(1, 2))
    assert out.shape == (b, 3, *size)
    np.testing.assert_array_equal(out[:, 1].numpy(), (prev == 1).float().numpy())
    np.testing.assert_array_equal(out[:, 2].numpy(), (prev == 2).float().numpy())
    np.testing.assert_array_equal(targets[0][:, 0].numpy(), label.numpy())
    # a spatial transform moves the previous stage with the label (nearest): same mapping for both
    cfg = AugmentConfig(
        p_rotation=1.0,
        p_scale=1.0,
        p_noise=1.0,
        p_brightness=1.0,
        p_previous_binary=0.0,
        p_previous_remove_component=0.0,
    )
    params = sample_params(
        np.random.default_rng(2), b, n_channels=1, spatial_dims=3, config=cfg, patch_size=size, n_previous=2
    )
    same = torch.stack([label, label], 1)
    out, targets = apply(image, same, params, patch_size=size, previous_labels=(1, 2))
    np.testing.assert_array_equal(out[:, 1].numpy(), (targets[0][:, 0] == 1).float().numpy())
    np.testing.assert_array_equal(out[:, 2].numpy(), (targets[0][:, 0] == 2).float().numpy())
