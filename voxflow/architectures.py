"""Network architectures by name, and what they cost: the registry the plan validates against (no torch).

Two registries, one name space. This module holds the **names and cost models** (pure arithmetic on a
:class:`~voxflow.plan.NetworkSpec`: the conv layers a network builds and the activations autograd
keeps), which the planner needs to size patch and batch; :mod:`voxflow.nets` holds the torch
**factories** that build the networks. ``NetworkSpec.architecture`` must name a registered
architecture, and the planner prices it with its :class:`CostModel`, without importing torch.

Registering:

* ``voxflow.nets.register_network("my_net", cost="unet")`` registers a factory and the name, here
  priced like the plain U-Net (``cost=`` also takes a :class:`CostModel`; without one the name is
  valid in a plan, but :func:`voxflow.plan.plan_experiment` cannot size it);
* :func:`register_architecture` registers a name and cost model alone (torch-free packages);
* entry points: group ``voxflow.networks`` (factories, loaded by :mod:`voxflow.nets` on first use)
  and group ``voxflow.architectures`` (:class:`CostModel` objects, loaded when the planner needs
  one). Entry-point names are valid architecture names without loading anything.

The built-in cost models (``unet``, ``resenc_unet``, ``unetpp``) count what
:mod:`voxflow.nets._unet` builds:

* layers (:func:`parameter_count`, :func:`conv_flops`): every conv, transposed conv and
  segmentation head, with its stage, channels and kernel volume; ``parameter_count`` equals the
  parameters of the built network (``tests/nets/test_networks.py``);
* activations (:func:`activation_elements`): a ConvNormAct keeps its conv output (for the norm) and
  its activation output, ``2·c·v`` elements for ``c`` channels on ``v`` voxels; a residual block two
  ConvNormAct, its sum and its shortcut, about ``5·c·v`` (+ ``2·c·v`` for a projection shortcut); a
  decoder node its concatenated input and its ConvNormAct outputs; each segmentation head its
  logits, and the loss a softmax and a one-hot of them (``3·K·v``); the backward pass briefly holds
  gradients of the two largest maps on top. Checked against the bytes autograd really saves
  (``tests/nets/test_networks.py``: at or up to 40% above).

:func:`estimate_training_memory_bytes` turns them into bytes: activations x batch x bytes per
element (4 fp32, 2 under AMP) x ``workspace_factor``, plus 16 bytes per parameter (weights,
gradients, two optimiser buffers). The planner's :func:`voxflow.plan.estimate_memory_bytes` is this
with its workspace factor.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import NamedTuple, Protocol

from voxflow.errors import PlanError

__all__ = [
    "CostModel",
    "Layer",
    "NetworkTopology",
    "activation_elements",
    "architecture_names",
    "check_architecture",
    "conv_flops",
    "cost_model",
    "estimate_training_memory_bytes",
    "parameter_count",
    "register_architecture",
    "stage_shapes",
]

FACTORY_GROUP = "voxflow.networks"
COST_GROUP = "voxflow.architectures"


class NetworkTopology(Protocol):
    """What a cost model reads of a :class:`~voxflow.plan.NetworkSpec`."""

    @property
    def architecture(self) -> str: ...
    @property
    def spatial_dims(self) -> int: ...
    @property
    def n_stages(self) -> int: ...
    @property
    def features_per_stage(self) -> tuple[int, ...]: ...
    @property
    def kernel_sizes(self) -> tuple[tuple[int, ...], ...]: ...
    @property
    def strides(self) -> tuple[tuple[int, ...], ...]: ...
    @property
    def n_blocks_per_stage(self) -> tuple[int, ...]: ...
    @property
    def n_conv_per_stage_decoder(self) -> tuple[int, ...]: ...
    @property
    def output_stages(self) -> tuple[int, ...]: ...
    def __hash__(self) -> int: ...  # cost counts are cached per spec


class Layer(NamedTuple):
    """One conv of a network: its output lies on ``stage``'s grid; ``norm`` 1 if an instance norm follows."""

    stage: int
    c_in: int
    c_out: int
    kernel_volume: int
    norm: int


