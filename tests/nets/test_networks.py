from __future__ import annotations

import pytest
import torch

from voxflow.errors import PlanError
from voxflow.nets import (
    activation_elements,
    build_network,
    count_parameters,
    deep_supervision_scales,
    estimate_training_memory_bytes,
    register_network,
)
from voxflow.plan.schema import NetworkSpec


def _spec(
    dims: int = 3, architecture: str = "unet", strides=None, features=(4, 8, 16), ds: bool = True, kernels=None
) -> NetworkSpec:
    n = len(features)
    strides = strides or [(1,) * dims] + [(2,) * dims] * (n - 1)
    return NetworkSpec(
        architecture=architecture,
        spatial_dims=dims,
        n_stages=n,
        features_per_stage=features,
        kernel_sizes=kernels or [(3,) * dims] * n,
        strides=strides,
        n_blocks_per_stage=[1, 2, 2, 1, 1][:n],
        n_conv_per_stage_decoder=[1] * (n - 1),
        deep_supervision=ds,
    )


@pytest.mark.parametrize("architecture", ["unet", "resenc_unet", "unetpp"])
@pytest.mark.parametrize(("dims", "spatial"), [(3, (8, 16, 24)), (2, (16, 24))])
def test_output_shapes_follow_deep_supervision_scales(architecture: str, dims: int, spatial: tuple[int, ...]) -> None:
    spec = _spec(dims, architecture, features=(4, 8, 16, 16))  # 3 decoder stages, the lowest unsupervised
    net = build_network(spec, in_channels=2, num_outputs=3).train()
    x = torch.randn(2, 2, *spatial)
    outs = net(x)
    scales = deep_supervision_scales(spec)
    assert isinstance(outs, list)
    assert len(outs) == len(scales) == 2
    for out, scale in zip(outs, scales, strict=True):
        assert out.shape == (2, 3, *(int(s * f) for s, f in zip(spatial, scale, strict=True)))
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 3, *spatial)
    net.train()
    net.deep_supervision = False
    assert net(x).shape == (2, 3, *spatial)


@pytest.mark.parametrize("architecture", ["unet", "resenc_unet", "unetpp"])
@pytest.mark.parametrize("ds", [True, False])
def test_every_parameter_gets_a_gradient_from_the_deep_supervision_loss(architecture: str, ds: bool) -> None:
    """The root of the DDP crash: nnU-Net's lowest-resolution output has loss weight 0, so a head for it
    receives no gradient. The network builds only heads that the loss covers."""
    from voxflow.train import DeepSupervisionLoss, SegmentationLoss, deep_supervision_weights
    from voxflow.train.labels import LabelSpec

    spec = _spec(3, architecture, features=(4, 8, 8, 8, 8), ds=ds)
    net = build_network(spec, in_channels=1, num_outputs=3).train()
    scales = deep_supervision_scales(spec)
    assert len(net.heads) == len(scales) == (3 if ds else 1)  # 4 decoder stages, the lowest unsupervised
    outs = net(torch.randn(2, 1, 16, 16, 16))
    outs = outs if isinstance(outs, list) else [outs]
    tgts = [torch.randint(0, 3, (2, 1, *o.shape[2:])) for o in outs]
    loss = DeepSupervisionLoss(SegmentationLoss(LabelSpec(3, ("a", "b"))), deep_supervision_weights(len(scales)))
    loss(outs, tgts).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_anisotropic_plan() -> None:
    strides = [(1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2)]
    kernels = [(1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)]
    spec = _spec(3, "resenc_unet", strides=strides, kernels=kernels, features=(4, 8, 16, 16))
    assert spec.total_stride == (2, 8, 8)
    assert deep_supervision_scales(spec) == [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5)]
    net = build_network(spec, 1, 2)
    outs = net(torch.randn(1, 1, 4, 16, 24))
    assert [tuple(o.shape[2:]) for o in outs] == [(4, 16, 24), (4, 8, 12)]  # (2, 4, 6) is not supervised
    # a (1, 3, 3) kernel never mixes neighbouring z slices at full resolution in the first conv
    first = net.encoder.stem.conv
    assert tuple(first.kernel_size) == (1, 3, 3)


