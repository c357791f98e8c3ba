"""The experiment planner: a pure function :class:`~voxflow.fingerprint.Fingerprint` -> :class:`Plan`.

The rules are nnU-Net v2's (Isensee et al., Nature Methods 2021, and the v2 ``ExperimentPlanner``),
in numpy (z, y, x) order; each is a small function of this module.

**Configurations.** A 2D dataset (every case one slice) gets ``2d`` only. A 3D dataset gets ``2d``
and ``3d_fullres``, and ``3d_lowres`` plus ``3d_cascade_fullres`` when the full-resolution patch
covers less than a quarter of the median image (``LOWRES_THRESHOLD``): then context matters more
than detail, so a low-resolution U-Net sees (most of) the image and the cascade refines its
segmentation at full resolution (``3d_lowres.next_stage`` / ``3d_cascade_fullres.previous_stage``).
The low-resolution spacing grows by 3% per step, first along axes more than twice finer than the
coarsest, until the patch covers a quarter of the median image.

**Target spacing** (:func:`target_spacing`). The median spacing over cases: resampling every case
to it changes the data least. Exception, anisotropic data: when the coarsest median spacing is more
than 3x the finest (``ANISOTROPY_THRESHOLD``) *and* that axis holds few voxels (3x fewer than
the smallest other axis), its target is the 10th percentile of that axis's spacings (but at least
the other axes' coarsest spacing): interpolating a few thick slices to very many thin ones mostly
invents data, while the 10th percentile keeps more of the better-resolved cases' detail.
The median shape is the median over cases of (shape after cropping x spacing / target spacing).

**Normalisation per channel** (:func:`normalization_for`), by channel name, case-insensitive:
``CT`` -> clip to the 0.5 / 99.5 percentiles of the pooled foreground samples, then z-score with
their mean and std (HU are quantitative: one transform for all cases keeps them comparable).
``noNorm``/``none`` -> none; ``rescale_to_0_1``/``rgb_to_0_1``/``rescale_0_1`` -> per-image min-max.
Anything else (MR, ...) -> per-image z-score, within the nonzero mask when cropping to the nonzero
box removed much (median kept fraction < 3/4, e.g. skull-stripped brains), so the background does
not dominate the statistics.

**Resampling** (:func:`resampling_for`). Images: third-order spline. Labels: linear interpolation of
the one-hot encoding (order 1). If the target spacing (or the median spacing) is anisotropic (max/min
> 3), the coarse axis is resampled separately with order 0 and the in-plane axes with the orders
above: splines across thick slices overshoot.

**Topology** (:mod:`voxflow.plan._topology`): pool an axis while its feature map stays >= 4 voxels
and its spacing is less than twice the finest, kernels 3 per axis from the first stage where that
axis is within 2x of the finest spacing (so (1, 3, 3) for thick-slice stages), strided convs,
features ``base * 2**stage`` capped at 320 (3D) / 512 (2D) (8 and 64 / 16 and 128 for the CPU
preset), two convs per stage and per decoder stage; the residual-encoder presets use (1, 3, 4, 6,
6, ...) residual blocks per encoder stage and one conv per decoder stage.

**Patch and batch** (:func:`plan_configuration`). The patch starts at 256^3 (2048^2 in 2D; smaller
for the CPU preset) voxels reshaped to the target spacing's aspect (same physical extent per axis),
clipped to the median shape. While the training-memory estimate at batch 2 exceeds the budget (or
for the CPU preset, the estimated iteration time exceeds ``seconds_per_iteration``) the axis that is
largest relative to the median shape shrinks by its divisibility step, and the topology is redone.
Then the batch grows from 2 while it fits and the batch still covers at most 5% of the dataset's
voxels (more would make batches near copies of the data: overfitting). Every patch axis is divisible
by its total stride.

**Presets.** ``default`` (plain U-Net, 8 GB), ``resenc-m`` (residual encoder, 8 GB), ``resenc-l``
(residual encoder, 24 GB) and ``cpu`` (plain U-Net, features 8 -> 64 (3D) / 16 -> 128 (2D), batch 2,
patch so one iteration takes about 2 s on 2 CPU cores, fp32, ``epochs=50``, ``iters_per_epoch=25``,
``val_iters=5``, ``checkpoint_every=10`` so the demo trains in minutes). ``gpu_memory_gb=None`` takes
the preset's budget. Mirroring: every spatial axis (3D) or y, x (2D).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxflow.architectures import check_architecture, cost_model
from voxflow.errors import PlanError
from voxflow.fingerprint import Fingerprint, IntensityStats
from voxflow.plan._cost import estimate_iteration_seconds, estimate_memory_bytes
from voxflow.plan._topology import Topology, pool_and_conv_props
from voxflow.plan.schema import (
    ChannelNormalization,
    Configuration,
    NetworkSpec,
    NormScheme,
    Plan,
    ResamplingSpec,
    TrainSpec,
)

__all__ = [
    "ANISOTROPY_THRESHOLD",
    "LOWRES_THRESHOLD",
    "PRESETS",
    "Preset",
    "median_shape",
    "normalization_for",
    "plan_configuration",
    "plan_experiment",
    "resampling_for",
    "target_spacing",
]

log = logging.getLogger(__name__)

ANISOTROPY_THRESHOLD = 3.0
LOWRES_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
MAX_DATASET_FRACTION_PER_BATCH = 0.05
MIN_BATCH_SIZE = 2
MIN_FEATURE_MAP = 4
GIB = 2**30

MemoryEstimator = Callable[..., int]
TimeEstimator = Callable[..., float]


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Planner settings of one preset (see the module docstring)."""

    name: str
    architecture: str = "unet"
    gpu_memory_gb: float = 8.0
    base_features: int = 32
    max_features_3d: int = 320
    max_features_2d: int = 512
    encoder_blocks: tuple[int, ...] = (2,)
    decoder_convs: int = 2
    initial_patch_edge_3d: int = 256
    initial_patch_edge_2d: int = 2048
    amp: bool = True
    seconds_per_iteration: float | None = None
    max_batch_size: int | None = None
    base_features_2d: int | None = None
    train: dict[str, Any] = dataclasses.field(default_factory=dict)

    def blocks(self, n_stages: int) -> tuple[int, ...]:
        """Encoder blocks per stage: the preset's list, its last entry repeated."""
        b = self.encoder_blocks
        return tuple(b[min(i, len(b) - 1)] for i in range(n_stages))

    def features(self, n_stages: int, spatial_dims: int) -> tuple[int, ...]:
        base = self.base_features_2d if (spatial_dims == 2 and self.base_features_2d) else self.base_features
        cap = self.max_features_3d if spatial_dims == 3 else self.max_features_2d
        return tuple(min(base * 2**s, cap) for s in range(n_stages))


