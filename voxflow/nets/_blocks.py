"""Building blocks shared by the U-Net variants: conv → instance norm → LeakyReLU, residual blocks.

Every block is dimension-agnostic: ``dims`` (2 or 3) selects ``Conv2d``/``Conv3d`` and friends.
Kernel sizes and strides are per-axis tuples in (z, y, x) order (3D) or (y, x) (2D); padding is
``kernel // 2`` so a stride-1 conv keeps the spatial shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ConvNormAct", "ResidualBlock", "StackedConvs", "conv_cls", "transposed_conv_cls"]

NEGATIVE_SLOPE = 0.01


def conv_cls(dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``."""
    return nn.Conv3d if dims == 3 else nn.Conv2d


def transposed_conv_cls(dims: int) -> type[nn.Module]:
    """``nn.ConvTranspose2d`` or ``nn.ConvTranspose3d``."""
    return nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d


def _norm(dims: int, channels: int) -> nn.Module:
    """Instance norm (affine), computed as ``GroupNorm(channels, channels)``.

    Both normalise each sample and channel over the spatial axes with the biased variance, so the
    results agree to float precision and the parameters (``weight``, ``bias``) are the same; PyTorch's
    CPU group-norm kernel is ~3x faster than its instance-norm one (measured: 17 vs 60 ms forward on a
    2x16x20x56x48 batch), which matters for CPU training and inference. ``dims`` is kept for callers.
    """
    return nn.GroupNorm(channels, channels, eps=1e-5, affine=True)


class ConvNormAct(nn.Module):
    """One conv (bias on, as nnU-Net) → instance norm (affine) → optional LeakyReLU(0.01)."""

    def __init__(
        self, dims: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int], *, act: bool = True
    ):
        super().__init__()
        self.conv = conv_cls(dims)(
            in_ch, out_ch, tuple(kernel), tuple(stride), padding=tuple(k // 2 for k in kernel), bias=True
        )
        self.norm = _norm(dims, out_ch)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class StackedConvs(nn.Sequential):
    """``n`` ConvNormAct in a row; only the first one has ``stride`` (strided conv, no pooling)."""

    def __init__(self, dims: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int], n: int):
        layers = [ConvNormAct(dims, in_ch, out_ch, kernel, stride)]
        layers += [ConvNormAct(dims, out_ch, out_ch, kernel, (1,) * dims) for _ in range(n - 1)]
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Basic residual block (ResNet-D style, as nnU-Net's ResEnc presets).

    Two convs (the first strided); the shortcut is average pooling (when strided) then a 1×1 conv
    with norm (when the shape changes), otherwise the identity. LeakyReLU after the sum.
    """

    def __init__(self, dims: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__()
        self.conv1 = ConvNormAct(dims, in_ch, out_ch, kernel, stride)
        self.conv2 = ConvNormAct(dims, out_ch, out_ch, kernel, (1,) * dims, act=False)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            pool = nn.AvgPool3d if dims == 3 else nn.AvgPool2d
            skip.append(pool(tuple(stride), tuple(stride)))  # type: ignore[arg-type]
        if in_ch != out_ch:
            skip.append(ConvNormAct(dims, in_ch, out_ch, (1,) * dims, (1,) * dims, act=False))
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))