def test_without_deep_supervision_one_output_and_one_scale() -> None:
    spec = _spec(3, ds=False)
    assert deep_supervision_scales(spec) == [(1.0, 1.0, 1.0)]
    out = build_network(spec, 1, 2).train()(torch.randn(1, 1, 8, 8, 8))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 2, 8, 8, 8)


def test_residual_and_nested_variants_differ_from_plain() -> None:
    counts = {a: count_parameters(build_network(_spec(3, a), 1, 3)) for a in ("unet", "resenc_unet", "unetpp")}
    assert counts["unet"] < counts["unetpp"]
    assert counts["unet"] < counts["resenc_unet"]
    net = build_network(_spec(3, "resenc_unet"), 1, 3)
    assert any(type(m).__name__ == "ResidualBlock" for m in net.modules())


def test_count_parameters_by_hand() -> None:
    spec = NetworkSpec(
        spatial_dims=2,
        n_stages=1,
        features_per_stage=(2,),
        kernel_sizes=[(3, 3)],
        strides=[(1, 1)],
        n_blocks_per_stage=(1,),
        n_conv_per_stage_decoder=(),
    )
    net = build_network(spec, 1, 3)
    # conv 1->2 3x3 (+bias) = 20, instance norm affine = 4, head 2->3 1x1 (+bias) = 9
    assert count_parameters(net) == 20 + 4 + 9
    assert net.eval()(torch.randn(1, 1, 5, 5)).shape == (1, 3, 5, 5)


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Networks registered by a test are gone after it."""
    import voxflow.architectures as arch
    import voxflow.nets as nets

    monkeypatch.setattr(arch, "_COSTS", dict(arch._COSTS))
    monkeypatch.setattr(nets, "NETWORKS", dict(nets.NETWORKS))


def test_registry_unknown_name_and_custom_factory(scratch_registry: None) -> None:
    with pytest.raises(PlanError, match="Did you mean 'unet'"):
        _spec(2, "unett")

    @register_network("tiny_test_net")
    def _factory(spec: NetworkSpec, in_channels: int, num_outputs: int) -> torch.nn.Module:
        return torch.nn.Conv2d(in_channels, num_outputs, 1)

    assert isinstance(build_network(_spec(2, "tiny_test_net"), 1, 2), torch.nn.Conv2d)


@pytest.mark.parametrize("architecture", ["unet", "resenc_unet", "unetpp"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("ds", [True, False])
def test_spec_parameter_count_is_exact(architecture: str, dims: int, ds: bool) -> None:
    from voxflow.architectures import parameter_count

    for features in [(2,), (4, 8, 16), (4, 8, 16, 16)]:
        spec = _spec(dims, architecture, features=features, ds=ds)
        assert parameter_count(spec, 2, 3) == count_parameters(build_network(spec, 2, 3))


def _saved_activation_bytes(net: torch.nn.Module, x: torch.Tensor, k: int) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = net(x)
        for o in outs:
            t = torch.randint(0, k, (o.shape[0], *o.shape[2:]))
            torch.nn.functional.cross_entropy(o, t) + torch.softmax(o, 1).mean()
    return sum(seen.values())


@pytest.mark.parametrize("architecture", ["unet", "resenc_unet", "unetpp"])
@pytest.mark.parametrize(("dims", "patch"), [(3, (8, 16, 16)), (2, (1, 32, 48))])
def test_activation_estimate_tracks_autograd(architecture: str, dims: int, patch: tuple[int, ...]) -> None:
    spec = _spec(dims, architecture)
    net = build_network(spec, 1, 3).train()
    measured = _saved_activation_bytes(net, torch.randn(2, 1, *patch[-dims:]), 3)
    estimated = activation_elements(spec, patch, 1, 3) * 2 * 4
    # the estimate adds the backward pass's transient gradients: at or a little above what is saved
    assert measured <= estimated <= 1.4 * measured
    total = estimate_training_memory_bytes(spec, patch, 2, 1, 3)
    assert total == estimated + count_parameters(net) * 16
    assert estimate_training_memory_bytes(spec, patch, 4, 1, 3) > total
