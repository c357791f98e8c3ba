"""Run batches of tiles through one or more networks: mirroring TTA, fold ensembling, mixed precision.

:class:`TilePredictor` is the one tile predictor of both model kinds: a batch of (B, C, Z, Y, X)
tiles in, (B, K, Z, Y, X) scores out, averaged over networks and mirrorings. voxflow's models
average probabilities (``activation="softmax"``/``"sigmoid"``); nnU-Net models average logits
(``activation=None``) in the network's own axis order (``axis_order``).

Mirrored test-time augmentation is batched: the flipped copies of a batch go through the network
together, up to ``max_tiles_per_forward`` tiles per forward pass (fewer, larger passes: on 2 CPU
cores 8 flips of one 40x56x40 tile as one batch of 8 ran several times faster than 8 passes of one;
``benchmarks/tta_batching.py``). The sum over mirrorings keeps its order, so the scores equal the
one-flip-at-a-time loop's up to the rounding of batched convolutions.

On the CPU the networks and their inputs are channels-last (``memory_format="auto"``): oneDNN's
convolutions then skip the reorders to and from its blocked layout; the forward of nnU-Net's 32-256
hippocampus network (8 flips of a 40x56x40 tile in one pass) ran 1.3-1.4x faster, of the 8-64 CPU-preset network
1.2x, the scores equal up to float32 rounding (``benchmarks/tta_batching.py``, 2 threads).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from voxflow.errors import VoxflowError
from voxflow.precision import autocast_for, resolve_precision

__all__ = ["MEMORY_FORMATS", "TilePredictor", "mirror_combinations", "resolve_memory_format"]

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def resolve_memory_format(memory_format: str, device: torch.device) -> str:
    """``channels_last`` or ``contiguous``: ``auto`` is channels-last on the CPU (measured faster
    there) and contiguous elsewhere (cuDNN's channels-last 3-D kernels were not measured here)."""
    if memory_format not in MEMORY_FORMATS:
        raise VoxflowError(f"memory_format must be one of {MEMORY_FORMATS}; got {memory_format!r}.")
    if memory_format == "auto":
        return "channels_last" if device.type == "cpu" else "contiguous"
    return memory_format


def _torch_format(memory_format: str, ndim: int) -> torch.memory_format:
    """The torch layout of ``memory_format`` for (N, C, spatial...) tensors of ``ndim`` dimensions."""
    if memory_format != "channels_last" or ndim not in (4, 5):
        return torch.contiguous_format
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def _layout(tensor: torch.Tensor, memory_format: str) -> torch.Tensor:
    """``tensor`` (N, C, spatial...) channels-last for ``channels_last`` (a copy only if its layout
    differs); otherwise as it is."""
    if memory_format != "channels_last":
        return tensor
    return tensor.contiguous(memory_format=_torch_format(memory_format, tensor.ndim))


def _layout_module(net: nn.Module, memory_format: str, spatial_dims: int) -> nn.Module:
    """``net`` with its convolution weights in ``memory_format`` (in place, as ``Module.to`` does: a
    network shared by two predictors has the layout of the last one made)."""
    module: Any = net  # Module.to takes memory_format (torch documents it; its typing overloads do not)
    converted: nn.Module = module.to(memory_format=_torch_format(memory_format, spatial_dims + 2))
    return converted


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
    device : torch device.
    amp : with ``precision="auto"``: False means fp32 (the older switch).
    precision : ``fp32``, ``bf16``, ``fp16`` (CUDA) or ``auto`` (:func:`voxflow.precision.resolve_precision`:
        bf16 or fp16 autocast on CUDA; on the CPU bf16 with native AVX512-BF16/AMX, else fp32); the
        scores are summed in float32.
    axis_order : the network's spatial axes as tile axes (network axis j is tile axis
        ``axis_order[j]``; nnU-Net's ``transpose_forward``); outputs come back in tile order.
    max_tiles_per_forward : most tiles (batch x mirrorings) in one forward pass; ``None``: as many
        as fit ``forward_bytes`` (:meth:`configure`) at ``voxel_bytes``, or without ``voxel_bytes`` a
        whole batch with all its mirrorings at once. A whole batch (one mirroring) always goes.
    voxel_bytes : forward-pass memory per tile voxel (:func:`~voxflow.infer.forward_bytes_per_voxel`).
    divisor_zyx : what the network's input axes (tile order z, y, x) must be divisible by (its total
        stride); needed for whole-image tiles.
    memory_format : ``auto`` (channels-last on the CPU, contiguous elsewhere), ``channels_last`` or
        ``contiguous``: the layout of the networks' weights and inputs (:func:`resolve_memory_format`);
        the networks are converted in place.
    """

    def __init__(
        self,
        networks: nn.Module | Sequence[nn.Module],
        *,
        mirror_axes: Sequence[int] = (),
        activation: str | None = "softmax",
        spatial_dims: int = 3,
        device: str | torch.device = "cpu",
        amp: bool = True,
        axis_order: Sequence[int] = (0, 1, 2),
        precision: str = "auto",
        max_tiles_per_forward: int | None = None,
        voxel_bytes: float | None = None,
        divisor_zyx: Sequence[int] | None = None,
        memory_format: str = "auto",
    ):
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
        self.memory_format = resolve_memory_format(memory_format, self.device)
        self.networks = [_layout_module(n.to(self.device), self.memory_format, spatial_dims).eval() for n in nets]
        position = {t: j for j, t in enumerate(order)}
        self.mirrors = [
            tuple(order[j] for j in c) for c in mirror_combinations([position[int(a)] for a in mirror_axes])
        ]
        self.activation = activation
        self.spatial_dims = spatial_dims
        self._amp_switch = bool(amp)
        from voxflow.infer._memory import DEFAULT_FORWARD_BYTES

        self.voxel_bytes = voxel_bytes
        self.divisor_zyx = None if divisor_zyx is None else tuple(int(d) for d in divisor_zyx)
        self.forward_bytes = DEFAULT_FORWARD_BYTES
        self.precision = resolve_precision(precision, self.device, amp=self._amp_switch)
        if max_tiles_per_forward is not None and max_tiles_per_forward < 1:
            raise VoxflowError(f"max_tiles_per_forward must be at least 1 or None; got {max_tiles_per_forward!r}.")
        self.max_tiles_per_forward = max_tiles_per_forward
        self.perm = None if order == [0, 1, 2] else [0, 1, *(2 + a for a in order)]
        self.inverse = None if self.perm is None else [int(i) for i in np.argsort(self.perm)]

    def _forward(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        inp = x if self.perm is None else x.permute(self.perm)
        if self.spatial_dims == 2:
            inp = inp[:, :, 0]
        out: Any = net(_layout(inp, self.memory_format))
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

    @property
    def amp(self) -> bool:
        """Whether the forward passes run under autocast (bf16 or fp16)."""
        return self.precision != "fp32"

    def configure(self, *, precision: str | None = None, forward_bytes: int | None = None) -> TilePredictor:
        """Set the precision (resolved on this device; ``auto`` honours ``amp``) and the memory of one
        forward pass (bytes). Returns self."""
        if precision is not None:
            self.precision = resolve_precision(precision, self.device, amp=self._amp_switch)
        if forward_bytes is not None:
            self.forward_bytes = int(forward_bytes)
        return self

    def max_tile_voxels(self) -> int | None:
        """The largest tile (voxels) one forward pass holds within ``forward_bytes``; None if unknown."""
        return None if self.voxel_bytes is None else int(self.forward_bytes / max(self.voxel_bytes, 1e-9))

    def tiles_per_forward(self, tile_voxels: int) -> int | None:
        """Tiles of ``tile_voxels`` per forward pass: ``max_tiles_per_forward``, or what fits
        ``forward_bytes`` (at least 1), or None (no limit known)."""
        if self.max_tiles_per_forward is not None:
            return self.max_tiles_per_forward
        most = self.max_tile_voxels()
        return None if most is None else max(1, most // max(int(tile_voxels), 1))

    def mirror_groups(self, batch: int, tile_voxels: int = 1) -> list[list[tuple[int, ...]]]:
        """The mirrorings in forward passes: as many per pass as :meth:`tiles_per_forward` allows for
        ``batch`` tiles of ``tile_voxels`` (at least one), in order."""
        most = self.tiles_per_forward(tile_voxels)
        per = len(self.mirrors) if most is None else max(1, most // batch)
        return [self.mirrors[i : i + per] for i in range(0, len(self.mirrors), per)]

    def _mirrored_sum(
        self, net: nn.Module, x: torch.Tensor, group: list[tuple[int, ...]], total: torch.Tensor | None
    ) -> torch.Tensor:
        """``total`` plus the scores of every mirroring in ``group`` (one forward pass), in order."""
        flips = [[a + 2 for a in axes] for axes in group]
        batch = (
            torch.cat([torch.flip(x, d) if d else x for d in flips])
            if len(group) > 1
            else (torch.flip(x, flips[0]) if flips[0] else x)
        )
        out = self._forward(net, batch)
        for p, d in zip(out.split(x.shape[0]), flips, strict=True):
            p = torch.flip(p, d) if d else p
            total = p if total is None else total + p
        if total is None:
            raise VoxflowError("TilePredictor produced no output; it needs at least one mirroring.")
        return total

    @torch.inference_mode()
    def predict(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, C, Z, Y, X) tiles -> (B, K, Z, Y, X) float32 scores on ``self.device``."""
        x = torch.as_tensor(tiles).to(self.device, dtype=torch.float32, non_blocking=True)
        if x.ndim != 5:
            raise VoxflowError(f"tiles must be (B, C, Z, Y, X); got shape {tuple(x.shape)}.")
        total: torch.Tensor | None = None
        groups = self.mirror_groups(int(x.shape[0]), int(np.prod(x.shape[2:])))
        with autocast_for(self.device, self.precision):
            for net in self.networks:
                for group in groups:
                    total = self._mirrored_sum(net, x, group, total)
        if total is None:
            raise VoxflowError("TilePredictor produced no output; it needs at least one network.")
        n = len(self.networks) * len(self.mirrors)
        if n > 1:  # a sum of n >= 2 passes: a buffer of its own, divided in place (one batch of scores less)
            total.div_(n)
        return total.contiguous()

    __call__ = predict

    #: :meth:`predict` returns a tensor computed from the tiles, never a buffer kept between calls (at
    #: most a view of the tiles, for a network that returns its input), so the sliding window, which owns
    #: its tiles, weights it in place (:func:`~voxflow.infer._sliding.weighted_batches`)
    fresh_output = True
