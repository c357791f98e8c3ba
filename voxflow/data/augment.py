"""Batched data augmentation: draw parameters, then apply them deterministically with torch.

TorchIO-style split: :func:`sample_params` draws every random quantity of one batch from a numpy
``Generator`` into a :class:`Params` value (small, loggable, picklable); :func:`apply` runs the
transforms on the batch's device (CPU or CUDA) as whole-batch tensor operations and is a pure
function of (batch, params). Identity parameters return the input exactly.

Defaults (:class:`AugmentConfig`) follow nnU-Net v2's training transforms, in nnU-Net's order:

==========================  ===========================================================  ======
transform                   parameters                                                   p
==========================  ===========================================================  ======
rotation                    each axis U(-30°, 30°) in 3D; 2D U(-180°, 180°) (±15° for     0.2
                            patches with aspect > 1.5); anisotropic 3D patches (largest
                            axis > 3x z): about z only, U(-180°, 180°) ("dummy 2D")
scaling                     one isotropic factor, U(0.7, 1) or U(1, 1.4) (half each);     0.2
                            in-plane only for anisotropic 3D patches
elastic (off by default)    smooth random displacement, ``elastic_magnitude_vox``        0.0
Gaussian noise              variance U(0, 0.1), all channels                              0.1
Gaussian blur               sigma U(0.5, 1) per channel; each channel with p 0.5          0.2
brightness                  multiply by U(0.75, 1.25) per channel                         0.15
contrast                    (x - mean) * f + mean, clipped to the old range; f as scale   0.15
low resolution              nearest down to U(0.5, 1) of the size, linear back up;       0.25
                            each channel with p 0.5
gamma, inverted             gamma U(0.7, 1) or U(1, 1.5), on -x, mean/std kept            0.1
gamma                       same, on x                                                    0.3
mirroring                   each axis in ``mirror_axes``                                  0.5
cascade: binary operator    previous-stage channels only, see :mod:`._previous`           0.4
cascade: remove component   previous-stage channels only                                  0.2
==========================  ===========================================================  ======

Rotation, scaling and elastic deformation form one ``grid_sample`` per batch that also crops the
enlarged input patch to the final patch (image linear, label nearest, outside = 0). Mirroring is
applied in that same step (a sign in the sampling matrix, or a flip of the crop) rather than last
as in nnU-Net: it commutes exactly with brightness, contrast, gamma and blur, and in distribution
with noise and low-resolution simulation. Deep supervision
targets are the final label resized with nearest-exact to each ``ds_scales`` size. nnU-Net's order-3
image interpolation is linear here (torch has no 3D cubic ``grid_sample``); its "dummy 2D"
augmentation is approximated by rotating/scaling in-plane (one 3D grid), not slice by slice.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from voxflow.data._previous import PreviousParams, apply_previous, sample_previous_params
from voxflow.data._transforms import (
    apply_blur,
    apply_brightness,
    apply_contrast,
    apply_gamma,
    apply_lowres,
    apply_noise,
    apply_spatial,
    downsample_targets,
)
from voxflow.errors import ConfigError

__all__ = ["AugmentConfig", "Params", "apply", "enlarged_patch_size", "sample_params"]

Range = tuple[float, float]


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Probabilities (per sample unless named ``per_channel``) and ranges of each transform.

    ``rotation_deg=None`` means nnU-Net's default for the patch (see :meth:`max_rotation_rad`);
    ``in_plane`` restricts 3D rotation/scaling to the (y, x) plane (``None``: nnU-Net's rule for
    anisotropic patches, :meth:`is_in_plane`).
    ``mirror_axes`` are spatial axes of the patch (0 = z, 1 = y, 2 = x in 3D; 0 = y, 1 = x in 2D).
    """

    p_rotation: float = 0.2
    rotation_deg: float | None = None
    in_plane: bool | None = None
    p_scale: float = 0.2
    scale_range: Range = (0.7, 1.4)
    p_elastic: float = 0.0
    elastic_magnitude_vox: Range = (0.0, 4.0)
    elastic_grid_spacing_vox: int = 16
    p_noise: float = 0.1
    noise_variance: Range = (0.0, 0.1)
    p_blur: float = 0.2
    p_blur_per_channel: float = 0.5
    blur_sigma: Range = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: Range = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: Range = (0.75, 1.25)
    p_lowres: float = 0.25
    p_lowres_per_channel: float = 0.5
    lowres_zoom: Range = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma_range: Range = (0.7, 1.5)
    p_mirror: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    p_previous_binary: float = 0.4
    p_previous_binary_per_label: float = 0.5
    previous_strel_radius_vox: Range = (1.0, 8.0)
    p_previous_remove_component: float = 0.2
    p_previous_remove_per_label: float = 0.5
    previous_component_max_fraction: float = 0.15

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.startswith("p_") and not 0.0 <= getattr(self, f.name) <= 1.0:
                raise ConfigError(
                    f"AugmentConfig.{f.name} must be a probability in [0, 1]; got "
                    f"{getattr(self, f.name)!r}. Pass a value between 0 (never) and 1 (always)."
                )
        for name in (
            "scale_range",
            "brightness_range",
            "contrast_range",
            "lowres_zoom",
            "gamma_range",
            "previous_strel_radius_vox",
        ):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(
                    f"AugmentConfig.{name} must be (low, high) with 0 < low <= high; got "
                    f"{getattr(self, name)!r}. Swap or raise the bounds, e.g. (0.7, 1.4)."
                )
        object.__setattr__(self, "mirror_axes", tuple(int(a) for a in self.mirror_axes))

    def max_rotation_rad(self, spatial_dims: int, patch_size: Sequence[int] | None = None) -> float:
        """Largest rotation angle; ``rotation_deg=None`` follows nnU-Net: 2D 180° (15° for patches
        with an aspect ratio above 1.5), 3D 30° (180° about z for in-plane-only patches)."""
        if self.p_rotation == 0:
            return 0.0
        if self.rotation_deg is not None:
            return math.radians(self.rotation_deg)
        if spatial_dims == 2:
            elongated = patch_size is not None and max(patch_size) / min(patch_size) > 1.5
            return math.radians(15.0 if elongated else 180.0)
        return math.radians(180.0 if self.is_in_plane(patch_size) else 30.0)

    def is_in_plane(self, patch_size: Sequence[int] | None) -> bool:
        """Rotate and scale only in the (y, x) plane: ``in_plane``, or with ``in_plane=None``
        nnU-Net's "dummy 2D" rule for a 3D patch whose largest axis exceeds 3x its z size."""
        if patch_size is not None and len(patch_size) != 3:
            return False
        if self.in_plane is not None:
            return self.in_plane
        return patch_size is not None and max(patch_size) / patch_size[0] > 3.0

    @classmethod
    def off(cls) -> AugmentConfig:
        """Every transform disabled (validation)."""
        return cls(
            p_rotation=0.0,
            p_scale=0.0,
            p_elastic=0.0,
            p_noise=0.0,
            p_blur=0.0,
            p_brightness=0.0,
            p_contrast=0.0,
            p_lowres=0.0,
            p_gamma_inverted=0.0,
            p_gamma=0.0,
            p_mirror=0.0,
            p_previous_binary=0.0,
            p_previous_remove_component=0.0,
        )

    def for_spatial_dims(self, spatial_dims: int) -> AugmentConfig:
        """Drop mirror axes that a ``spatial_dims``-D patch does not have."""
        return replace(self, mirror_axes=tuple(a for a in self.mirror_axes if a < spatial_dims))


