"""The torch kernels behind :func:`voxflow.data.augment.apply` (batched, on the batch's device).

Each function takes the (B, C, *S) image (and, for spatial ones, the (B, 1, *S) label) plus the
batch's :class:`~voxflow.data.augment.Params` and touches only the samples (or sample/channel
pairs) whose parameters are not neutral, so neutral parameters leave values bit-identical.
After :func:`apply_spatial` the tensors are fresh copies that the later steps update in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as nnf

if TYPE_CHECKING:
    from voxflow.data.augment import Params

__all__ = [
    "apply_blur", "apply_brightness", "apply_contrast", "apply_gamma", "apply_lowres", "apply_mirror",
    "apply_noise", "apply_spatial", "centre_crop", "downsample_targets", "gaussian_blur",
]


def _index(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(mask), dtype=torch.long, device=device)


def centre_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Centre crop of the trailing ``len(size)`` axes (offset ``(P - F) // 2``), a view."""
    lead = x.ndim - len(size)
    sl = tuple(slice((p - f) // 2, (p - f) // 2 + f) for p, f in zip(x.shape[lead:], size))
    return x[(slice(None),) * lead + sl]


def _sampling_grid(params: Params, sel: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int],
                   device: torch.device) -> torch.Tensor:
    """grid_sample grid (n, *F, D) in (x, y, z) order, normalised with align_corners=True."""
    offs = torch.meshgrid(*[torch.arange(f, device=device, dtype=torch.float32) - (f - 1) / 2 for f in out_shape],
                          indexing="ij")
    offs_t = torch.stack(offs, dim=-1)
    mats = torch.as_tensor(params.matrix[sel], dtype=torch.float32, device=device)
    coords = torch.einsum("nij,...j->n...i", mats, offs_t)
    if params.elastic is not None:
        coarse = torch.as_tensor(params.elastic[sel], dtype=torch.float32, device=device)
        mode = "trilinear" if len(out_shape) == 3 else "bilinear"
        disp = nnf.interpolate(coarse, size=tuple(out_shape), mode=mode, align_corners=True)
        coords = coords + disp.movedim(1, -1)
    scale = torch.tensor([2.0 / (p - 1) if p > 1 else 0.0 for p in in_shape], device=device)
    return (coords * scale).flip(-1)


def apply_spatial(image: torch.Tensor, label: torch.Tensor | None, params: Params,
                  patch_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotation/scaling/elastic as one ``grid_sample`` over the transformed samples, centre crop
    for the others. Image: linear; label: nearest; outside the input patch: 0."""
    out_img = centre_crop(image, patch_size).clone(memory_format=torch.contiguous_format)
    out_lab = None if label is None else centre_crop(label, patch_size).clone(memory_format=torch.contiguous_format)
    if not params.spatial.any():
        return out_img, out_lab
    sel = np.flatnonzero(params.spatial)
    idx = torch.as_tensor(sel, dtype=torch.long, device=image.device)
    grid = _sampling_grid(params, sel, image.shape[2:], patch_size, image.device)
    out_img[idx] = nnf.grid_sample(image[idx].float(), grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=True).to(out_img.dtype)
    if label is not None and out_lab is not None:
        lab = nnf.grid_sample(label[idx].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)
        out_lab[idx] = lab.round().to(out_lab.dtype)
    return out_img, out_lab


def apply_noise(image: torch.Tensor, params: Params) -> torch.Tensor:
    """Add N(0, noise_std^2) to every channel of the selected samples (noise from ``noise_seed``)."""
    if not (params.noise_std > 0).any():
        return image
    idx = _index(params.noise_std > 0, image.device)
    gen = torch.Generator(device=image.device).manual_seed(params.noise_seed % (2**63))
    noise = torch.randn((len(idx), *image.shape[1:]), generator=gen, device=image.device, dtype=image.dtype)
    std = torch.as_tensor(params.noise_std[params.noise_std > 0], dtype=image.dtype, device=image.device)
    image[idx] = image[idx] + noise * std.reshape((-1,) + (1,) * (image.ndim - 1))
    return image


def _symmetric_pad(x: torch.Tensor, axis: int, r: int) -> torch.Tensor:
    """Pad ``axis`` by ``r`` on both sides like scipy's mode='reflect' (edge repeated); exact for
    ``r <= size``, edge-clamped beyond."""
    n = x.shape[axis]
    left = torch.arange(r - 1, -1, -1, device=x.device).clamp(max=n - 1)
    right = torch.arange(n - 1, n - 1 - r, -1, device=x.device).clamp(min=0)
    return x.index_select(axis, torch.cat([left, torch.arange(n, device=x.device), right]))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, *, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of each of ``n`` volumes ``x`` (n, *S) with its own ``sigma`` (n,) in
    voxels, equal to ``scipy.ndimage.gaussian_filter(..., mode='reflect', truncate=4)`` per volume."""
    n, spatial = x.shape[0], x.shape[1:]
    radius = int(truncate * float(sigma.max()) + 0.5)
    if radius == 0:
        return x
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    own = (truncate * sigma + 0.5).floor().to(x.dtype)[:, None]
    kern = torch.exp(-0.5 * (taps[None] / sigma[:, None].to(x.dtype)) ** 2) * (taps.abs()[None] <= own)
    kern = kern / kern.sum(dim=1, keepdim=True)
    conv = nnf.conv3d if len(spatial) == 3 else nnf.conv2d
    out = x.unsqueeze(0)
    for a in range(len(spatial)):
        shape = [n, 1] + [1] * len(spatial)
        shape[2 + a] = 2 * radius + 1
        padded = _symmetric_pad(out, 2 + a, radius)
        out = conv(padded, kern.reshape(shape), groups=n)
    return out.squeeze(0)


def apply_blur(image: torch.Tensor, params: Params) -> torch.Tensor:
    """Gaussian-blur the selected (sample, channel) pairs with their own sigma."""
    on = params.blur_sigma > 0
    if not on.any():
        return image
    b, c = (torch.as_tensor(v, device=image.device) for v in np.nonzero(on))
    sigma = torch.as_tensor(params.blur_sigma[on], dtype=image.dtype, device=image.device)
    image[b, c] = gaussian_blur(image[b, c], sigma)
    return image


def apply_brightness(image: torch.Tensor, params: Params) -> torch.Tensor:
    """Multiply the selected channels by their brightness factor."""
    on = params.brightness != 1
    if not on.any():
        return image
    b, c = (torch.as_tensor(v, device=image.device) for v in np.nonzero(on))
    f = torch.as_tensor(params.brightness[on], dtype=image.dtype, device=image.device)
    image[b, c] = image[b, c] * f.reshape((-1,) + (1,) * (image.ndim - 2))
    return image


def apply_contrast(image: torch.Tensor, params: Params) -> torch.Tensor:
    """``(x - mean) * f + mean`` per selected channel, clipped to the channel's former range."""
    on = params.contrast != 1
    if not on.any():
        return image
    b, c = (torch.as_tensor(v, device=image.device) for v in np.nonzero(on))
    x = image[b, c]
    flat = x.reshape(len(x), -1)
    shape = (-1,) + (1,) * (x.ndim - 1)
    mean, lo, hi = (v.reshape(shape) for v in (flat.mean(1), flat.amin(1), flat.amax(1)))
    f = torch.as_tensor(params.contrast[on], dtype=image.dtype, device=image.device).reshape(shape)
    image[b, c] = torch.minimum(torch.maximum((x - mean) * f + mean, lo), hi)
    return image


def apply_lowres(image: torch.Tensor, params: Params) -> torch.Tensor:
    """Nearest downsampling to ``zoom`` of the size, then linear upsampling, per selected channel."""
    spatial = tuple(image.shape[2:])
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    for b, c in zip(*np.nonzero(params.lowres_zoom != 1)):
        zoom = float(params.lowres_zoom[b, c])
        small = tuple(max(1, round(s * zoom)) for s in spatial)
        x = nnf.interpolate(image[b, c][None, None], size=small, mode="nearest")
        image[b, c] = nnf.interpolate(x, size=spatial, mode=mode, align_corners=False)[0, 0]
    return image


def apply_gamma(image: torch.Tensor, gamma: np.ndarray, *, invert: bool) -> torch.Tensor:
    """batchgenerators' gamma with retained mean/std over all channels of each selected sample."""
    on = gamma != 1
    if not on.any():
        return image
    idx = _index(on, image.device)
    x = image[idx]
    flat = x.reshape(len(x), -1).double()
    if invert:
        flat = -flat
    mean, sd = flat.mean(1, keepdim=True), flat.std(1, unbiased=False, keepdim=True)
    lo = flat.amin(1, keepdim=True)
    rng = flat.amax(1, keepdim=True) - lo + 1e-7
    g = torch.as_tensor(gamma[on], dtype=flat.dtype, device=image.device)[:, None]
    flat = ((flat - lo) / rng).clamp(min=0) ** g * rng + lo
    flat = flat - flat.mean(1, keepdim=True)
    flat = flat / (flat.std(1, unbiased=False, keepdim=True) + 1e-8) * sd + mean
    if invert:
        flat = -flat
    image[idx] = flat.reshape(x.shape).to(image.dtype)
    return image


def apply_mirror(image: torch.Tensor, label: torch.Tensor | None,
                 params: Params) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip spatial axis ``a`` of the samples with ``mirror[:, a]``, image and label alike."""
    for a in range(params.mirror.shape[1]):
        if not params.mirror[:, a].any():
            continue
        idx = _index(params.mirror[:, a], image.device)
        image[idx] = image[idx].flip(2 + a)
        if label is not None:
            label[idx] = label[idx].flip(2 + a)
    return image, label


def downsample_targets(label: torch.Tensor, ds_scales: Sequence[Sequence[float]] | None) -> list[torch.Tensor]:
    """One int64 (B, 1, *S_k) target per deep supervision scale, nearest-exact from the full label."""
    full = label.long()
    if not ds_scales:
        return [full]
    spatial = label.shape[2:]
    out = []
    for scale in ds_scales:
        size = tuple(max(1, round(s * f)) for s, f in zip(spatial, scale))
        if size == tuple(spatial):
            out.append(full)
        else:
            out.append(nnf.interpolate(label.float(), size=size, mode="nearest-exact").long())
    return out
