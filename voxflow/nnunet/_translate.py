"""Translate nnU-Net v2 ``plans.json`` + ``dataset.json`` into voxflow values (pure, no I/O).

nnU-Net stores every spatial list in its *transposed* axis order (``transpose_forward`` moves the
coarsest axis first); voxflow works in the image's own (z, y, x) order. Spacing, patch size, kernel
sizes and strides are put back with ``transpose_backward``; the network itself keeps running on
transposed tiles (:class:`voxflow.nnunet.NnunetTilePredictor` permutes them), so its weights are
used unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from voxflow.errors import VoxflowError
from voxflow.plan.schema import (
    ChannelNormalization,
    Configuration,
    NetworkSpec,
    NormScheme,
    ResamplingSpec,
    TrainSpec,
)
from voxflow.store import DatasetMeta

__all__ = [
    "NnunetModelError",
    "NnunetSpec",
    "case_configuration",
    "dataset_meta",
    "foreground_labels",
    "resolve_configuration",
    "separate_z_axis",
    "translate_configuration",
]

ANISO_THRESHOLD = 3.0  # nnU-Net's separate-z anisotropy threshold (default_resampling.ANISO_THRESHOLD)
_NORMALIZATION: dict[str, NormScheme] = {
    "ZScoreNormalization": "zscore",
    "CTNormalization": "ct",
    "NoNormalization": "none",
    "RescaleTo01Normalization": "rescale_0_1",
}
_ARCHITECTURES = {"PlainConvUNet": "unet", "ResidualEncoderUNet": "resenc_unet"}
_RESAMPLING_FN = "resample_data_or_seg_to_shape"
_READERS = ("SimpleITKIO", "NibabelIO")


class NnunetModelError(VoxflowError, ValueError):
    """An nnU-Net model folder cannot be translated (missing file, unsupported class or setting)."""


@dataclass(frozen=True)
class NnunetSpec:
    """What voxflow needs beyond a :class:`Configuration` to run an nnU-Net network unchanged.

    ``transpose_forward`` maps voxflow's (z, y, x) axes to the network's axes; ``mirror_axes_net``
    are the network's spatial axes to mirror (nnU-Net's ``inference_allowed_mirroring_axes``, in its
    transposed order); ``network_class``/``arch_kwargs``/``requires_import`` come verbatim from the
    plans; ``probabilities_order``/``probabilities_order_z`` and ``force_separate_z`` drive the
    resampling of logits back to the original grid.
    """

    configuration: Configuration
    transpose_forward: tuple[int, int, int]
    network_class: str
    arch_kwargs: dict[str, Any]
    requires_import: tuple[str, ...]
    num_input_channels: int
    num_outputs: int
    force_separate_z: bool | None
    data_order_z: int
    probabilities_order: int
    probabilities_order_z: int
    mirror_axes_net: tuple[int, ...] = ()
    previous_stage: str | None = None
    previous_labels: tuple[int, ...] = ()
    seg_order: int = 1
    seg_order_z: int = 0
    seg_force_separate_z: bool | None = None

    @property
    def network_input_channels(self) -> int:
        """Channels of the network's input: the image's, plus the previous stage's one-hot labels."""
        return self.num_input_channels + (len(self.previous_labels) if self.previous_stage else 0)

    @property
    def transpose_backward(self) -> tuple[int, int, int]:
        return tuple(int(i) for i in np.argsort(self.transpose_forward))  # type: ignore[return-value]

    @property
    def spatial_dims(self) -> int:
        return self.configuration.network.spatial_dims