def _rotation(angles: Sequence[float]) -> np.ndarray:
    """Rotation matrix in (z, y, x) for angles about the z, y and x axes (3D) or in-plane (2D)."""
    if len(angles) == 1:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    mats = []
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        m = np.eye(3)
        i, j = [k for k in range(3) if k != axis]
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


def enlarged_patch_size(final_patch_size: Sequence[int], config: AugmentConfig) -> tuple[int, ...]:
    """Patch to read so that rotation and scaling rarely pull in zero padding (nnU-Net's ``get_patch_size``).

    Per axis, the largest extent of the final patch rotated about each axis in turn (only about z
    for in-plane augmentation, which leaves z as it is) by any angle up to the maximum, times ``min(scale_range[1], 1 / 0.85)`` -- nnU-Net's compromise between
    coverage at the largest zoom-out and read cost; combined rotations and stronger zoom-out pull
    in some zero padding at the corners, as in nnU-Net. Rounded up so that the difference to the
    final size is even (exact centre crop). Without rotation and scaling: the final size itself.
    """
    final = np.asarray(final_patch_size, dtype=float)
    dims = len(final)
    rot = config.max_rotation_rad(dims, final_patch_size)
    if rot == 0.0 and config.p_scale == 0.0:
        return tuple(int(v) for v in final)
    in_plane = config.is_in_plane(final_patch_size)
    extent = final.copy()
    half = np.array(list(itertools.product(*[(-v / 2, v / 2) for v in final]))).T
    for axis in range(1 if dims == 2 or in_plane else 3):
        for a in np.linspace(-min(rot, math.pi), min(rot, math.pi), 181):
            angles = [0.0] * (1 if dims == 2 else 3)
            angles[axis] = float(a)
            extent = np.maximum(extent, 2 * np.abs(_rotation(angles) @ half).max(axis=1))
    if config.p_scale > 0:
        extent = extent * max(1.0, min(config.scale_range[1], 1 / 0.85))
    if in_plane:
        extent[0] = final[0]
    out = np.ceil(extent - 1e-6).astype(int)
    out += (out - final.astype(int)) % 2
    return tuple(int(v) for v in out)


