"""Run batches of tiles through one or more networks: mirroring TTA, fold ensembling, AMP on CUDA."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from voxflow.errors import VoxflowError

__all__ = ["TilePredictor", "mirror_combinations"]


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes (0 = z, 1 = y, 2 = x) to flip, the identity first."""
    axes = sorted({int(a) for a in mirror_axes})
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class TilePredictor:
    """Probabilities of a batch of tiles, averaged over networks (folds) and mirrorings.

    Parameters
    ----------
    networks : one or more modules with the same input channels and outputs; each is put in eval
        mode. A list/tuple output (deep supervision) is reduced to its first, full-resolution entry.
    mirror_axes : spatial axes (0 z, 1 y, 2 x) to mirror for test-time augmentation; ``()`` = off.
    activation : ``"softmax"`` over classes, or ``"sigmoid"`` per channel for region datasets.
    spatial_dims : 3, or 2 for 2-D networks (tiles of shape (1, Y, X) are fed as (B, C, Y, X)).
    device : torch device; on CUDA the forward passes run under float16 autocast when ``amp``.
    """

    def __init__(self, networks: nn.Module | Sequence[nn.Module], *, mirror_axes: Sequence[int] = (),
                 activation: str = "softmax", spatial_dims: int = 3, device: str | torch.device = "cpu",
                 amp: bool = True):
        nets = [networks] if isinstance(networks, nn.Module) else list(networks)
        if not nets:
            raise VoxflowError("TilePredictor needs at least one network; got none.")
        if activation not in ("softmax", "sigmoid"):
            raise VoxflowError(f"activation must be 'softmax' or 'sigmoid'; got {activation!r}.")
        if spatial_dims not in (2, 3):
            raise VoxflowError(f"spatial_dims must be 2 or 3; got {spatial_dims!r}.")
        self.device = torch.device(device)
        self.networks = [n.to(self.device).eval() for n in nets]
        self.mirrors = mirror_combinations(mirror_axes)
        self.activation = activation
        self.spatial_dims = spatial_dims
        self.amp = bool(amp) and self.device.type == "cuda"

    def _forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        inp = x[:, :, 0] if self.spatial_dims == 2 else x
        out: Any = net(inp)
        if isinstance(out, (list, tuple)):
            out = out[0]
        out = out.float()
        if self.spatial_dims == 2:
            out = out[:, :, None]
        return torch.softmax(out, 1) if self.activation == "softmax" else torch.sigmoid(out)

    @torch.inference_mode()
    def predict(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) tiles -> (B, K, Z, Y, X) float32 probabilities on ``self.device``."""
        x = torch.as_tensor(tiles).to(self.device, dtype=torch.float32, non_blocking=True)
        if x.ndim != 5:
            raise VoxflowError(f"tiles must be (B, C, Z, Y, X); got shape {tuple(x.shape)}.")
        autocast = (torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext())
        total: torch.Tensor | None = None
        with autocast:
            for net in self.networks:
                for axes in self.mirrors:
                    dims = [a + 2 for a in axes]
                    xi = torch.flip(x, dims) if dims else x
                    p = self._forward(net, xi)
                    p = torch.flip(p, dims) if dims else p
                    total = p if total is None else total + p
        assert total is not None
        return total / (len(self.networks) * len(self.mirrors))

    __call__ = predict