def resolve_configuration(plans: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The configuration ``name`` of nnU-Net plans with ``inherits_from`` applied (as PlansManager does)."""
    cfgs = plans.get("configurations", {})
    if name not in cfgs:
        raise NnunetModelError(
            f"plans.json must define configuration {name!r}; it has {sorted(cfgs)}. Point "
            f"--nnunet-model at RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG of a trained model."
        )
    cfg = dict(cfgs[name])
    parent = cfg.get("inherits_from")
    if parent:
        if parent == name:
            raise NnunetModelError(f"configuration {name!r} of plans.json inherits from itself.")
        base = resolve_configuration(plans, parent)
        base.update({k: v for k, v in cfg.items() if k != "inherits_from"})
        cfg = base
    return cfg


def _labels(dataset: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[int, ...] | None, int]:
    labels = dict(dataset.get("labels") or {})
    if not labels:
        raise NnunetModelError("dataset.json must hold 'labels' (name -> value or list of values); got none.")
    regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
    order = dataset.get("regions_class_order")
    if regions and order is None:
        raise NnunetModelError(f"a region-based dataset.json needs 'regions_class_order'; got labels {labels}.")
    fg = [k for k, v in labels.items() if k != "ignore" and v not in (0, [0])]
    n_out = len(fg) if regions else len([k for k in labels if k != "ignore"])
    norm = {
        k: (
            list(v)
            if isinstance(v, (list, tuple)) and regions
            else (int(v[0]) if isinstance(v, (list, tuple)) else int(v))
        )
        for k, v in labels.items()
    }
    return norm, (tuple(int(v) for v in order) if regions and order is not None else None), n_out


def foreground_labels(dataset: Mapping[str, Any]) -> tuple[int, ...]:
    """nnU-Net's ``LabelManager.foreground_labels``: every label value of ``dataset.json`` (region
    members included, ``ignore`` left out), sorted, without 0 -- the one-hot channels a cascade
    stage gets from its previous stage (one per label value, also for region datasets)."""
    values: set[int] = set()
    for name, v in (dataset.get("labels") or {}).items():
        if name != "ignore":
            values.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    return tuple(sorted(values - {0}))


def dataset_meta(dataset: Mapping[str, Any], plans: Mapping[str, Any]) -> DatasetMeta:
    """voxflow dataset metadata (channels, labels, regions, file ending) of an nnU-Net ``dataset.json``."""
    channels = dataset.get("channel_names") or dataset.get("modality")
    if not channels:
        raise NnunetModelError("dataset.json must hold 'channel_names' ({'0': 'CT', ...}); got none.")
    labels, order, _ = _labels(dataset)
    return DatasetMeta(
        channel_names=tuple(channels[k] for k in sorted(channels, key=int)),
        labels=labels,
        regions_class_order=order,
        file_ending=str(dataset.get("file_ending", ".nii.gz")),
        name=str(plans.get("dataset_name", "")),
    )


def _normalization(
    cfg: Mapping[str, Any], plans: Mapping[str, Any], n_channels: int, name: str
) -> tuple[ChannelNormalization, ...]:
    schemes, masks = cfg["normalization_schemes"], cfg.get("use_mask_for_norm") or [False] * n_channels
    if len(schemes) != n_channels:
        raise NnunetModelError(
            f"normalization_schemes of configuration {name!r} must have one entry per "
            f"channel ({n_channels}); got {schemes!r}."
        )
    props = plans.get("foreground_intensity_properties_per_channel", {})
    out = []
    for c, (scheme, mask) in enumerate(zip(schemes, masks, strict=False)):
        if scheme not in _NORMALIZATION:
            raise NnunetModelError(
                f"normalization scheme {scheme!r} (channel {c} of {name!r}) is not supported; "
                f"voxflow runs {sorted(_NORMALIZATION)}."
            )
        kind = _NORMALIZATION[scheme]
        if kind == "ct":
            p = props.get(str(c)) or props.get(c)
            if not p:
                raise NnunetModelError(
                    f"CTNormalization of channel {c} needs foreground_intensity_properties_"
                    f"per_channel[{c!r}] in plans.json; it is missing."
                )
            out.append(
                ChannelNormalization(
                    scheme="ct",
                    mean=float(p["mean"]),
                    std=max(float(p["std"]), 1e-8),
                    lower=float(p["percentile_00_5"]),
                    upper=float(p["percentile_99_5"]),
                )
            )
        else:
            out.append(ChannelNormalization(scheme=kind, use_mask=bool(mask) and kind == "zscore"))
    return tuple(out)


def _resampling_kwargs(cfg: Mapping[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
        if cfg.get(key) != _RESAMPLING_FN:
            raise NnunetModelError(
                f"{key} of configuration {name!r} must be {_RESAMPLING_FN!r} (the only "
                f"resampling voxflow reproduces); got {cfg.get(key)!r}."
            )
    return (
        dict(cfg.get("resampling_fn_data_kwargs") or {}),
        dict(cfg.get("resampling_fn_seg_kwargs") or {}),
        dict(cfg.get("resampling_fn_probabilities_kwargs") or {}),
    )


def _network_spec(arch: Mapping[str, Any], back: Sequence[int], spatial_dims: int) -> NetworkSpec:
    cls = str(arch.get("network_class_name", ""))
    short = cls.rsplit(".", 1)[-1]
    kw = arch.get("arch_kwargs", {})

    def orig(v: Any) -> tuple[int, ...]:
        vals = [int(x) for x in (v if isinstance(v, (list, tuple)) else [v] * spatial_dims)]
        return tuple(vals[i] for i in back) if spatial_dims == 3 else tuple(vals)

    n = int(kw["n_stages"])
    blocks = kw.get("n_blocks_per_stage", kw.get("n_conv_per_stage"))
    dec = kw.get("n_conv_per_stage_decoder", [1] * (n - 1))
    return NetworkSpec(
        architecture=_ARCHITECTURES.get(short, "unet"),
        spatial_dims=spatial_dims,
        n_stages=n,
        features_per_stage=tuple(int(f) for f in kw["features_per_stage"]),
        kernel_sizes=tuple(orig(k) for k in kw["kernel_sizes"]),
        strides=tuple(orig(s) for s in kw["strides"]),
        n_blocks_per_stage=tuple(int(b) for b in (blocks if isinstance(blocks, list) else [blocks] * n)),
        n_conv_per_stage_decoder=tuple(int(b) for b in (dec if isinstance(dec, list) else [dec] * (n - 1))),
        deep_supervision=False,
    )


def _previous_stage(
    cfg: Mapping[str, Any], plans: Mapping[str, Any], dataset: Mapping[str, Any], name: str
) -> str | None:
    """A cascade configuration's ``previous_stage`` (checked), or None."""
    previous = cfg.get("previous_stage")
    if previous is None:
        return None
    if previous == name or previous not in plans.get("configurations", {}):
        raise NnunetModelError(
            f"previous_stage of configuration {name!r} must name another configuration of "
            f"plans.json (e.g. '3d_lowres'); got {previous!r}."
        )
    if not foreground_labels(dataset):
        raise NnunetModelError(
            f"cascade configuration {name!r} needs foreground labels in dataset.json (its "
            f"extra input is one channel per foreground label); got {dataset.get('labels')!r}."
        )
    return str(previous)


