"""Cost model of one training iteration for the planner: memory (bytes) and compute (FLOPs, seconds).

The planner only needs two monotone functions of (topology, patch, batch): an estimate of the
training memory, to fit a GPU budget, and of the time per iteration, to fit the CPU preset's time
budget. Both are replaceable: :func:`voxflow.plan.plan_experiment` takes ``memory_estimator=`` and
``time_estimator=`` callables with the signature of :func:`estimate_memory_bytes` and
:func:`estimate_iteration_seconds`.

* Memory: the activation count of :func:`voxflow.nets.activation_elements` (what autograd keeps,
  architecture by architecture, checked against torch by the nets tests) times 2 bytes under AMP or
  4 bytes in fp32, plus 16 bytes per parameter (weights, gradients, two optimiser buffers) and a
  ``workspace_factor`` (default 1.85) for what the count does not see: cuDNN workspaces, allocator
  fragmentation, the fp32 norms under AMP. With it a nnU-Net-like 6-stage 3D U-Net at 128^3 and batch 2
  comes to about 7.7 GiB, so the default preset plans 128^3 for large 1 mm isotropic images at 8 GB,
  as nnU-Net's empirical 8 GB reference does. Not yet checked against a GPU's peak memory.
* Compute: multiply-adds of every conv and transposed conv of the network
  (:func:`conv_flops`, counted layer by layer as :mod:`voxflow.nets` builds it), times 3 for forward
  and backward; seconds = FLOPs / ``flops_per_second``. The default throughput comes from
  ``benchmarks/plan_cpu_iteration.py`` (timed iterations of :func:`voxflow.nets.build_network`
  networks on 2 CPU cores; see :data:`CPU_FLOPS_PER_SECOND`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

from voxflow.plan.schema import NetworkSpec

__all__ = [
    "CPU_FLOPS_PER_SECOND",
    "conv_flops",
    "estimate_iteration_seconds",
    "estimate_memory_bytes",
    "parameter_count",
]

#: Effective training throughput (FLOP/s, one FLOP = one multiply or add) of torch on the 2-core
#: reference CPU, from measured iterations of CPU-preset U-Nets (forward + backward + SGD step):
#: 3-8 GFLOP/s were measured on a heavily shared machine (load ~8 on 2 cores); 6 GFLOP/s is the
#: planning figure. Small 2D networks run below it (per-layer overheads dominate).
CPU_FLOPS_PER_SECOND = 6.0e9
WORKSPACE_FACTOR = 1.85


def _stage_shapes(spec: NetworkSpec, patch_size_vox: Sequence[int]) -> list[tuple[int, ...]]:
    cur = tuple(int(p) for p in list(patch_size_vox)[-spec.spatial_dims:])
    out = []
    for st in spec.strides:
        cur = tuple(max(1, c // s) for c, s in zip(cur, st))
        out.append(cur)
    return out


def _layers(spec: NetworkSpec, in_channels: int, num_outputs: int
            ) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield ``(stage, c_in, c_out, kernel_volume, has_norm)`` for every conv; transposed convs and
    heads included (their output lies on ``stage``'s grid)."""
    f = spec.features_per_stage
    k = [math.prod(ks) for ks in spec.kernel_sizes]
    n = spec.n_stages
    residual = spec.architecture == "resenc_unet"
    c_prev = in_channels
    if residual:
        yield 0, in_channels, f[0], k[0], 1
        c_prev = f[0]
    for s in range(n):
        for b in range(spec.n_blocks_per_stage[s]):
            c_in = c_prev if b == 0 else f[s]
            yield s, c_in, f[s], k[s], 1
            if residual:
                yield s, f[s], f[s], k[s], 1
                if c_in != f[s]:
                    yield s, c_in, f[s], 1, 1
        c_prev = f[s]
    columns = (lambda s: range(1, n - s)) if spec.architecture == "unetpp" else (lambda s: [1])
    for s in range(n - 1):
        n_conv = spec.n_conv_per_stage_decoder[n - 2 - s]
        for j in columns(s):
            yield s, f[s + 1], f[s], math.prod(spec.strides[s + 1]), 0  # transposed conv
            yield s, f[s] * (j + 1), f[s], k[s], 1
            for _ in range(n_conv - 1):
                yield s, f[s], f[s], k[s], 1
    for s in spec.output_stages:
        yield s, f[s], num_outputs, 1, 0  # segmentation heads


@functools.lru_cache(maxsize=4096)
def parameter_count(spec: NetworkSpec, in_channels: int, num_outputs: int) -> int:
    """Parameters of :func:`voxflow.nets.build_network` ``(spec, in_channels, num_outputs)``, counted
    from the spec (conv weights and biases, instance-norm affine parameters)."""
    return sum(ci * co * kv + co + 2 * co * norm for _s, ci, co, kv, norm in _layers(spec, in_channels, num_outputs))


def conv_flops(spec: NetworkSpec, patch_size_vox: Sequence[int], in_channels: int, num_outputs: int) -> int:
    """Forward FLOPs (2 per multiply-add) of the convolutions for one sample."""
    vox = [math.prod(s) for s in _stage_shapes(spec, patch_size_vox)]
    return sum(2 * ci * co * kv * vox[s] for s, ci, co, kv, _n in _layers(spec, in_channels, num_outputs))


def estimate_memory_bytes(spec: NetworkSpec, patch_size_vox: Sequence[int], batch_size: int, in_channels: int,
                          num_outputs: int, *, amp: bool = True, workspace_factor: float = WORKSPACE_FACTOR) -> int:
    """Estimated peak bytes of one training iteration (see the module docstring)."""
    from voxflow.nets import activation_elements

    act = activation_elements(spec, patch_size_vox, in_channels, num_outputs) * batch_size * (2 if amp else 4)
    return int(workspace_factor * act + 16 * parameter_count(spec, in_channels, num_outputs))


def estimate_iteration_seconds(spec: NetworkSpec, patch_size_vox: Sequence[int], batch_size: int,
                               in_channels: int, num_outputs: int, *,
                               flops_per_second: float = CPU_FLOPS_PER_SECOND) -> float:
    """Estimated seconds of one training iteration (forward, backward, step) on the reference CPU."""
    return 3.0 * batch_size * conv_flops(spec, patch_size_vox, in_channels, num_outputs) / flops_per_second