@dataclass(frozen=True)
class Params:
    """Every random choice for one batch of ``B`` samples with ``C`` channels and ``D`` spatial axes.

    Neutral values mean "not applied": ``spatial`` False, noise_std 0, blur_sigma 0, brightness 1,
    contrast 1, lowres_zoom 1, gamma / gamma_inverted 1, mirror False.
    """

    matrix: np.ndarray  # (B, D, D) output offset (vox, z-y-x) -> input offset
    spatial: np.ndarray  # (B,) bool: resample this sample (else exact centre crop)
    elastic: np.ndarray | None  # (B, D, *coarse) displacement (vox) at control points, or None
    noise_std: np.ndarray  # (B,)
    noise_seed: int
    blur_sigma: np.ndarray  # (B, C) vox
    brightness: np.ndarray  # (B, C)
    contrast: np.ndarray  # (B, C)
    lowres_zoom: np.ndarray  # (B, C)
    gamma_inverted: np.ndarray  # (B,)
    gamma: np.ndarray  # (B,)
    mirror: np.ndarray  # (B, D) bool
    extra: dict = field(default_factory=dict)
    previous: PreviousParams | None = None  # cascade perturbations of the previous-stage channels

    @classmethod
    def identity(cls, batch_size: int, n_channels: int, spatial_dims: int) -> Params:
        b, c, d = batch_size, n_channels, spatial_dims
        return cls(
            matrix=np.tile(np.eye(d), (b, 1, 1)),
            spatial=np.zeros(b, bool),
            elastic=None,
            noise_std=np.zeros(b),
            noise_seed=0,
            blur_sigma=np.zeros((b, c)),
            brightness=np.ones((b, c)),
            contrast=np.ones((b, c)),
            lowres_zoom=np.ones((b, c)),
            gamma_inverted=np.ones(b),
            gamma=np.ones(b),
            mirror=np.zeros((b, d), bool),
        )