def _grid(cfg: Mapping[str, Any], plans: Mapping[str, Any], name: str) -> tuple[Any, ...]:
    """transpose_forward, its inverse, and spacing (mm), patch and median shape (voxels) in (z, y, x)."""
    tf = tuple(int(i) for i in plans.get("transpose_forward", (0, 1, 2)))
    back = tuple(int(i) for i in np.argsort(tf))
    patch, spacing = [int(p) for p in cfg["patch_size"]], [float(s) for s in cfg["spacing"]]
    spatial_dims = len(patch)
    if spatial_dims == 2:
        if tf != (0, 1, 2):
            raise NnunetModelError(
                f"2D configuration {name!r} with transpose_forward {list(tf)} is not supported "
                f"(voxflow slices 2D models along z); use a 3D configuration."
            )
        med = plans.get("original_median_spacing_after_transp", [1.0, 1.0, 1.0])
        spacing_zyx, patch_zyx = (float(med[0]), *spacing), (1, *patch)
        median = (1, *cfg.get("median_image_size_in_voxels", patch))
    else:
        spacing_zyx = tuple(spacing[i] for i in back)
        patch_zyx = tuple(patch[i] for i in back)
        median = tuple(int(round(cfg.get("median_image_size_in_voxels", patch)[i])) for i in back)
    return tf, back, spacing_zyx, patch_zyx, median


