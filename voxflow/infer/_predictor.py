"""Run batches of tiles through one or more networks: mirroring TTA, fold ensembling, AMP on CUDA.

:class:`TilePredictor` is the one tile predictor of both model kinds: a batch of (B, C, Z, Y, X)
tiles in, (B, K, Z, Y, X) scores out, averaged over networks and mirrorings. voxflow's models
average probabilities (``activation="softmax"``/``"sigmoid"``); nnU-Net models average logits
(``activation=None``) in the network's own axis order (``axis_order``).
"""

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
    """Scores of a batch of tiles, averaged over networks (folds) and mirrorings.

    Parameters
    ----------
    networks : one or more modules with the same input channels and outputs; each is put in eval
        mode. A list/tuple output (deep supervision) is reduced to its first, full-resolution entry.
    mirror_axes : spatial axes of the tiles (0 z, 1 y, 2 x) to mirror for test-time augmentation;
        ``()`` = off. The mirrorings are summed in the order of the network's axes (``axis_order``).
    activation : ``"softmax"`` over classes, ``"sigmoid"`` per channel for region datasets, or
        ``None``: the networks' raw outputs (logits) are averaged.
    spatial_dims : 3, or 2 for 2-D networks (the network's first spatial axis, of size 1, is dropped).
    device : torch device; on CUDA the forward passes run under float16 autocast when ``amp``.
    axis_order : the network's spatial axes as tile axes (network axis j is tile axis
        ``axis_order[j]``; nnU-Net's ``transpose_forward``); outputs come back in tile order.
    """

    def __init__(self, networks: nn.Module | Sequence[nn.Module], *, mirror_axes: Sequence[int] = (),
                 activation: str | None = "softmax", spatial_dims: int = 3, device: str | torch.device = "cpu",
                 amp: bool = True, axis_order: Sequence[int] = (0, 1, 2)):
        nets = [networks] if isinstance(networks, nn.Module) else list(networks)
        if not nets:
            raise VoxflowError("TilePredictor needs at least one network; got none.")
        if activation not in ("softmax", "sigmoid", None):
            raise VoxflowError(f"activation must be 'softmax', 'sigmoid' or None; got {activation!r}.")
        if spatial_dims not in (2, 3):
            raise VoxflowError(f"spatial_dims must be 2 or 3; got {spatial_dims!r}.")
        order = [int(a) for a in axis_order]
        if sorted(order) != [0, 1, 2]:
            raise VoxflowError(f"axis_order must be a permutation of (0, 1, 2); got {tuple(axis_order)!r}.")
        self.device = torch.device(device)
        self.networks = [n.to(self.device).eval() for n in nets]
        position = {t: j for j, t in enumerate(order)}
        self.mirrors = [tuple(order[j] for j in c) for c in mirror_combinations([position[int(a)] for a in mirror_axes])]
        self.activation = activation
        self.spatial_dims = spatial_dims
        self.amp = bool(amp) and self.device.type == "cuda"
        self.perm = None if order == [0, 1, 2] else [0, 1, *(2 + a for a in order)]
        self.inverse = None if self.perm is None else [int(i) for i in np.argsort(self.perm)]

    def _forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        inp = x if self.perm is None else x.permute(self.perm)
        if self.spatial_dims == 2:
            inp = inp[:, :, 0]
        out: Any = net(inp)
        if isinstance(out, (list, tuple)):
            out = out[0]
        out = out.float()
        if self.spatial_dims == 2:
            out = out[:, :, None]
        if self.inverse is not None:
            out = out.permute(self.inverse)
        if self.activation is None:
            return out
        return torch.softmax(out, 1) if self.activation == "softmax" else torch.sigmoid(out)

    @torch.inference_mode()
    def predict(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) tiles -> (B, K, Z, Y, X) float32 scores on ``self.device``."""
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
        if total is None:
            raise VoxflowError("TilePredictor produced no output; it needs at least one network.")
        out = total / (len(self.networks) * len(self.mirrors))
        return out if self.inverse is None else out.contiguous()

    __call__ = predict