_RESENC_BLOCKS = (1, 3, 4, 6, 6, 6)
PRESETS: dict[str, Preset] = {
    "default": Preset(name="default"),
    "resenc-m": Preset(name="resenc-m", architecture="resenc_unet", encoder_blocks=_RESENC_BLOCKS, decoder_convs=1),
    "resenc-l": Preset(
        name="resenc-l", architecture="resenc_unet", encoder_blocks=_RESENC_BLOCKS, decoder_convs=1, gpu_memory_gb=24.0
    ),
    "cpu": Preset(
        name="cpu",
        gpu_memory_gb=4.0,
        base_features=8,
        max_features_3d=64,
        base_features_2d=16,
        max_features_2d=128,
        initial_patch_edge_3d=96,
        initial_patch_edge_2d=256,
        amp=False,
        seconds_per_iteration=2.0,
        max_batch_size=2,
        train={"epochs": 50, "iters_per_epoch": 25, "val_iters": 5, "checkpoint_every": 10, "amp": False},
    ),
}


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PlanError(f"preset must be one of {sorted(PRESETS)}; got {name!r}.{hint}")
    return PRESETS[name]


# ------------------------------------------------------------------------------ spacing and shape
def is_anisotropic(spacing_zyx: Sequence[float]) -> bool:
    """True when the coarsest spacing is more than ``ANISOTROPY_THRESHOLD`` x the finest."""
    return max(spacing_zyx) / min(spacing_zyx) > ANISOTROPY_THRESHOLD


