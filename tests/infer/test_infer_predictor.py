"""TilePredictor: batched mirroring (equal to one flip per pass), precision, tiles per forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from voxflow.errors import ConfigError, VoxflowError
from voxflow.infer import (
    PredictOptions,
    TilePredictor,
    forward_bytes_per_voxel,
    mirror_combinations,
    sliding_window_predict,
    tile_grid,
)


def _norm_net(seed: int, k: int = 3) -> nn.Module:
    """Conv + GroupNorm(C, C) (instance norm, per sample) + conv: batch entries must not interact."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(4, 4), nn.LeakyReLU(), nn.Conv3d(4, k, 3, padding=1)
    ).eval()


def _one_flip_per_pass(
    nets: list[nn.Module], x: torch.Tensor, mirror_axes: tuple[int, ...], perm: list[int] | None, activation: str | None
) -> np.ndarray:
    """The reference: every network and mirroring as its own forward pass of the batch."""
    outs = []
    with torch.no_grad():
        for net in nets:
            for c in mirror_combinations(mirror_axes):
                dims = [a + 2 for a in c]
                xi = torch.flip(x, dims) if dims else x
                y = net(xi if perm is None else xi.permute(perm))
                y = y if perm is None else y.permute(list(np.argsort(perm)))
                y = y if activation is None else torch.softmax(y, 1)
                outs.append(torch.flip(y, dims) if dims else y)
    return torch.stack(outs).mean(0).numpy()


@pytest.mark.parametrize("max_tiles", [None, 1, 4, 5])
@pytest.mark.parametrize(("activation", "order"), [("softmax", (0, 1, 2)), (None, (2, 0, 1))])
def test_batched_mirroring_equals_one_flip_per_pass(
    rng: np.random.Generator, max_tiles: int | None, activation: str | None, order: tuple[int, ...]
) -> None:
    nets = [_norm_net(1), _norm_net(2)]
    x = torch.from_numpy(rng.normal(size=(2, 1, 6, 8, 10)).astype(np.float32))
    pred = TilePredictor(
        nets, mirror_axes=(0, 1, 2), activation=activation, axis_order=order, max_tiles_per_forward=max_tiles
    )
    perm = None if order == (0, 1, 2) else [0, 1, *(2 + a for a in order)]
    ref = _one_flip_per_pass(nets, x, (0, 1, 2), perm, activation)
    np.testing.assert_allclose(pred(x).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_mirror_groups_follow_the_tile_limit() -> None:
    net = _norm_net(0)
    assert [len(g) for g in TilePredictor(net, mirror_axes=(0, 1, 2)).mirror_groups(1)] == [8]
    limited = TilePredictor(net, mirror_axes=(0, 1, 2), max_tiles_per_forward=6)
    assert [len(g) for g in limited.mirror_groups(1)] == [6, 2]
    assert [len(g) for g in limited.mirror_groups(3)] == [2, 2, 2, 2]
    assert [len(g) for g in limited.mirror_groups(7)] == [1] * 8  # a whole batch always goes
    assert [m for g in limited.mirror_groups(2) for m in g] == limited.mirrors  # order kept
    with pytest.raises(VoxflowError, match="max_tiles_per_forward"):
        TilePredictor(net, max_tiles_per_forward=0)


def test_mirrorings_of_a_tile_go_in_one_forward_pass(rng: np.random.Generator) -> None:
    net = _norm_net(3)
    batches: list[int] = []
    net.register_forward_hook(lambda _m, inp, _out: batches.append(int(inp[0].shape[0])))
    TilePredictor(net, mirror_axes=(0, 1, 2))(rng.normal(size=(1, 1, 4, 6, 8)).astype(np.float32))
    assert batches == [8]


def test_precision_resolution_and_bf16_on_the_cpu(rng: np.random.Generator) -> None:
    net = _norm_net(4)
    from voxflow.precision import cpu_has_native_bf16

    assert TilePredictor(net).precision == ("bf16" if cpu_has_native_bf16() else "fp32")  # auto on the CPU
    x = rng.normal(size=(1, 1, 6, 8, 8)).astype(np.float32)
    fp32 = TilePredictor(net, mirror_axes=(2,))(x)
    bf16 = TilePredictor(net, mirror_axes=(2,), precision="bf16")(x)
    assert bf16.dtype == torch.float32  # accumulated in float32
    diff = (bf16 - fp32).abs().max().item()
    assert 0 < diff < 0.05  # bf16 really ran (8-bit mantissa), and stayed close
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        TilePredictor(net, precision="fp16")
    with pytest.raises(VoxflowError, match="precision must be one of"):
        PredictOptions(precision="half")


def test_forward_budget_sets_the_tiles_per_pass(make_config) -> None:  # noqa: ANN001
    from voxflow.architectures import estimate_training_memory_bytes

    cfg = make_config((16, 32, 32))
    vb = forward_bytes_per_voxel(cfg.network, cfg.patch_size_vox, 1, 3)
    per = estimate_training_memory_bytes(cfg.network, cfg.patch_size_vox, 1, 1, 3, n_parameters=0)
    assert vb == pytest.approx(per / (16 * 32 * 32))
    pred = TilePredictor(_norm_net(0), mirror_axes=(0, 1, 2), voxel_bytes=vb)
    n = 16 * 32 * 32
    assert pred.configure(forward_bytes=8 * per + 8).tiles_per_forward(n) == 8
    assert [len(g) for g in pred.mirror_groups(1, n)] == [8]
    assert pred.configure(forward_bytes=8 * per - 8).tiles_per_forward(n) == 7
    assert pred.tiles_per_forward(8 * n) == 1  # a tile 8x larger: one per pass
    assert pred.configure(forward_bytes=1).tiles_per_forward(n) == 1
    assert TilePredictor(_norm_net(0)).tiles_per_forward(n) is None  # no memory model: all mirrorings at once
    assert pred.configure(precision="bf16").precision == "bf16"
    assert TilePredictor(_norm_net(0), amp=False).configure(precision="auto").precision == "fp32"


def test_whole_image_grid_is_one_divisible_tile_or_the_usual_grid() -> None:
    g = tile_grid((35, 50, 36), (40, 48, 32), whole_image_voxels=10**6, divisor_zyx=(8, 8, 8))
    assert (len(g), g.patch_size_vox, g.pad_lo_zyx) == (1, (40, 56, 40), (2, 3, 2))
    usual = tile_grid((35, 50, 36), (40, 48, 32))
    assert tile_grid((35, 50, 36), (40, 48, 32), whole_image_voxels=40 * 56 * 40 - 1, divisor_zyx=(8, 8, 8)) == usual
    assert tile_grid((35, 50, 36), (40, 48, 32), whole_image_voxels=0, divisor_zyx=(8, 8, 8)) == usual
    two_d = tile_grid((5, 50, 36), (1, 48, 32), whole_image_voxels=10**6, divisor_zyx=(1, 16, 16))
    assert (len(two_d), two_d.patch_size_vox) == (5, (1, 64, 48))  # one tile per slice
    assert tile_grid((5, 50, 36), (8, 48, 32), whole_image_voxels=10**6).patch_size_vox == (8, 96, 64)


def test_whole_image_prediction_is_the_network_on_the_padded_image(rng: np.random.Generator) -> None:
    net = _norm_net(5)
    img = rng.normal(size=(1, 11, 13, 9)).astype(np.float32)
    pred = TilePredictor(net, mirror_axes=(0, 2))
    out = sliding_window_predict(
        img, pred, patch_size_vox=(8, 8, 8), n_classes=3, whole_image_voxels=10**6, divisor_zyx=(4, 4, 4)
    )
    padded = np.zeros((1, 1, 12, 16, 12), np.float32)
    padded[0, :, 0:11, 1:14, 1:10] = img
    ref = pred(padded).numpy()[0][:, 0:11, 1:14, 1:10]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    tiled = sliding_window_predict(img, pred, patch_size_vox=(8, 8, 8), n_classes=3)
    assert np.abs(tiled - out).max() > 1e-4  # the option does change the tiles


def _weights_channels_last(net: nn.Module) -> bool:
    convs = [m.weight for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, nn.Conv2d))]
    fmt = {5: torch.channels_last_3d, 4: torch.channels_last}
    return bool(convs) and all(w.is_contiguous(memory_format=fmt[w.ndim]) for w in convs)


