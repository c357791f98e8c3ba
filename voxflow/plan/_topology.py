"""U-Net topology from spacing and patch size: nnU-Net's ``get_pool_and_conv_props``, in (z, y, x).

Pooling stages are added one at a time. In each, an axis is pooled (stride 2) when its feature map
would still be at least ``min_feature_map`` voxels afterwards (size >= 2 * min) and its current
spacing is less than twice the finest current spacing, so coarse axes wait until pooling the fine
ones has made the voxels roughly isotropic. A stage that would pool a single axis does so only while
that axis has at least 3 * min voxels. An axis gets kernel size 3 from the first stage at which its
spacing is within a factor 2 of the finest, kernel 1 before (the (1, 3, 3) kernels of anisotropic
data); the bottleneck always uses 3. The patch is then padded up to a multiple of the total stride.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Topology", "pool_and_conv_props"]


@dataclass(frozen=True)
class Topology:
    """Strides and kernel sizes per stage (stage 0 first, stride 1), and the padded patch."""

    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    patch_size: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    @property
    def total_stride(self) -> tuple[int, ...]:
        return tuple(math.prod(s[a] for s in self.strides) for a in range(len(self.patch_size)))


def pool_and_conv_props(
    spacing: Sequence[float], patch_size: Sequence[int], *, min_feature_map: int = 4, max_pool_per_axis: int = 999
) -> Topology:
    """Topology for ``spacing`` (mm) and ``patch_size`` (voxels), both per spatial axis."""
    dim = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [int(p) for p in patch_size]
    n_pool = [0] * dim
    kernel = [1] * dim
    strides: list[tuple[int, ...]] = [(1,) * dim]
    kernels: list[tuple[int, ...]] = []
    while True:
        valid = [a for a in range(dim) if cur_size[a] >= 2 * min_feature_map]
        if not valid:
            break
        finest = min(cur_spacing[a] for a in valid)
        valid = [a for a in valid if cur_spacing[a] / finest < 2 and n_pool[a] < max_pool_per_axis]
        if len(valid) == 1 and cur_size[valid[0]] < 3 * min_feature_map:
            break
        if not valid:
            break
        for a in range(dim):
            if kernel[a] != 3 and cur_spacing[a] / min(cur_spacing) < 2:
                kernel[a] = 3
        stride = [1] * dim
        for a in valid:
            stride[a] = 2
            n_pool[a] += 1
            cur_spacing[a] *= 2
            cur_size[a] = math.ceil(cur_size[a] / 2)
        strides.append(tuple(stride))
        kernels.append(tuple(kernel))
    kernels.append((3,) * dim)
    total = [2**n for n in n_pool]
    padded = tuple(math.ceil(int(p) / t) * t for p, t in zip(patch_size, total, strict=True))
    return Topology(strides=tuple(strides), kernel_sizes=tuple(kernels), patch_size=padded)
