from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from voxflow.data.augment import AugmentConfig, Params, _rotation, apply, enlarged_patch_size, sample_params


def _batch(rng: np.random.Generator, shape: tuple[int, ...], b: int = 3, c: int = 2):
    image = torch.from_numpy(rng.normal(size=(b, c, *shape)).astype(np.float32))
    label = torch.from_numpy(rng.integers(0, 3, size=(b, *shape)).astype(np.uint8))
    return image, label


def _params(b: int, c: int, d: int, **changes) -> Params:
    return dataclasses.replace(Params.identity(b, c, d), **changes)


@pytest.mark.parametrize("shape", [(9, 8, 7), (12, 10)])
def test_identity_params_return_input_exactly(rng, shape) -> None:
    image, label = _batch(rng, shape)
    out, targets = apply(image, label, Params.identity(3, 2, len(shape)), patch_size=shape)
    assert torch.equal(out, image)
    assert torch.equal(targets[0][:, 0], label.long())
    assert out.data_ptr() != image.data_ptr()  # a copy: later in-place steps never touch the input


def test_identity_params_centre_crop_enlarged_patch(rng) -> None:
    image, label = _batch(rng, (13, 12, 11))
    out, targets = apply(image, label, Params.identity(3, 2, 3), patch_size=(7, 6, 5))
    assert torch.equal(out, image[:, :, 3:10, 3:9, 3:8])
    assert torch.equal(targets[0][:, 0], label[:, 3:10, 3:9, 3:8].long())


def test_mirror_once_flips_and_twice_is_identity(rng) -> None:
    image, label = _batch(rng, (6, 5, 4))
    mirror = np.array([[True, False, True], [False, True, False], [True, True, True]])
    p = _params(3, 2, 3, mirror=mirror)
    once, t1 = apply(image, label, p, patch_size=(6, 5, 4))
    expected = image.numpy().copy()
    for b in range(3):
        axes = tuple(1 + a for a in np.flatnonzero(mirror[b]))
        expected[b] = np.flip(expected[b], axes)
        assert torch.equal(
            t1[0][b, 0], torch.from_numpy(np.flip(label[b].numpy(), tuple(a - 1 for a in axes)).copy()).long()
        )
    np.testing.assert_array_equal(once.numpy(), expected)
    twice, t2 = apply(once, t1[0], p, patch_size=(6, 5, 4))
    assert torch.equal(twice, image)
    assert torch.equal(t2[0][:, 0], label.long())


def test_noise_has_expected_std_only_where_drawn() -> None:
    image = torch.zeros((3, 2, 32, 32, 32))
    p = _params(3, 2, 3, noise_std=np.array([0.3, 0.0, 0.1]), noise_seed=11)
    out, _ = apply(image, None, p, patch_size=(32, 32, 32))
    assert abs(float(out[0].std()) - 0.3) < 0.005
    assert abs(float(out[2].std()) - 0.1) < 0.002
    assert torch.equal(out[1], image[1])
    again, _ = apply(image, None, p, patch_size=(32, 32, 32))
    assert torch.equal(out, again)


def test_rotation_90_degrees_in_2d_is_rot90(rng) -> None:
    image, label = _batch(rng, (9, 9), b=1, c=1)
    p = _params(1, 1, 2, matrix=_rotation([math.pi / 2])[None], spatial=np.array([True]))
    out, targets = apply(image, label, p, patch_size=(9, 9))
    np.testing.assert_allclose(out[0, 0].numpy(), np.rot90(image[0, 0].numpy(), -1), atol=1e-5)
    np.testing.assert_array_equal(targets[0][0, 0].numpy(), np.rot90(label[0].numpy(), -1))


