"""Training-memory estimate for a planned network: what the planner needs to choose patch and batch.

The estimate counts the activations autograd keeps for the backward pass, architecture by
architecture, from the spec alone (no network is built, so the planner can call it in a loop):

* a ConvNormAct keeps its conv output (for the norm) and its activation output: ``2·c·v``
  elements for ``c`` channels on ``v`` voxels;
* a residual block keeps two ConvNormAct, its sum and its shortcut: about ``5·c·v`` (+ ``2·c·v`` for a
  projection shortcut);
* a decoder node keeps its concatenated input and its ConvNormAct outputs;
* each deep-supervision head keeps its logits, and the loss a softmax and a one-hot of them (``3·K·v``).

The backward pass briefly holds gradients of the two largest maps on top of that. Parameters add
weights, gradients and two optimiser buffers (``4 · 4`` bytes each). The test
``tests/nets/test_memory_estimate.py`` checks the activation part against the bytes autograd
really saves (within 25%).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from voxflow.plan.schema import NetworkSpec

__all__ = ["activation_elements", "estimate_training_memory_bytes", "parameter_count_from_spec"]


def _stage_voxels(spec: NetworkSpec, patch_size_vox: Sequence[int]) -> list[int]:
    patch = list(patch_size_vox)[-spec.spatial_dims:]
    out, cur = [], patch
    for st in spec.strides:
        cur = [max(1, c // s) for c, s in zip(cur, st, strict=True)]
        out.append(math.prod(cur))
    return out


def activation_elements(spec: NetworkSpec, patch_size_vox: Sequence[int], in_channels: int,
                        num_outputs: int) -> int:
    """Elements autograd keeps for one sample (batch 1) in a training forward pass."""
    v = _stage_voxels(spec, patch_size_vox)
    f = spec.features_per_stage
    n = spec.n_stages
    residual = spec.architecture == "resenc_unet"
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
        columns = range(1, n - s) if spec.architecture == "unetpp" else [1]
        for j in columns:
            total += (j + 1) * f[s] * v[s] + 2 * f[s] * v[s] * n_conv
    total += sum(3 * num_outputs * v[s] for s in spec.output_stages)
    largest = sorted((f[s] * v[s] for s in range(n)), reverse=True)
    return total + 2 * largest[0]


def parameter_count_from_spec(spec: NetworkSpec, in_channels: int, num_outputs: int) -> int:
    """Exact number of parameters of :func:`voxflow.nets.build_network` (builds the network on CPU)."""
    from voxflow.nets import build_network, count_parameters

    return count_parameters(build_network(spec, in_channels, num_outputs))


def estimate_training_memory_bytes(spec: NetworkSpec, patch_size_vox: Sequence[int], batch_size: int,
                                   in_channels: int, num_outputs: int, *, bytes_per_element: int = 4,
                                   n_parameters: int | None = None) -> int:
    """Estimated peak bytes of one training step (activations + parameters + optimiser state).

    ``patch_size_vox`` is (z, y, x) (a 2D spec uses its last two entries); ``bytes_per_element``
    4 for fp32, 2 under AMP (the estimate is then slightly low: norms keep fp32).
    ``n_parameters`` defaults to the exact count (building the network once, ~ms for small specs).
    """
    act = activation_elements(spec, patch_size_vox, in_channels, num_outputs) * batch_size * bytes_per_element
    params = n_parameters if n_parameters is not None else parameter_count_from_spec(spec, in_channels, num_outputs)
    return int(act + params * 4 * 4)
