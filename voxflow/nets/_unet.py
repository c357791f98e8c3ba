"""U-Net architectures built from a :class:`~voxflow.plan.schema.NetworkSpec`.

* ``unet`` — plain conv U-Net (nnU-Net's ``PlainConvUNet``): per stage ``n_blocks_per_stage[s]``
  ConvNormAct, the first one strided (no pooling layers).
* ``resenc_unet`` — residual encoder (nnU-Net's ``ResidualEncoderUNet``): a stem conv, then
  ``n_blocks_per_stage[s]`` residual blocks per stage, the first strided; plain-conv decoder.
* ``unetpp`` — U-Net++: nested, densely connected skip pathways; node (i, j) at stage ``i`` sees all
  earlier nodes of its stage and the upsampled node (i+1, j-1).

Decoders upsample with transposed convs (kernel = stride) and concatenate the skip. Decoder
stage counts follow nnU-Net: ``n_conv_per_stage_decoder[0]`` is the deepest decoder stage. With
deep supervision (``spec.deep_supervision`` and ``module.deep_supervision`` true) a training-mode
forward returns one logit tensor per supervised decoder stage (``spec.output_stages``: every
decoder stage but the lowest-resolution one, whose nnU-Net loss weight is 0 and which is therefore
not built), full resolution first (scales as :func:`voxflow.nets.deep_supervision_scales`);
otherwise one tensor (B, K, *spatial). Every parameter takes part in every training forward, so
DDP needs no ``find_unused_parameters``.
"""

from __future__ import annotations

import torch
from torch import nn

from voxflow.nets._blocks import ConvNormAct, ResidualBlock, StackedConvs, conv_cls, transposed_conv_cls
from voxflow.plan.schema import NetworkSpec

__all__ = ["NestedUNet", "UNet"]


def _encoder_stage(spec: NetworkSpec, s: int, in_ch: int, residual: bool) -> nn.Module:
    dims, f, k, st, n = (
        spec.spatial_dims,
        spec.features_per_stage[s],
        spec.kernel_sizes[s],
        spec.strides[s],
        spec.n_blocks_per_stage[s],
    )
    if not residual:
        return StackedConvs(dims, in_ch, f, k, st, n)
    blocks = [ResidualBlock(dims, in_ch, f, k, st)]
    blocks += [ResidualBlock(dims, f, f, k, (1,) * dims) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class _Encoder(nn.Module):
    """Returns the feature map of every stage, full resolution first."""

    def __init__(self, spec: NetworkSpec, in_channels: int, *, residual: bool):
        super().__init__()
        f = spec.features_per_stage
        self.stem = (
            ConvNormAct(spec.spatial_dims, in_channels, f[0], spec.kernel_sizes[0], (1,) * spec.spatial_dims)
            if residual
            else nn.Identity()
        )
        first_in = f[0] if residual else in_channels
        self.stages = nn.ModuleList(
            _encoder_stage(spec, s, first_in if s == 0 else f[s - 1], residual) for s in range(spec.n_stages)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


def _up(spec: NetworkSpec, s: int) -> nn.Module:
    """Transposed conv from stage ``s + 1`` to stage ``s`` (kernel = stride of stage s + 1)."""
    st = spec.strides[s + 1]
    f = spec.features_per_stage
    return transposed_conv_cls(spec.spatial_dims)(f[s + 1], f[s], st, st, bias=True)


def _dec_convs(spec: NetworkSpec, s: int, in_ch: int) -> nn.Module:
    n = spec.n_conv_per_stage_decoder[spec.n_stages - 2 - s]
    return StackedConvs(
        spec.spatial_dims, in_ch, spec.features_per_stage[s], spec.kernel_sizes[s], (1,) * spec.spatial_dims, n
    )


def _head(spec: NetworkSpec, s: int, num_outputs: int) -> nn.Module:
    return conv_cls(spec.spatial_dims)(spec.features_per_stage[s], num_outputs, 1, 1, bias=True)


class _SegmentationNet(nn.Module):
    """Shared deep-supervision switch and output selection."""

    deep_supervision: bool
    heads: nn.ModuleList

    def _outputs(self, decoded: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """``decoded[s]`` is the decoder feature map at stage s (full resolution first)."""
        if self.deep_supervision and self.training:
            return [head(decoded[s]) for s, head in enumerate(self.heads)]
        return self.heads[0](decoded[0])


class UNet(_SegmentationNet):
    """Plain (``residual=False``) or residual-encoder U-Net; see the module docstring."""

    def __init__(self, spec: NetworkSpec, in_channels: int, num_outputs: int, *, residual: bool = False):
        super().__init__()
        n = spec.n_stages
        f = spec.features_per_stage
        self.deep_supervision = spec.deep_supervision
        self.encoder = _Encoder(spec, in_channels, residual=residual)
        self.ups = nn.ModuleList(_up(spec, s) for s in range(n - 1))
        self.decoders = nn.ModuleList(_dec_convs(spec, s, 2 * f[s]) for s in range(n - 1))
        self.heads = nn.ModuleList(_head(spec, s, num_outputs) for s in spec.output_stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = self.encoder(x)
        y = skips[-1]
        decoded: list[torch.Tensor] = []
        for s in range(len(skips) - 2, -1, -1):
            y = self.decoders[s](torch.cat([self.ups[s](y), skips[s]], dim=1))
            decoded.append(y)
        decoded = decoded[::-1] or [y]
        return self._outputs(decoded)


class NestedUNet(_SegmentationNet):
    """U-Net++ (Zhou et al. 2018) with the plain-conv encoder; deep supervision on the last node of
    every stage (so its outputs have the same scales as :class:`UNet`)."""

    def __init__(self, spec: NetworkSpec, in_channels: int, num_outputs: int):
        super().__init__()
        n = spec.n_stages
        f = spec.features_per_stage
        self.deep_supervision = spec.deep_supervision
        self.encoder = _Encoder(spec, in_channels, residual=False)
        # node (i, j), j >= 1, i + j <= n - 1: keys "i_j"
        self.ups = nn.ModuleDict()
        self.nodes = nn.ModuleDict()
        for j in range(1, n):
            for i in range(n - j):
                self.ups[f"{i}_{j}"] = _up(spec, i)
                self.nodes[f"{i}_{j}"] = _dec_convs(spec, i, f[i] * (j + 1))
        self.heads = nn.ModuleList(_head(spec, s, num_outputs) for s in spec.output_stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        enc = self.encoder(x)
        n = len(enc)
        grid: list[list[torch.Tensor]] = [[e] for e in enc]
        for j in range(1, n):
            for i in range(n - j):
                up = self.ups[f"{i}_{j}"](grid[i + 1][j - 1])
                grid[i].append(self.nodes[f"{i}_{j}"](torch.cat([*grid[i], up], dim=1)))
        decoded = [grid[i][n - 1 - i] for i in range(max(n - 1, 1))]
        return self._outputs(decoded)