def test_scaling_stretches_a_linear_ramp() -> None:
    ramp = torch.arange(21, dtype=torch.float32)[None, None, :, None, None].expand(1, 1, 21, 5, 5).contiguous()
    p = _params(1, 1, 3, matrix=np.eye(3)[None] * 0.5, spatial=np.array([True]))
    out, _ = apply(ramp, None, p, patch_size=(11, 5, 5))
    np.testing.assert_allclose(out[0, 0, :, 2, 2].numpy(), 10 + 0.5 * (np.arange(11) - 5), atol=1e-5)


def _position_batch(shape: tuple[int, ...], b: int):
    """Image channels = voxel coordinates, then a channel of ones that tells where interpolation used
    only voxels of the input (1) or also the zero padding (< 1); label derived from the coordinates."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    image = np.stack([*grids, np.ones(shape, np.float32)])
    label = (sum((g // 3) for g in grids) % 4).astype(np.uint8)
    return (torch.from_numpy(np.repeat(image[None], b, 0)), torch.from_numpy(np.repeat(label[None], b, 0)))


@pytest.mark.parametrize(
    ("shape", "final", "elastic"),
    [((21, 20, 19), (11, 12, 9), 0.0), ((21, 20, 19), (11, 12, 9), 1.0), ((30, 28), (16, 14), 0.0)],
)
def test_augmentation_keeps_image_and_label_aligned(shape, final, elastic) -> None:
    b, d = 6, len(shape)
    image, label = _position_batch(shape, b)
    cfg = AugmentConfig(
        p_rotation=1.0,
        p_scale=1.0,
        p_elastic=elastic,
        elastic_magnitude_vox=(1.0, 2.0),
        elastic_grid_spacing_vox=4,
        p_mirror=0.5,
        **{
            f: 0.0
            for f in ("p_noise", "p_blur", "p_brightness", "p_contrast", "p_lowres", "p_gamma", "p_gamma_inverted")
        },
    )
    params = sample_params(np.random.default_rng(0), b, n_channels=d + 1, spatial_dims=d, config=cfg, patch_size=final)
    assert params.spatial.all()
    assert params.mirror.any()
    out, targets = apply(image, label, params, patch_size=final)
    pos = out.numpy()[:, :d]  # sampled source position of every output voxel (linear interpolation is exact)
    inside = out.numpy()[:, d] > 1 - 1e-5
    frac = np.abs(pos - np.round(pos))
    clear = inside & np.all(np.abs(frac - 0.5) > 1e-3, axis=1)
    idx = np.round(pos).astype(int)
    expected = sum(idx[:, a] // 3 for a in range(d)) % 4
    got = targets[0][:, 0].numpy()
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(got[clear], expected[clear])
    assert (got[out.numpy()[:, d] < 1e-6] == 0).all()  # all neighbours outside the read patch: background


def test_blur_matches_scipy_per_channel(rng) -> None:
    image, _ = _batch(rng, (11, 10, 9), b=2, c=2)
    sigma = np.array([[0.7, 0.0], [0.0, 1.0]])
    out, _ = apply(image, None, _params(2, 2, 3, blur_sigma=sigma), patch_size=(11, 10, 9))
    for b, c in [(0, 0), (1, 1)]:
        np.testing.assert_allclose(out[b, c].numpy(), ndi.gaussian_filter(image[b, c].numpy(), sigma[b, c]), atol=1e-5)
    assert torch.equal(out[0, 1], image[0, 1])
    assert torch.equal(out[1, 0], image[1, 0])


def test_intensity_transforms_change_what_they_should(rng) -> None:
    image, _ = _batch(rng, (10, 9, 8), b=2, c=2)
    image = image + 3
    size = (10, 9, 8)
    bright, _ = apply(image, None, _params(2, 2, 3, brightness=np.array([[1.2, 1.0], [1.0, 1.0]])), patch_size=size)
    torch.testing.assert_close(bright[0, 0], image[0, 0] * 1.2)
    assert torch.equal(bright[1:], image[1:])
    con, _ = apply(image, None, _params(2, 2, 3, contrast=np.array([[1.0, 0.8], [1.0, 1.0]])), patch_size=size)
    x, y = image[0, 1], con[0, 1]
    torch.testing.assert_close(y.mean(), x.mean(), atol=1e-4, rtol=0)
    assert abs(float(y.std() / x.std()) - 0.8) < 1e-3
    gam, _ = apply(image, None, _params(2, 2, 3, gamma=np.array([1.4, 1.0])), patch_size=size)
    torch.testing.assert_close(gam[0].mean(), image[0].mean(), atol=1e-4, rtol=0)
    torch.testing.assert_close(gam[0].std(unbiased=False), image[0].std(unbiased=False), atol=1e-4, rtol=0)
    assert not torch.allclose(gam[0], image[0])
    assert torch.equal(gam[1], image[1])
    inv, _ = apply(image, None, _params(2, 2, 3, gamma_inverted=np.array([1.0, 0.8])), patch_size=size)
    assert not torch.allclose(inv[1], image[1])
    assert torch.equal(inv[0], image[0])
    low, _ = apply(image, None, _params(2, 2, 3, lowres_zoom=np.array([[1.0, 1.0], [0.5, 1.0]])), patch_size=size)
    assert low.shape == image.shape
    assert not torch.allclose(low[1, 0], image[1, 0])
    assert torch.equal(low[0], image[0])
    assert torch.equal(low[1, 1], image[1, 1])


def test_deep_supervision_targets_are_nearest_downsampled(rng) -> None:
    image, label = _batch(rng, (8, 8, 8), b=2, c=1)
    _, targets = apply(
        image,
        label,
        Params.identity(2, 1, 3),
        patch_size=(8, 8, 8),
        ds_scales=[(1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (0.5, 0.25, 0.25)],
    )
    assert [tuple(t.shape) for t in targets] == [(2, 1, 8, 8, 8), (2, 1, 4, 4, 4), (2, 1, 4, 2, 2)]
    assert all(t.dtype == torch.int64 for t in targets)
    assert torch.equal(targets[1][:, 0], label[:, 1::2, 1::2, 1::2].long())
    assert torch.equal(targets[2][:, 0], label[:, 1::2, 2::4, 2::4].long())


def test_sample_params_is_seeded_and_follows_probabilities() -> None:
    a = sample_params(np.random.default_rng(4), 8, n_channels=2, spatial_dims=3)
    b = sample_params(np.random.default_rng(4), 8, n_channels=2, spatial_dims=3)
    for f in dataclasses.fields(Params):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        assert (va is None and vb is None) or np.array_equal(va, vb)
    n = 4000
    p = sample_params(np.random.default_rng(0), n, n_channels=1, spatial_dims=3)
    for freq, prob in [
        ((p.noise_std > 0).mean(), 0.1),
        ((p.brightness != 1).mean(), 0.15),
        ((p.gamma != 1).mean(), 0.3),
        ((p.gamma_inverted != 1).mean(), 0.1),
        (p.mirror.mean(), 0.5),
        ((p.lowres_zoom != 1).mean(), 0.125),
        (p.spatial.mean(), 1 - 0.8 * 0.8),
        ((p.blur_sigma > 0).mean(), 0.1),
    ]:
        assert abs(freq - prob) < 4 * math.sqrt(prob * (1 - prob) / n)
    scales = np.linalg.det(p.matrix[p.spatial]) ** (1 / 3)
    assert scales.min() >= 0.7 - 1e-9
    assert scales.max() <= 1.4 + 1e-9
    two_d = sample_params(
        np.random.default_rng(0), 4, n_channels=1, spatial_dims=2, config=AugmentConfig(mirror_axes=(0, 1, 2))
    )
    assert two_d.matrix.shape == (4, 2, 2)
    assert two_d.mirror.shape == (4, 2)


def test_enlarged_patch_size() -> None:
    assert enlarged_patch_size((8, 16, 16), AugmentConfig.off()) == (8, 16, 16)
    big = enlarged_patch_size((80, 160, 160), AugmentConfig())
    assert big == (176, 258, 258)  # nnU-Net's get_patch_size gives about the same for this patch
    small = enlarged_patch_size((7, 9), AugmentConfig(p_scale=0.0, rotation_deg=10))
    assert all(s > f and (s - f) % 2 == 0 for s, f in zip(small, (7, 9), strict=True))


def test_augment_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="p_noise"):
        AugmentConfig(p_noise=1.5)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentConfig(scale_range=(1.4, 0.7))


def test_mirror_of_resampled_samples_is_folded_into_the_grid(rng) -> None:
    image, label = _batch(rng, (9, 8, 7), b=2, c=1)
    mirror = np.array([[True, False, True], [False, True, False]])
    p = _params(2, 1, 3, mirror=mirror, spatial=np.array([True, True]))  # identity matrix, but resampled
    out, targets = apply(image, label, p, patch_size=(7, 6, 5))
    for b in range(2):
        axes = tuple(int(a) for a in np.flatnonzero(mirror[b]))
        crop = image[b, :, 1:8, 1:7, 1:6].numpy()
        np.testing.assert_allclose(out[b].numpy(), np.flip(crop, tuple(1 + a for a in axes)), atol=1e-5)
        np.testing.assert_array_equal(targets[0][b, 0].numpy(), np.flip(label[b, 1:8, 1:7, 1:6].numpy(), axes))


def _batchgenerators_gamma(x: np.ndarray, gamma: float, invert: bool) -> np.ndarray:
    """Oracle: batchgenerators' augment_gamma (retain_stats=True, per_channel=False) in float64."""
    x = -x.astype(np.float64) if invert else x.astype(np.float64)
    mean, sd = x.mean(), x.std()
    lo, rng = x.min(), x.max() - x.min() + 1e-7
    y = ((x - lo) / rng) ** gamma * rng + lo
    y = (y - y.mean()) / (y.std() + 1e-8) * sd + mean
    return -y if invert else y


