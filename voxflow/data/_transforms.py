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
    "apply_blur",
    "apply_brightness",
    "apply_contrast",
    "apply_gamma",
    "apply_lowres",
    "apply_noise",
    "apply_spatial",
    "centre_crop",
    "downsample_targets",
    "gaussian_blur",
    "input_footprint",
]


def _index(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(mask), dtype=torch.long, device=device)


def centre_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Centre crop of the trailing ``len(size)`` axes (offset ``(P - F) // 2``), a view."""
    lead = x.ndim - len(size)
    sl = tuple(slice((p - f) // 2, (p - f) // 2 + f) for p, f in zip(x.shape[lead:], size, strict=True))
    return x[(slice(None),) * lead + sl]


def _sampling_grid(
    params: Params, sel: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int], device: torch.device
) -> torch.Tensor:
    """grid_sample grid (n, *F, D) in (x, y, z) order, normalised with align_corners=True.

    Output voxel offset ``o`` from the output centre maps to input offset ``M @ o`` (+ elastic
    displacement) from the input centre; both in voxels, (z, y, x).
    """
    d = len(out_shape)
    signs = np.where(params.mirror[sel], -1.0, 1.0)  # mirroring the output = negating its offset axis
    mats = np.asarray(params.matrix[sel], dtype=np.float64) * signs[:, None, :]
    to_norm = np.array([2.0 / (p - 1) if p > 1 else 0.0 for p in in_shape])
    from_norm = np.array([(f - 1) / 2.0 for f in out_shape])
    theta = to_norm[None, :, None] * mats * from_norm[None, None, :]
    theta = torch.as_tensor(theta[:, ::-1, ::-1].copy(), dtype=torch.float32, device=device)  # -> (x, y, z)
    # grid[n, *o] = sum_j base_j(o_j) * theta[n, :, j]: three broadcast adds, cheaper than affine_grid
    terms = []
    for j, f in enumerate(out_shape):  # j indexes output axes in (z, y, x); its column in theta is d-1-j
        base = torch.linspace(-1.0, 1.0, f, device=device) if f > 1 else torch.zeros(1, device=device)
        view = [1] * (d + 2)
        view[1 + j] = f
        terms.append(base.view(view) * theta[:, :, d - 1 - j].reshape(len(sel), *([1] * d), d))
    head = terms[0]
    for term in terms[1:-1]:  # small: every axis but the last
        head = head + term
    grid = torch.empty((len(sel), *out_shape, d), dtype=torch.float32, device=device)
    torch.add(head, terms[-1], out=grid)  # broadcast: one pass writes the full grid
    if params.elastic is not None:
        coarse = torch.as_tensor(params.elastic[sel], dtype=torch.float32, device=device)
        mode = "trilinear" if d == 3 else "bilinear"
        disp = nnf.interpolate(coarse, size=tuple(out_shape), mode=mode, align_corners=True)
        scale = torch.as_tensor(to_norm, dtype=torch.float32, device=device)
        grid = grid + (disp.movedim(1, -1) * scale).flip(-1)
    return grid


def apply_spatial(
    image: torch.Tensor,
    label: torch.Tensor | None,
    params: Params,
    patch_size: Sequence[int],
    *,
    spatial_input: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotation/scaling/elastic as one ``grid_sample`` over the transformed samples, centre crop
    for the others. Image: linear; label: nearest; outside the input patch: 0. Mirroring is done
    here too: folded into the sampling matrix of transformed samples (free), a flip of the crop
    for the others.

    With ``spatial_input = (image_s, label_s)``, the transformed samples are read from those
    tensors (n_spatial, C, *P') instead (each centred on its patch), and ``image``/``label`` may
    already have the final size.
    """
    out_img = centre_crop(image, patch_size).clone(memory_format=torch.contiguous_format)
    out_lab = None if label is None else centre_crop(label, patch_size).clone(memory_format=torch.contiguous_format)
    _mirror_plain(out_img, out_lab, params)
    if not params.spatial.any():
        return out_img, out_lab
    sel = np.flatnonzero(params.spatial)
    idx = torch.as_tensor(sel, dtype=torch.long, device=image.device)
    if spatial_input is None:
        src_img, src_lab = image[idx], None if label is None else label[idx]
    else:
        src_img, src_lab = spatial_input
    grid = _sampling_grid(params, sel, src_img.shape[2:], patch_size, image.device)
    out_img[idx] = nnf.grid_sample(src_img.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True).to(
        out_img.dtype
    )
    if src_lab is not None and out_lab is not None:
        lab = nnf.grid_sample(src_lab.float(), grid, mode="nearest", padding_mode="zeros", align_corners=True)
        out_lab[idx] = lab.to(out_lab.dtype)
    return out_img, out_lab


def input_footprint(params: Params, patch_size: Sequence[int], max_size: Sequence[int]) -> np.ndarray:
    """(B, D) size of the centred input box each sample's output actually reads, capped at ``max_size``.

    Non-transformed samples need the final ``patch_size``; transformed ones the extent of the
    mapped output box plus one voxel for linear interpolation (plus the largest elastic
    displacement). Sizes keep the parity of ``patch_size`` so boxes stay exactly centred. Reading
    just this box gives the same result as reading the whole ``max_size`` patch.
    """
    final = np.asarray(patch_size, dtype=np.int64)
    cap = np.asarray(max_size, dtype=np.int64)
    half = (final - 1) / 2.0
    extent = np.abs(params.matrix) @ half  # (B, D) half-extent of the mapped box
    if params.elastic is not None:
        extent = extent + np.abs(params.elastic).reshape(len(extent), len(final), -1).max(-1)
    need = 2 * np.ceil(extent + 1 - 1e-9).astype(np.int64) + 1
    need += (need - final) % 2
    need = np.minimum(np.maximum(need, final), cap)
    return np.where(params.spatial[:, None], need, final[None])


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
    if r <= n:
        left, right = x.narrow(axis, 0, r).flip(axis), x.narrow(axis, n - r, r).flip(axis)
        return torch.cat([left, x, right], dim=axis)
    left = torch.arange(r - 1, -1, -1, device=x.device).clamp(max=n - 1)
    right = torch.arange(n - 1, n - 1 - r, -1, device=x.device).clamp(min=0)
    return x.index_select(axis, torch.cat([left, torch.arange(n, device=x.device), right]))


def _kernel(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return taps / taps.sum()


def gaussian_blur(x: torch.Tensor, sigma: Sequence[float], *, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of each of ``n`` volumes ``x`` (n, *S) with its own ``sigma`` (n,) in
    voxels, equal to ``scipy.ndimage.gaussian_filter(..., mode='reflect', truncate=4)`` per volume.

    Each 1-D pass is a sum of shifted slices of the padded volume (memory-bound, fast on CPU).
    """
    out = torch.empty_like(x)
    for i, s in enumerate(sigma):
        y = x[i]
        for axis in range(y.ndim):
            w = _kernel(float(s), truncate)
            r = len(w) // 2
            n = y.shape[axis]
            padded = _symmetric_pad(y, axis, r)
            acc = padded.narrow(axis, 0, n) * float(w[0])
            for k in range(1, len(w)):
                acc.add_(padded.narrow(axis, k, n), alpha=float(w[k]))
            y = acc
        out[i] = y
    return out


def apply_blur(image: torch.Tensor, params: Params) -> torch.Tensor:
    """Gaussian-blur the selected (sample, channel) pairs with their own sigma."""
    on = params.blur_sigma > 0
    if not on.any():
        return image
    b, c = (torch.as_tensor(v, device=image.device) for v in np.nonzero(on))
    image[b, c] = gaussian_blur(image[b, c], params.blur_sigma[on].tolist())
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
    for b, c in zip(*np.nonzero(params.lowres_zoom != 1), strict=True):
        zoom = float(params.lowres_zoom[b, c])
        small = tuple(max(1, round(s * zoom)) for s in spatial)
        x = nnf.interpolate(image[b, c][None, None], size=small, mode="nearest")
        image[b, c] = nnf.interpolate(x, size=spatial, mode=mode, align_corners=False)[0, 0]
    return image


def apply_gamma(image: torch.Tensor, gamma: np.ndarray, *, invert: bool) -> torch.Tensor:
    """batchgenerators' gamma with retained mean/std over all channels of each selected sample.

    ``y = ((x - min) / range) ** gamma`` (on ``-x`` when inverted), then rescaled to the input's
    mean and std; the intermediate ``* range + min`` cancels in that rescaling and is skipped.
    """
    on = gamma != 1
    if not on.any():
        return image
    idx = _index(on, image.device)
    x = image[idx]
    flat = x.reshape(len(x), -1).float()
    sd, mean = (v[:, None] for v in torch.std_mean(flat, dim=1, unbiased=False))
    lo, hi = (v[:, None] for v in torch.aminmax(flat, dim=1))
    rng = hi - lo + 1e-7
    z = torch.sub(hi, flat) if invert else torch.sub(flat, lo)
    g = torch.as_tensor(gamma[on], dtype=flat.dtype, device=image.device)[:, None]
    z.div_(rng).clamp_(min=0).pow_(g)
    sz, mz = (v[:, None] for v in torch.std_mean(z, dim=1, unbiased=False))
    scale = sd * rng / (sz * rng + 1e-8)
    if invert:  # y = -((z - mz) * scale + (-mean))
        z.mul_(-scale).add_(mean + mz * scale)
    else:
        z.mul_(scale).add_(mean - mz * scale)
    image[idx] = z.reshape(x.shape).to(image.dtype)
    return image


def _mirror_plain(image: torch.Tensor, label: torch.Tensor | None, params: Params) -> None:
    """Flip, in place, the chosen axes of the samples that are not resampled (one flip per sample)."""
    for b in np.flatnonzero(params.mirror.any(axis=1) & ~params.spatial):
        dims = [1 + int(a) for a in np.flatnonzero(params.mirror[b])]  # axes of image[b] / label[b]
        image[b] = image[b].flip(dims)
        if label is not None:
            label[b] = label[b].flip(dims)


def _nearest_exact_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Source index of each output voxel for nearest-exact resizing: floor((i + 0.5) * n_in / n_out)."""
    return (
        ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out))
        .floor()
        .long()
        .clamp_(max=n_in - 1)
    )


def downsample_targets(label: torch.Tensor, ds_scales: Sequence[Sequence[float]] | None) -> list[torch.Tensor]:
    """One int64 (B, 1, *S_k) target per deep supervision scale: nearest-exact (pixel-centre)
    subsampling of the full label, done as index gathers on the label's own dtype."""
    full = label.long()
    if not ds_scales:
        return [full]
    spatial = label.shape[2:]
    out = []
    for scale in ds_scales:
        size = tuple(max(1, round(s * f)) for s, f in zip(spatial, scale, strict=True))
        if size == tuple(spatial):
            out.append(full)
            continue
        x = label
        for a, (n_in, n_out) in enumerate(zip(spatial, size, strict=True)):
            if n_in == n_out:
                continue
            if n_in % n_out == 0:  # integer factor k: source voxels k // 2, k // 2 + k, ...
                k = n_in // n_out
                x = x.narrow(2 + a, k // 2, n_in - k // 2)[(slice(None),) * (2 + a) + (slice(None, None, k),)]
            else:
                x = x.index_select(2 + a, _nearest_exact_index(n_in, n_out, label.device))
        out.append(x.long())
    return out