def _two_sided(rng: np.random.Generator, rng_range: Range, size: int | tuple[int, ...]) -> np.ndarray:
    """batchgenerators' factor draw: half U(low, 1), half U(1, high) (when low < 1 < high)."""
    lo, hi = rng_range
    below = rng.random(size) < 0.5
    return np.where(below & (lo < 1), rng.uniform(lo, min(hi, 1.0), size), rng.uniform(max(lo, 1.0), hi, size))


def _where(rng: np.random.Generator, p: float, values: np.ndarray, neutral: float) -> np.ndarray:
    return np.where(rng.random(values.shape) < p, values, neutral)


def _spatial_params(
    rng: np.random.Generator, b: int, d: int, cfg: AugmentConfig, patch_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rot_max = cfg.max_rotation_rad(d, patch_size)
    in_plane = cfg.is_in_plane(patch_size)
    do_rot = rng.random(b) < cfg.p_rotation
    do_scale = rng.random(b) < cfg.p_scale
    angles = rng.uniform(-rot_max, rot_max, (b, 1 if d == 2 else 3))
    if in_plane:
        angles[:, 1:] = 0.0  # rotation about z only
    scale = _two_sided(rng, cfg.scale_range, b)
    matrix = np.tile(np.eye(d), (b, 1, 1))
    for i in range(b):
        if do_rot[i]:
            matrix[i] = _rotation(angles[i])
        if do_scale[i]:
            factors = np.array([1.0, scale[i], scale[i]]) if in_plane else np.full(d, scale[i])
            matrix[i] = matrix[i] * factors[None, :]
    do_el = rng.random(b) < cfg.p_elastic
    elastic = None
    if do_el.any():
        coarse = tuple(max(2, math.ceil(p / cfg.elastic_grid_spacing_vox) + 1) for p in patch_size)
        mag = rng.uniform(*cfg.elastic_magnitude_vox, b) * do_el
        elastic = rng.normal(size=(b, d, *coarse)) * mag.reshape((b,) + (1,) * (d + 1))
    return matrix, do_rot | do_scale | do_el, elastic


def sample_params(
    rng: np.random.Generator,
    batch_size: int,
    *,
    n_channels: int,
    spatial_dims: int,
    config: AugmentConfig | None = None,
    patch_size: Sequence[int] | None = None,
    n_previous: int = 0,
) -> Params:
    """Draw the augmentation parameters of one batch (numpy only; cheap).

    ``patch_size`` (the final patch, ``spatial_dims`` entries) sets the elastic control grid and
    nnU-Net's patch-dependent rotation rules (:meth:`AugmentConfig.max_rotation_rad`).
    ``n_previous``: one-hot channels of a cascade's previous stage (their perturbations are drawn
    last, so the other draws do not depend on it).
    """
    cfg = (config or AugmentConfig()).for_spatial_dims(spatial_dims)
    b, c, d = batch_size, n_channels, spatial_dims
    matrix, spatial, elastic = _spatial_params(rng, b, d, cfg, patch_size or (32,) * d)
    noise_std = _where(rng, cfg.p_noise, np.sqrt(rng.uniform(*cfg.noise_variance, b)), 0.0)
    blur_on = (rng.random(b) < cfg.p_blur)[:, None] & (rng.random((b, c)) < cfg.p_blur_per_channel)
    blur = np.where(blur_on, rng.uniform(*cfg.blur_sigma, (b, c)), 0.0)
    brightness = np.where((rng.random(b) < cfg.p_brightness)[:, None], rng.uniform(*cfg.brightness_range, (b, c)), 1.0)
    contrast = np.where((rng.random(b) < cfg.p_contrast)[:, None], _two_sided(rng, cfg.contrast_range, (b, c)), 1.0)
    low_on = (rng.random(b) < cfg.p_lowres)[:, None] & (rng.random((b, c)) < cfg.p_lowres_per_channel)
    lowres = np.where(low_on, rng.uniform(*cfg.lowres_zoom, (b, c)), 1.0)
    gamma_inv = _where(rng, cfg.p_gamma_inverted, _two_sided(rng, cfg.gamma_range, b), 1.0)
    gamma = _where(rng, cfg.p_gamma, _two_sided(rng, cfg.gamma_range, b), 1.0)
    mirror = np.zeros((b, d), bool)
    for a in cfg.mirror_axes:
        mirror[:, a] = rng.random(b) < cfg.p_mirror
    noise_seed = int(rng.integers(2**62))
    previous = sample_previous_params(rng, b, n_previous, cfg) if n_previous else None
    return Params(
        matrix=matrix,
        spatial=spatial,
        elastic=elastic,
        noise_std=noise_std,
        noise_seed=noise_seed,
        blur_sigma=blur,
        brightness=brightness,
        contrast=contrast,
        lowres_zoom=lowres,
        gamma_inverted=gamma_inv,
        gamma=gamma,
        mirror=mirror,
        previous=previous,
    )


def apply(
    image: torch.Tensor,
    label: torch.Tensor | None,
    params: Params,
    *,
    patch_size: Sequence[int],
    ds_scales: Sequence[Sequence[float]] | None = None,
    spatial_input: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    previous_labels: Sequence[int] = (),
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Augment one batch on its device; deterministic given ``params``.

    Parameters
    ----------
    image : (B, C, *P) float32, ``P`` the (enlarged) input patch, 2 or 3 spatial axes.
    label : (B, *P) or (B, 1, *P) integer labels, or ``None``.
    patch_size : final spatial size ``F`` (same number of axes as ``P``; ``P - F`` even).
    ds_scales : per-axis scale factor of each deep supervision output (full resolution first);
        ``None`` gives one full-resolution target.
    previous_labels : a cascade's previous-stage label values: ``label`` is then (B, 2, *P), the
        reference label and the previous stage's segmentation, transformed alike (nearest); the
        latter leaves as one-hot channels appended to the image (one per value, no intensity
        transform), perturbed by ``params.previous`` (:mod:`voxflow.data._previous`).
    spatial_input : optional (image (n, C, *P'), label (n, *P') or None) holding only the samples
        with ``params.spatial``, each centred on its patch (the loader reads just their footprint,
        :func:`voxflow.data._transforms.input_footprint`); ``image``/``label`` then need only
        the final size for the other samples.

    Returns
    -------
    (image (B, C [+ K], *F) float32, targets): one (B, 1, *F_s) int64 tensor per scale; empty without a label.
    """
    if label is not None and label.ndim == image.ndim - 1:
        label = label.unsqueeze(1)
    if spatial_input is not None and spatial_input[1] is not None and spatial_input[1].ndim == image.ndim - 1:
        spatial_input = (spatial_input[0], spatial_input[1].unsqueeze(1))
    image, label = apply_spatial(image, label, params, patch_size, spatial_input=spatial_input)
    image = apply_noise(image, params)
    image = apply_blur(image, params)
    image = apply_brightness(image, params)
    image = apply_contrast(image, params)
    image = apply_lowres(image, params)
    image = apply_gamma(image, params.gamma_inverted, invert=True)
    image = apply_gamma(image, params.gamma, invert=False)
    if previous_labels:
        if label is None or label.shape[1] != 2:
            raise ConfigError(
                f"a cascade batch needs the label and the previous stage as (B, 2, *P); got "
                f"{None if label is None else tuple(label.shape)}. Preprocess and train "
                f"3d_lowres first (its cross-validation segmentation is the second channel)."
            )
        prev, label = label[:, 1], label[:, :1]
        onehot = torch.stack([prev == int(v) for v in previous_labels], dim=1).to(image.dtype)
        image = torch.cat([image, apply_previous(onehot, params.previous)], dim=1)
    targets = [] if label is None else downsample_targets(label, ds_scales)
    return image, targets