def translate_configuration(
    plans: Mapping[str, Any],
    dataset: Mapping[str, Any],
    name: str,
    *,
    mirror_axes_net: Sequence[int] | None = (0, 1, 2),
) -> NnunetSpec:
    """An nnU-Net configuration as a voxflow :class:`Configuration` plus an :class:`NnunetSpec`.

    ``mirror_axes_net``: the checkpoint's ``inference_allowed_mirroring_axes`` (network axes, None
    for none). Raises :class:`NnunetModelError` naming what is not supported.
    """
    cfg = resolve_configuration(plans, name)
    previous = _previous_stage(cfg, plans, dataset, name)
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in _READERS:
        raise NnunetModelError(
            f"image_reader_writer {reader!r} of plans.json is not supported (its axis order "
            f"may differ from voxflow's readers); supported: {list(_READERS)}."
        )
    arch = cfg.get("architecture")
    if not isinstance(arch, Mapping) or "network_class_name" not in arch:
        raise NnunetModelError(
            f"configuration {name!r} must hold 'architecture' with 'network_class_name' "
            f"(nnU-Net >= 2.4 plans); got keys {sorted(cfg)}. Re-plan with a current nnU-Net."
        )
    tf, back, spacing_zyx, patch_zyx, median = _grid(cfg, plans, name)
    spatial_dims = len(cfg["patch_size"])
    data_kw, seg_kw, prob_kw = _resampling_kwargs(cfg, name)
    meta = dataset_meta(dataset, plans)
    _, _, n_out = _labels(dataset)
    mirror = tuple(int(a) for a in (mirror_axes_net or ()))
    mirror_zyx = tuple(sorted(tf[a] for a in mirror)) if spatial_dims == 3 else tuple(a + 1 for a in mirror)
    config = Configuration(
        name=name,
        spacing_zyx=spacing_zyx,  # type: ignore[arg-type]
        median_shape_vox=tuple(max(1, int(m)) for m in median),  # type: ignore[arg-type]
        patch_size_vox=patch_zyx,  # type: ignore[arg-type]
        batch_size=int(cfg.get("batch_size", 2)),  # type: ignore[arg-type]
        normalization=_normalization(cfg, plans, len(meta.channel_names), name),
        resampling=ResamplingSpec(
            image_order=int(data_kw.get("order", 3)),
            label_order=int(seg_kw.get("order", 1)),
            separate_order=int(data_kw.get("order_z", 0)),
        ),
        network=_network_spec(arch, back, spatial_dims),
        train=TrainSpec(mirror_axes=mirror_zyx),
    )
    return NnunetSpec(
        configuration=config,
        transpose_forward=tf,  # type: ignore[arg-type]
        network_class=str(arch["network_class_name"]),
        arch_kwargs=dict(arch.get("arch_kwargs", {})),
        requires_import=tuple(arch.get("_kw_requires_import", ())),
        num_input_channels=len(meta.channel_names),
        num_outputs=n_out,
        force_separate_z=data_kw.get("force_separate_z"),
        data_order_z=int(data_kw.get("order_z", 0)),
        probabilities_order=int(prob_kw.get("order", 1)),
        probabilities_order_z=int(prob_kw.get("order_z", 0)),
        mirror_axes_net=mirror,
        previous_stage=previous,
        previous_labels=foreground_labels(dataset) if previous else (),
        seg_order=int(seg_kw.get("order", 1)),
        seg_order_z=int(seg_kw.get("order_z", 0)),
        seg_force_separate_z=seg_kw.get("force_separate_z"),
    )


def _lowres_axis(spacing: Sequence[float]) -> int | None:
    s = np.asarray(spacing, dtype=float)
    axes = np.flatnonzero(s.max() / s == 1)
    return int(axes[0]) if len(axes) == 1 else None


def separate_z_axis(
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    force: bool | None = None,
    threshold: float = ANISO_THRESHOLD,
) -> int | None:
    """nnU-Net's separate-z rule (``determine_do_sep_z_and_axis``): the axis resampled on its own, or None.

    Spacings in any common axis order; the returned axis is in that order. Anisotropic means
    ``max / min > threshold``, checked on the current spacing first, then on the new one; a
    spacing with two or three equally coarse axes gets no separate axis.
    """
    if force is not None:
        return _lowres_axis(current_spacing) if force else None
    for sp in (current_spacing, new_spacing):
        s = np.asarray(sp, dtype=float)
        if s.max() / s.min() > threshold:
            return _lowres_axis(sp)
    return None


def case_configuration(spec: NnunetSpec, case_spacing_zyx: Sequence[float]) -> Configuration:
    """The configuration with nnU-Net's per-case separate-z decision for a case of this spacing."""
    cfg = spec.configuration
    target = list(cfg.spacing_zyx)
    if cfg.is_2d:
        target[0] = float(case_spacing_zyx[0])
    axis = separate_z_axis(case_spacing_zyx, target, force=spec.force_separate_z)
    res = replace(cfg.resampling, separate_z=axis is not None, separate_axis=axis)
    return replace(cfg, resampling=res)
