"""nnU-Net's cascade perturbations of the previous-stage segmentation, as one-hot channels.

Applied per sample after the spatial and intensity transforms, to the one-hot channels of the
previous stage only (nnU-Net v2 ``get_training_transforms`` with ``is_cascaded``):

1. with p 0.4 per sample (``p_previous_binary``), each channel with p 0.5, in a random channel
   order: one of binary dilation, erosion, closing, opening with a ball of radius U(1, 8) voxels;
   voxels a channel gains are removed from the other channels
   (``ApplyRandomBinaryOperatorTransform``);
2. with p 0.2 per sample (``p_previous_remove_component``), each channel with p 0.5, in a random
   order: remove one random connected component (full connectivity) among those covering less
   than 15% of the patch (``RemoveRandomConnectedComponentFromOneHotEncodingTransform``,
   ``fill_with_other_class_p=0``).

Morphology with a Euclidean ball is exact through the distance transform: dilation by radius r
keeps the voxels within distance r of the mask, erosion those farther than r from the
background inside the patch (outside the patch does not erode, like nnU-Net's zero-padded FFT
convolution). nnU-Net's ball for a fractional radius (skimage ``ball(r)`` on a linspace grid) is
approximated by the integer-offset ball of that radius.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage as ndi

from voxflow.errors import ConfigError

if TYPE_CHECKING:
    from voxflow.data.augment import AugmentConfig

__all__ = [
    "OPERATORS",
    "PreviousParams",
    "apply_previous",
    "binary_operator",
    "perturb_sample",
    "sample_previous_params",
]

OPERATORS = ("dilation", "erosion", "closing", "opening")


@dataclass(frozen=True)
class PreviousParams:
    """Random choices of the cascade perturbations of one batch of B samples with K channels.

    ``*_order`` (B, K): the channel order; ``*_on`` (B, K): applied to the channel at that
    position; ``binary_op`` index into :data:`OPERATORS`; ``binary_radius`` in voxels;
    ``component_pick`` U(0, 1) chooses among the eligible components.
    """

    binary_order: np.ndarray
    binary_on: np.ndarray
    binary_op: np.ndarray
    binary_radius: np.ndarray
    component_order: np.ndarray
    component_on: np.ndarray
    component_pick: np.ndarray
    component_max_fraction: float = 0.15

    def any(self) -> np.ndarray:
        """(B,) bool: the samples that are perturbed at all."""
        return np.asarray(self.binary_on.any(axis=1) | self.component_on.any(axis=1), dtype=bool)


def sample_previous_params(
    rng: np.random.Generator, batch_size: int, n_labels: int, cfg: AugmentConfig
) -> PreviousParams:
    """Draw the perturbations of one batch (numpy only)."""
    b, k = batch_size, n_labels
    order = np.stack([rng.permutation(k) for _ in range(b)]) if b else np.zeros((0, k), np.int64)
    on = (rng.random(b) < cfg.p_previous_binary)[:, None] & (rng.random((b, k)) < cfg.p_previous_binary_per_label)
    op = rng.integers(len(OPERATORS), size=(b, k))
    radius = rng.uniform(*cfg.previous_strel_radius_vox, (b, k))
    c_order = np.stack([rng.permutation(k) for _ in range(b)]) if b else np.zeros((0, k), np.int64)
    c_on = (rng.random(b) < cfg.p_previous_remove_component)[:, None] & (
        rng.random((b, k)) < cfg.p_previous_remove_per_label
    )
    return PreviousParams(order, on, op, radius, c_order, c_on, rng.random((b, k)), cfg.previous_component_max_fraction)


def _dilate(x: np.ndarray, r: float) -> np.ndarray:
    if not x.any() or x.all():
        return x.copy()
    dist = np.asarray(ndi.distance_transform_edt(~x))
    return np.asarray(dist <= r, dtype=bool)


def _erode(x: np.ndarray, r: float) -> np.ndarray:
    if not x.any() or x.all():
        return x.copy()
    dist = np.asarray(ndi.distance_transform_edt(x))
    return np.asarray(dist > r, dtype=bool)


def binary_operator(x: np.ndarray, op: str, radius: float) -> np.ndarray:
    """``op`` (one of :data:`OPERATORS`) of the boolean mask ``x`` with a ball of ``radius`` voxels."""
    if op == "dilation":
        return _dilate(x, radius)
    if op == "erosion":
        return _erode(x, radius)
    if op == "closing":
        return _erode(_dilate(x, radius), radius)
    if op == "opening":
        return _dilate(_erode(x, radius), radius)
    raise ConfigError(f"op must be one of {OPERATORS}; got {op!r}. Pick one of those names.")


def _remove_component(x: np.ndarray, pick: float, max_fraction: float) -> np.ndarray:
    lab, n = ndi.label(x, structure=np.ones((3,) * x.ndim, bool))
    if n == 0:
        return x
    sizes = np.bincount(lab.ravel())[1:]
    eligible = np.flatnonzero(sizes < x.size * max_fraction) + 1
    if not len(eligible):
        return x
    return np.asarray(x & (lab != eligible[min(int(pick * len(eligible)), len(eligible) - 1)]), dtype=bool)


def perturb_sample(onehot: np.ndarray, params: PreviousParams, b: int) -> np.ndarray:
    """The perturbed (K, *S) boolean one-hot channels of sample ``b`` (a new array)."""
    x = onehot.astype(bool, copy=True)
    for pos, ch in enumerate(params.binary_order[b]):
        if not params.binary_on[b, pos]:
            continue
        result = binary_operator(x[ch], OPERATORS[int(params.binary_op[b, pos])], float(params.binary_radius[b, pos]))
        added = result & ~x[ch]
        others = [c for c in range(len(x)) if c != ch]
        x[others] &= ~added
        x[ch] = result
    for pos, ch in enumerate(params.component_order[b]):
        if params.component_on[b, pos] and x[ch].any():
            x[ch] = _remove_component(x[ch], float(params.component_pick[b, pos]), params.component_max_fraction)
    return x


def apply_previous(onehot: torch.Tensor, params: PreviousParams | None) -> torch.Tensor:
    """Perturb the (B, K, *S) one-hot channels of the samples ``params`` selects (on the CPU with
    scipy, then back to the tensor's device); the others are left bit-identical."""
    if params is None or not params.any().any():
        return onehot
    out = onehot.clone()
    for b in np.flatnonzero(params.any()):
        x = perturb_sample(onehot[b].detach().cpu().numpy(), params, int(b))
        out[b] = torch.from_numpy(x).to(device=out.device, dtype=out.dtype)
    return out