@dataclass(frozen=True)
class CostModel:
    """How the planner prices an architecture without building it.

    ``layers(spec, in_channels, num_outputs)`` yields every :class:`Layer`;
    ``activation_elements(spec, patch_size_vox, in_channels, num_outputs)`` counts the elements
    autograd keeps for one sample in a training forward pass (``patch_size_vox`` is (z, y, x); a
    2D spec uses its last two entries).
    """

    layers: Callable[[NetworkTopology, int, int], Iterable[Layer]]
    activation_elements: Callable[[NetworkTopology, Sequence[int], int, int], int]


_COSTS: dict[str, CostModel | None] = {}


def register_architecture(name: str, cost: CostModel | str | None = None) -> None:
    """Make ``name`` a valid ``NetworkSpec.architecture``, priced by ``cost`` (a :class:`CostModel`
    or the name of a registered architecture to price it like). ``cost=None`` keeps a cost model
    registered before, if any."""
    if isinstance(cost, str):
        cost = cost_model(cost)
    if cost is None and _COSTS.get(name) is not None:
        return
    _COSTS[name] = cost


def _entry_point_names() -> set[str]:
    return {ep.name for group in (FACTORY_GROUP, COST_GROUP) for ep in entry_points(group=group)}


def architecture_names() -> tuple[str, ...]:
    """Every valid architecture name: registered ones and those of installed entry points, sorted."""
    return tuple(sorted(set(_COSTS) | _entry_point_names()))