@pytest.mark.parametrize("invert", [False, True])
def test_gamma_matches_batchgenerators(rng, invert) -> None:
    image, _ = _batch(rng, (9, 8, 7), b=3, c=2)
    image = image * 40 + 100
    gamma = np.array([0.75, 1.0, 1.4])
    field = "gamma_inverted" if invert else "gamma"
    out, _ = apply(image, None, _params(3, 2, 3, **{field: gamma}), patch_size=(9, 8, 7))
    for b in (0, 2):
        np.testing.assert_allclose(
            out[b].numpy(), _batchgenerators_gamma(image[b].numpy(), gamma[b], invert), rtol=1e-4, atol=1e-3
        )
    assert torch.equal(out[1], image[1])


def test_nnunet_rotation_rules_for_anisotropic_and_elongated_patches() -> None:
    cfg = AugmentConfig(p_rotation=1.0, p_scale=1.0)
    aniso = (16, 160, 160)
    assert cfg.is_in_plane(aniso)
    assert not cfg.is_in_plane((80, 160, 160))
    assert enlarged_patch_size(aniso, cfg)[0] == 16  # z is neither rotated nor scaled
    p = sample_params(np.random.default_rng(0), 16, n_channels=1, spatial_dims=3, config=cfg, patch_size=aniso)
    np.testing.assert_allclose(p.matrix[:, 0], np.tile([1.0, 0.0, 0.0], (16, 1)), atol=1e-12)
    np.testing.assert_allclose(p.matrix[:, :, 0], np.tile([1.0, 0.0, 0.0], (16, 1)), atol=1e-12)
    assert math.isclose(cfg.max_rotation_rad(2, (64, 256)), math.radians(15))
    assert math.isclose(cfg.max_rotation_rad(2, (128, 128)), math.radians(180))
    assert math.isclose(cfg.max_rotation_rad(3, (80, 160, 160)), math.radians(30))
    assert not AugmentConfig(in_plane=False).is_in_plane(aniso)
