"""Networks built from a plan's :class:`~voxflow.plan.schema.NetworkSpec`, looked up by name.

:data:`NETWORKS` maps an architecture name to its torch factory; the names and their cost models
(what the planner uses to size a network, torch-free) live in :mod:`voxflow.architectures`.
:func:`register_network` registers both, so a registered network can be planned and built.

>>> from voxflow.plan.schema import NetworkSpec
>>> spec = NetworkSpec(n_stages=2, features_per_stage=(4, 8), kernel_sizes=((3, 3, 3),) * 2,
...                    strides=((1, 1, 1), (2, 2, 2)), n_blocks_per_stage=(1, 1), n_conv_per_stage_decoder=(1,))
>>> net = build_network(spec, in_channels=1, num_outputs=3)
>>> deep_supervision_scales(spec)
[(1.0, 1.0, 1.0)]
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from importlib.metadata import entry_points

from torch import nn

from voxflow.architectures import (
    CostModel,
    activation_elements,
    estimate_training_memory_bytes,
    register_architecture,
)
from voxflow.errors import PlanError
from voxflow.nets._unet import NestedUNet, UNet
from voxflow.plan.schema import NetworkSpec

__all__ = [
    "NETWORKS",
    "NestedUNet",
    "UNet",
    "activation_elements",
    "build_network",
    "count_parameters",
    "deep_supervision_scales",
    "estimate_training_memory_bytes",
    "register_network",
]

NetworkFactory = Callable[[NetworkSpec, int, int], nn.Module]
NETWORKS: dict[str, NetworkFactory] = {}


def register_network(name: str, *, cost: CostModel | str | None = None) -> Callable[[NetworkFactory], NetworkFactory]:
    """Decorator adding a factory ``(spec, in_channels, num_outputs) -> nn.Module`` to :data:`NETWORKS`
    and ``name`` to the architectures a plan may name (:func:`voxflow.architectures.register_architecture`).

    ``cost`` is how the planner sizes it: a :class:`~voxflow.architectures.CostModel`, or the name of
    an architecture to price it like (``"unet"``); without one the network can be named in a plan
    and built, but not planned. Third-party packages can also expose factories via the entry-point
    group ``voxflow.networks`` (and cost models via ``voxflow.architectures``).
    """

    def deco(factory: NetworkFactory) -> NetworkFactory:
        register_architecture(name, cost)
        NETWORKS[name] = factory
        return factory

    return deco


@register_network("unet")
def _plain(spec: NetworkSpec, in_channels: int, num_outputs: int) -> nn.Module:
    return UNet(spec, in_channels, num_outputs, residual=False)


@register_network("resenc_unet")
def _resenc(spec: NetworkSpec, in_channels: int, num_outputs: int) -> nn.Module:
    return UNet(spec, in_channels, num_outputs, residual=True)


@register_network("unetpp")
def _nested(spec: NetworkSpec, in_channels: int, num_outputs: int) -> nn.Module:
    return NestedUNet(spec, in_channels, num_outputs)


def _lookup(name: str) -> NetworkFactory:
    if name not in NETWORKS:
        for ep in entry_points(group="voxflow.networks"):
            if ep.name == name:
                NETWORKS[name] = ep.load()
    if name not in NETWORKS:
        close = difflib.get_close_matches(name, list(NETWORKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PlanError(f"network.architecture must be one of {sorted(NETWORKS)}; got {name!r}.{hint}")
    return NETWORKS[name]


def build_network(spec: NetworkSpec, in_channels: int, num_outputs: int) -> nn.Module:
    """Build the network named by ``spec.architecture``.

    Input (B, in_channels, Z, Y, X) in 3D or (B, in_channels, Y, X) in 2D; each spatial axis must be
    divisible by ``spec.total_stride``. In training mode with deep supervision it returns a list of
    logits (B, num_outputs, ...), full resolution first; otherwise one tensor.
    """
    if in_channels < 1 or num_outputs < 1:
        raise PlanError(f"in_channels and num_outputs must be >= 1; got {in_channels} and {num_outputs}")
    return _lookup(spec.architecture)(spec, in_channels, num_outputs)


def deep_supervision_scales(spec: NetworkSpec) -> list[tuple[float, ...]]:
    """Per-axis scale of every output of :func:`build_network` relative to the input, full
    resolution (all 1.0) first: one entry per head (``spec.output_stages``)."""
    return [
        tuple(1.0 / math.prod(st[a] for st in spec.strides[: s + 1]) for a in range(spec.spatial_dims))
        for s in spec.output_stages
    ]


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