def check_architecture(name: str, *, field: str = "architecture") -> str:
    """``name`` if it is a valid architecture, else :class:`PlanError` suggesting the closest."""
    if isinstance(name, str) and (name in _COSTS or name in _entry_point_names()):
        return name
    options = architecture_names()
    close = difflib.get_close_matches(str(name), options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise PlanError(
        f"{field} must be one of {list(options)}; got {name!r}.{hint} Networks come from "
        f"`voxflow.nets.register_network` or the {FACTORY_GROUP!r} entry points."
    )


def cost_model(name: str) -> CostModel:
    """The cost model of architecture ``name`` (registered, or from a ``voxflow.architectures`` entry point)."""
    if _COSTS.get(name) is None:
        for ep in entry_points(group=COST_GROUP):
            if ep.name == name:
                _COSTS[name] = ep.load()
    found = _COSTS.get(name)
    if found is None:
        check_architecture(name)
        raise PlanError(
            f"architecture {name!r} has no cost model, so it cannot be planned: register it with "
            f"`voxflow.nets.register_network({name!r}, cost=...)` (a CostModel or the name of an "
            f"architecture to price it like, e.g. 'unet') or "
            f"`voxflow.architectures.register_architecture`."
        )
    return found


# ------------------------------------------------------------------------------ generic counts
def stage_shapes(spec: NetworkTopology, patch_size_vox: Sequence[int]) -> list[tuple[int, ...]]:
    """Spatial shape of every stage's feature map (stage 0 first) for a (z, y, x) patch."""
    cur = tuple(int(p) for p in list(patch_size_vox)[-spec.spatial_dims :])
    out = []
    for st in spec.strides:
        cur = tuple(max(1, c // s) for c, s in zip(cur, st, strict=True))
        out.append(cur)
    return out


def activation_elements(
    spec: NetworkTopology, patch_size_vox: Sequence[int], in_channels: int, num_outputs: int
) -> int:
    """Elements autograd keeps for one sample (batch 1) in a training forward pass."""
    return int(cost_model(spec.architecture).activation_elements(spec, patch_size_vox, in_channels, num_outputs))


@functools.lru_cache(maxsize=4096)
def _parameter_count(cost: CostModel, spec: NetworkTopology, in_channels: int, num_outputs: int) -> int:
    return sum(
        ly.c_in * ly.c_out * ly.kernel_volume + ly.c_out + 2 * ly.c_out * ly.norm
        for ly in cost.layers(spec, in_channels, num_outputs)
    )


def parameter_count(spec: NetworkTopology, in_channels: int, num_outputs: int) -> int:
    """Parameters of the network ``voxflow.nets.build_network(spec, in_channels, num_outputs)``
    builds, counted from the spec (conv weights and biases, instance-norm affine parameters)."""
    return _parameter_count(cost_model(spec.architecture), spec, in_channels, num_outputs)


def conv_flops(spec: NetworkTopology, patch_size_vox: Sequence[int], in_channels: int, num_outputs: int) -> int:
    """Forward FLOPs (2 per multiply-add) of the convolutions for one sample."""
    vox = [math.prod(s) for s in stage_shapes(spec, patch_size_vox)]
    return sum(
        2 * ly.c_in * ly.c_out * ly.kernel_volume * vox[ly.stage]
        for ly in cost_model(spec.architecture).layers(spec, in_channels, num_outputs)
    )


def estimate_training_memory_bytes(
    spec: NetworkTopology,
    patch_size_vox: Sequence[int],
    batch_size: int,
    in_channels: int,
    num_outputs: int,
    *,
    bytes_per_element: int = 4,
    workspace_factor: float = 1.0,
    n_parameters: int | None = None,
) -> int:
    """Estimated peak bytes of one training step (see the module docstring).

    ``bytes_per_element`` 4 for fp32, 2 under AMP; ``workspace_factor`` scales the activations for
    what the count does not see (cuDNN workspaces, allocator fragmentation); ``n_parameters``
    defaults to :func:`parameter_count`.
    """
    act = activation_elements(spec, patch_size_vox, in_channels, num_outputs) * batch_size * bytes_per_element
    params = parameter_count(spec, in_channels, num_outputs) if n_parameters is None else n_parameters
    return int(workspace_factor * act + 16 * params)


# ------------------------------------------------------------------------------ the built-in U-Nets
def _unet_layers(
    spec: NetworkTopology, in_channels: int, num_outputs: int, *, residual: bool, nested: bool
) -> Iterator[Layer]:
    f = spec.features_per_stage
    k = [math.prod(ks) for ks in spec.kernel_sizes]
    n = spec.n_stages
    c_prev = in_channels
    if residual:
        yield Layer(0, in_channels, f[0], k[0], 1)  # stem
        c_prev = f[0]
    for s in range(n):
        for b in range(spec.n_blocks_per_stage[s]):
            c_in = c_prev if b == 0 else f[s]
            yield Layer(s, c_in, f[s], k[s], 1)
            if residual:
                yield Layer(s, f[s], f[s], k[s], 1)
                if c_in != f[s]:
                    yield Layer(s, c_in, f[s], 1, 1)  # projection shortcut
        c_prev = f[s]
    for s in range(n - 1):
        n_conv = spec.n_conv_per_stage_decoder[n - 2 - s]
        for j in range(1, n - s) if nested else [1]:
            yield Layer(s, f[s + 1], f[s], math.prod(spec.strides[s + 1]), 0)  # transposed conv
            yield Layer(s, f[s] * (j + 1), f[s], k[s], 1)
            for _ in range(n_conv - 1):
                yield Layer(s, f[s], f[s], k[s], 1)
    for s in spec.output_stages:
        yield Layer(s, f[s], num_outputs, 1, 0)  # segmentation heads


def _unet_activations(
    spec: NetworkTopology,
    patch_size_vox: Sequence[int],
    in_channels: int,
    num_outputs: int,
    *,
    residual: bool,
    nested: bool,
) -> int:
    v = [math.prod(s) for s in stage_shapes(spec, patch_size_vox)]
    f = spec.features_per_stage
    n = spec.n_stages
    total = in_channels * v[0]
    if residual:
        total += 2 * f[0] * v[0]  # stem
    for s in range(n):
        nb = spec.n_blocks_per_stage[s]
        if residual:
            total += 5 * f[s] * v[s] * nb + 2 * f[s] * v[s] * (s > 0)
        else:
            total += 2 * f[s] * v[s] * nb
    for s in range(n - 1):
        n_conv = spec.n_conv_per_stage_decoder[n - 2 - s]
        for j in range(1, n - s) if nested else [1]:
            total += (j + 1) * f[s] * v[s] + 2 * f[s] * v[s] * n_conv
    total += sum(3 * num_outputs * v[s] for s in spec.output_stages)
    largest = max(f[s] * v[s] for s in range(n))
    return total + 2 * largest


def _unet_cost(*, residual: bool, nested: bool) -> CostModel:
    return CostModel(
        layers=functools.partial(_unet_layers, residual=residual, nested=nested),
        activation_elements=functools.partial(_unet_activations, residual=residual, nested=nested),
    )


register_architecture("unet", _unet_cost(residual=False, nested=False))
register_architecture("resenc_unet", _unet_cost(residual=True, nested=False))
register_architecture("unetpp", _unet_cost(residual=False, nested=True))