@pytest.mark.parametrize("cfg", ["3d_fullres", "2d"])
def test_channels_last_on_the_cpu_scores_what_contiguous_scores(planned_workspace, cfg: str) -> None:  # noqa: ANN001
    """The planner's own network (default preset of the real hippocampus: 32-256 features, its patch):
    by default on the CPU the weights and inputs are channels-last, and the TTA scores equal those of
    the contiguous layout up to float32 rounding; ``contiguous`` keeps (or puts back) the usual layout."""
    from voxflow.nets import build_network
    from voxflow.plan import Plan
    from voxflow.workspace import Workspace

    config = Plan.load(Workspace(planned_workspace).plans).configuration(cfg)
    torch.manual_seed(0)
    net = build_network(config.network, 1, 3).eval()
    twin = build_network(config.network, 1, 3).eval()
    twin.load_state_dict(net.state_dict())
    spatial = 2 if cfg == "2d" else 3
    patch = config.patch_size_vox[-2:] if spatial == 2 else config.patch_size_vox
    x = torch.randn(1, 1, *((1, *patch) if spatial == 2 else patch))
    axes = (1, 2) if spatial == 2 else (0, 1, 2)
    fast = TilePredictor(net, mirror_axes=axes, spatial_dims=spatial, precision="fp32")
    plain = TilePredictor(twin, mirror_axes=axes, spatial_dims=spatial, precision="fp32", memory_format="contiguous")
    assert fast.memory_format == "channels_last"
    assert _weights_channels_last(net)
    assert plain.memory_format == "contiguous"
    assert not _weights_channels_last(twin)
    a, b = fast(x), plain(x)
    assert a.is_contiguous()
    assert a.shape == b.shape
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=2e-5)
    TilePredictor(net, spatial_dims=spatial, memory_format="contiguous")  # the weights are converted back
    assert not _weights_channels_last(net)


def test_memory_format_is_checked() -> None:
    with pytest.raises(VoxflowError, match="memory_format"):
        TilePredictor(_norm_net(0), memory_format="nhwc")