def target_spacing(fp: Fingerprint) -> tuple[float, float, float]:
    """Full-resolution target spacing (z, y, x) in mm: the median, with nnU-Net's anisotropy rule."""
    spacings = fp.spacings
    target = np.median(spacings, axis=0)
    if fp.is_2d:
        return tuple(float(v) for v in target)  # type: ignore[return-value]
    shapes = np.median(fp.shapes_after_crop * spacings / target, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max(target[others])
    aniso_voxels = shapes[worst] * ANISOTROPY_THRESHOLD < min(shapes[others])
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(p10, float(max(target[others])) + 1e-5)
    return tuple(float(v) for v in target)  # type: ignore[return-value]


def median_shape(fp: Fingerprint, spacing_zyx: Sequence[float]) -> tuple[int, int, int]:
    """Median over cases of the cropped shape resampled to ``spacing_zyx``, rounded (voxels)."""
    shapes = fp.shapes_after_crop * fp.spacings / np.asarray(spacing_zyx, dtype=np.float64)
    return tuple(max(1, int(round(v))) for v in np.median(shapes, axis=0))  # type: ignore[return-value]


# ------------------------------------------------------------------------------ normalisation, resampling
_NAMED_SCHEMES: dict[str, NormScheme] = {
    "ct": "ct",
    "nonorm": "none",
    "none": "none",
    "no_norm": "none",
    "zscore": "zscore",
    "rescale_to_0_1": "rescale_0_1",
    "rgb_to_0_1": "rescale_0_1",
    "rescale_0_1": "rescale_0_1",
}


def normalization_for(channel_name: str, stats: IntensityStats, *, use_mask: bool) -> ChannelNormalization:
    """Normalisation of one channel from its name and foreground statistics (module docstring)."""
    scheme = _NAMED_SCHEMES.get(channel_name.casefold(), "zscore")
    if scheme == "ct":
        if stats.n_samples and stats.std and stats.std > 0:
            return ChannelNormalization(
                scheme="ct", mean=stats.mean, std=stats.std, lower=stats.percentile_00_5, upper=stats.percentile_99_5
            )
        log.warning("channel %r is CT but has no foreground intensity spread; using per-image z-score", channel_name)
        scheme = "zscore"
    return ChannelNormalization(scheme=scheme, use_mask=use_mask and scheme == "zscore")


def resampling_for(spacing_zyx: Sequence[float], median_spacing_zyx: Sequence[float]) -> ResamplingSpec:
    """Spline orders; separate order-0 resampling of the coarse axis for anisotropic data."""
    for sp in (spacing_zyx, median_spacing_zyx):
        if is_anisotropic(sp):
            return ResamplingSpec(
                image_order=3, label_order=1, separate_z=True, separate_axis=int(np.argmax(sp)), separate_order=0
            )
    return ResamplingSpec(image_order=3, label_order=1)


# ------------------------------------------------------------------------------ topology, patch, batch
@dataclass(frozen=True)
class _Budget:
    preset: Preset
    memory_bytes: float
    in_channels: int
    num_outputs: int
    memory_estimator: MemoryEstimator
    time_estimator: TimeEstimator

    def memory(self, spec: NetworkSpec, patch: Sequence[int], batch: int) -> int:
        return int(self.memory_estimator(spec, patch, batch, self.in_channels, self.num_outputs))

    def fits(self, spec: NetworkSpec, patch: Sequence[int], batch: int) -> bool:
        if self.memory(spec, patch, batch) > self.memory_bytes:
            return False
        limit = self.preset.seconds_per_iteration
        return limit is None or self.time_estimator(spec, patch, batch, self.in_channels, self.num_outputs) <= limit


def _network(topo: Topology, preset: Preset) -> NetworkSpec:
    n = topo.n_stages
    dims = len(topo.patch_size)
    return NetworkSpec(
        architecture=preset.architecture,
        spatial_dims=dims,
        n_stages=n,
        features_per_stage=preset.features(n, dims),
        kernel_sizes=topo.kernel_sizes,
        strides=topo.strides,
        n_blocks_per_stage=preset.blocks(n),
        n_conv_per_stage_decoder=(preset.decoder_convs,) * (n - 1),
        deep_supervision=True,
    )


def _initial_patch(spacing: Sequence[float], median: Sequence[int], edge: int) -> list[int]:
    inv = 1.0 / np.asarray(spacing, dtype=np.float64)
    dims = len(spacing)
    patch = inv * (edge**dims / np.prod(inv)) ** (1.0 / dims)
    return [max(1, min(int(round(p)), int(m))) for p, m in zip(patch, median, strict=True)]


def _shrink(spacing: Sequence[float], patch: Sequence[int], median: Sequence[int], topo: Topology) -> list[int] | None:
    """One nnU-Net shrink step of the axis largest relative to the median shape; None if stuck."""
    ratios = [p / m for p, m in zip(patch, median, strict=True)]
    for axis in np.argsort(ratios)[::-1]:
        tmp = list(patch)
        tmp[axis] -= topo.total_stride[axis]
        if tmp[axis] < 1:
            continue
        step = pool_and_conv_props(spacing, tmp, min_feature_map=MIN_FEATURE_MAP).total_stride[axis]
        new = list(patch)
        new[axis] -= step
        if new[axis] >= 1:
            return new
    return None


def _fit_patch(spacing: Sequence[float], median: Sequence[int], budget: _Budget) -> tuple[Topology, NetworkSpec]:
    edge = budget.preset.initial_patch_edge_3d if len(spacing) == 3 else budget.preset.initial_patch_edge_2d
    patch = _initial_patch(spacing, median, edge)
    topo = pool_and_conv_props(spacing, patch, min_feature_map=MIN_FEATURE_MAP)
    spec = _network(topo, budget.preset)
    while not budget.fits(spec, topo.patch_size, MIN_BATCH_SIZE):
        smaller = _shrink(spacing, topo.patch_size, median, topo)
        if smaller is None:
            log.warning("no patch fits the budget for spacing %s; keeping %s", spacing, topo.patch_size)
            break
        topo = pool_and_conv_props(spacing, smaller, min_feature_map=MIN_FEATURE_MAP)
        spec = _network(topo, budget.preset)
    return topo, spec


def _triple_int(values: Sequence[int]) -> tuple[int, int, int]:
    return int(values[0]), int(values[1]), int(values[2])


def plan_configuration(
    name: str,
    spacing_zyx: Sequence[float],
    median_shape_zyx: Sequence[int],
    *,
    spatial_dims: int,
    n_cases: int,
    budget: _Budget,
    normalization: Sequence[ChannelNormalization],
    resampling: ResamplingSpec,
) -> Configuration:
    """Topology, patch and batch for one configuration at ``spacing_zyx`` (module docstring)."""
    sp = list(spacing_zyx)[-spatial_dims:]
    med = list(median_shape_zyx)[-spatial_dims:]
    topo, spec = _fit_patch(sp, med, budget)
    dataset_vox = float(np.prod(median_shape_zyx, dtype=np.float64)) * n_cases
    patch_vox = float(np.prod(topo.patch_size, dtype=np.float64))
    batch = MIN_BATCH_SIZE
    cap = budget.preset.max_batch_size
    while (
        (cap is None or batch < cap)
        and (batch + 1) * patch_vox <= MAX_DATASET_FRACTION_PER_BATCH * dataset_vox
        and budget.fits(spec, topo.patch_size, batch + 1)
    ):
        batch += 1
    patch3 = _triple_int(topo.patch_size if spatial_dims == 3 else (1, *topo.patch_size))
    mirror = (0, 1, 2) if spatial_dims == 3 else (1, 2)
    train = TrainSpec(mirror_axes=mirror, **budget.preset.train)
    return Configuration(
        name=name,
        spacing_zyx=(float(spacing_zyx[0]), float(spacing_zyx[1]), float(spacing_zyx[2])),
        median_shape_vox=_triple_int(median_shape_zyx),
        patch_size_vox=patch3,
        batch_size=batch,
        normalization=tuple(normalization),
        resampling=resampling,
        network=spec,
        train=train,
        estimated_memory_gb=round(budget.memory(spec, patch3, batch) / GIB, 3),
    )


def _lowres_spacings(fullres_spacing: Sequence[float]) -> Any:
    """Infinite sequence of ever coarser spacings (nnU-Net: +3% per step, anisotropic axes first)."""
    sp = np.asarray(fullres_spacing, dtype=np.float64).copy()
    while True:
        coarse = sp.max()
        finer = coarse / sp > 2
        if finer.any():
            sp[finer] *= LOWRES_SPACING_STEP
        else:
            sp *= LOWRES_SPACING_STEP
        yield tuple(float(v) for v in sp)


def _plan_lowres(fp: Fingerprint, fullres: Configuration, kwargs: dict[str, Any]) -> Configuration | None:
    full_med = np.asarray(fullres.median_shape_vox, dtype=np.float64)
    if np.prod(fullres.patch_size_vox, dtype=np.float64) / np.prod(full_med) >= LOWRES_THRESHOLD:
        return None
    lowres = None
    for spacing in _lowres_spacings(fullres.spacing_zyx):
        med = median_shape(fp, spacing)
        lowres = plan_configuration("3d_lowres", spacing, med, spatial_dims=3, **kwargs)
        if np.prod(lowres.patch_size_vox, dtype=np.float64) / np.prod(med, dtype=np.float64) >= LOWRES_THRESHOLD:
            break
    return lowres


def plan_experiment(
    fingerprint: Fingerprint,
    *,
    gpu_memory_gb: float | None = None,
    preset: str = "default",
    architecture: str | None = None,
    memory_estimator: MemoryEstimator | None = None,
    time_estimator: TimeEstimator = estimate_iteration_seconds,
) -> Plan:
    """Plan every configuration for a fingerprinted dataset (pure; rules in the module docstring).

    Parameters
    ----------
    fingerprint
        From :func:`voxflow.fingerprint.compute_fingerprint`.
    gpu_memory_gb
        Training memory budget in GiB (GPU memory; RAM for the CPU preset); ``None`` takes the
        preset's (8, 8, 24, 4 for default, resenc-m, resenc-l, cpu).
    preset
        ``default``, ``resenc-m``, ``resenc-l`` or ``cpu``.
    architecture
        Network architecture instead of the preset's: any name registered in
        :mod:`voxflow.architectures` with a cost model (e.g. by ``voxflow.nets.register_network(name,
        cost=...)``); the preset's other settings (features, blocks, budget) stay.
    memory_estimator, time_estimator
        Replaceable cost models ``(spec, patch_size_vox, batch_size, in_channels, num_outputs)`` ->
        bytes / seconds (e.g. :func:`voxflow.architectures.estimate_training_memory_bytes`); default
        :func:`voxflow.plan._cost.estimate_memory_bytes` with the preset's AMP setting and
        :func:`voxflow.plan._cost.estimate_iteration_seconds` (used by presets with a time budget).
    """
    pre = _preset(preset)
    if architecture is not None:
        cost_model(check_architecture(architecture))  # a clear error before any planning
        pre = dataclasses.replace(pre, architecture=architecture)
    budget_gb = pre.gpu_memory_gb if gpu_memory_gb is None else float(gpu_memory_gb)
    if not budget_gb > 0:
        raise PlanError(f"gpu_memory_gb must be > 0; got {gpu_memory_gb!r}")
    fp = fingerprint
    num_outputs = len(fp.labels) if fp.regions_class_order is None else len(fp.labels) - 1
    budget = _Budget(
        preset=pre,
        memory_bytes=budget_gb * GIB,
        in_channels=len(fp.channel_names),
        num_outputs=max(num_outputs, 2),
        memory_estimator=memory_estimator or functools.partial(estimate_memory_bytes, amp=pre.amp),
        time_estimator=time_estimator,
    )
    use_mask = fp.median_fraction_kept_by_crop < 0.75
    norm = tuple(
        normalization_for(ch, st, use_mask=use_mask) for ch, st in zip(fp.channel_names, fp.intensity, strict=True)
    )
    spacing = target_spacing(fp)
    med = median_shape(fp, spacing)
    resampling = resampling_for(spacing, fp.spacing.median_zyx)
    kwargs: dict[str, Any] = {"n_cases": fp.n_cases, "budget": budget, "normalization": norm, "resampling": resampling}
    configs: dict[str, Configuration] = {}
    configs["2d"] = plan_configuration("2d", spacing, med, spatial_dims=2, **kwargs)
    if not fp.is_2d:
        full = plan_configuration("3d_fullres", spacing, med, spatial_dims=3, **kwargs)
        configs["3d_fullres"] = full
        low = _plan_lowres(fp, full, kwargs)
        if low is not None:
            configs["3d_lowres"] = dataclasses.replace(low, next_stage="3d_cascade_fullres")
            configs["3d_cascade_fullres"] = dataclasses.replace(
                full, name="3d_cascade_fullres", previous_stage="3d_lowres"
            )
    extra = {
        "planner": "voxflow.plan.planner",
        "anisotropic": is_anisotropic(spacing),
        "median_spacing_zyx": list(fp.spacing.median_zyx),
        "use_nonzero_mask_for_norm": use_mask,
        "n_cases": fp.n_cases,
    }
    return Plan(
        dataset_name=fp.dataset_name,
        channel_names=fp.channel_names,
        labels=dict(fp.labels),
        regions_class_order=fp.regions_class_order,
        preset=pre.name,
        gpu_memory_gb=budget_gb,
        configurations=configs,
        extra=extra,
    )
