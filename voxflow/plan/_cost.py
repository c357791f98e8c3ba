"""Cost model of one training iteration for the planner: memory (bytes) and compute (FLOPs, seconds).

The planner only needs two monotone functions of (topology, patch, batch): an estimate of the
training memory, to fit a GPU budget, and of the time per iteration, to fit the CPU preset's time
budget. Both are replaceable: :func:`voxflow.plan.plan_experiment` takes ``memory_estimator=`` and
``time_estimator=`` callables with the signature of :func:`estimate_memory_bytes` and
:func:`estimate_iteration_seconds`.

* Memory: :func:`voxflow.architectures.estimate_training_memory_bytes` -- the activation count of the
  architecture's cost model (what autograd keeps, checked against torch by the nets tests) times 2
  bytes under AMP or 4 bytes in fp32, times a ``workspace_factor`` (default 1.85) for what the count
  does not see (cuDNN workspaces, allocator fragmentation, the fp32 norms under AMP), plus 16 bytes
  per parameter (weights, gradients, two optimiser buffers). With it a nnU-Net-like 6-stage 3D U-Net
  at 128^3 and batch 2 comes to about 7.7 GiB, so the default preset plans 128^3 for large 1 mm
  isotropic images at 8 GB, as nnU-Net's empirical 8 GB reference does. Not yet checked against a
  GPU's peak memory.
* Compute: multiply-adds of every conv and transposed conv of the network
  (:func:`voxflow.architectures.conv_flops`, the cost model's layer list), times 3 for forward
  and backward; seconds = FLOPs / ``flops_per_second``. The default throughput comes from
  ``benchmarks/plan_cpu_iteration.py`` (timed iterations of :func:`voxflow.nets.build_network`
  networks on 2 CPU cores; see :data:`CPU_FLOPS_PER_SECOND`).

Cost models come from :mod:`voxflow.architectures` by ``spec.architecture``; nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from voxflow.architectures import conv_flops, estimate_training_memory_bytes, parameter_count
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


def estimate_memory_bytes(
    spec: NetworkSpec,
    patch_size_vox: Sequence[int],
    batch_size: int,
    in_channels: int,
    num_outputs: int,
    *,
    amp: bool = True,
    workspace_factor: float = WORKSPACE_FACTOR,
) -> int:
    """Estimated peak bytes of one training iteration (see the module docstring)."""
    return estimate_training_memory_bytes(
        spec,
        patch_size_vox,
        batch_size,
        in_channels,
        num_outputs,
        bytes_per_element=2 if amp else 4,
        workspace_factor=workspace_factor,
    )


def estimate_iteration_seconds(
    spec: NetworkSpec,
    patch_size_vox: Sequence[int],
    batch_size: int,
    in_channels: int,
    num_outputs: int,
    *,
    flops_per_second: float = CPU_FLOPS_PER_SECOND,
) -> float:
    """Estimated seconds of one training iteration (forward, backward, step) on the reference CPU."""
    return 3.0 * batch_size * conv_flops(spec, patch_size_vox, in_channels, num_outputs) / flops_per_second
