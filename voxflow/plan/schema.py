"""The plan: every hyper-parameter voxflow derives from a fingerprint, as frozen dataclasses ⇄ JSON.

``plans.json`` is meant to be read and edited by people. Loading validates each field and names
the one that is wrong (``configurations.3d_fullres.patch_size_vox``). Spatial tuples follow numpy
order: ``*_zyx`` / ``patch_size_vox`` are (z, y, x); a 2D configuration has ``patch_size_vox =
(1, Y, X)`` and its network's kernel sizes and strides are (y, x) pairs.

Variants are data: ``plan.with_overrides({"3d_fullres.train.epochs": "50"})`` or, on the CLI,
``--set train.epochs=50`` (applied to the selected configuration).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from voxflow import _serial
from voxflow._serial import atomic_write_json, set_field
from voxflow._types import PathLikeStr
from voxflow.architectures import check_architecture
from voxflow.errors import PlanError

__all__ = [
    "LOSSES",
    "NORM_SCHEMES",
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "SCHEMA_VERSION",
    "ChannelNormalization",
    "Configuration",
    "Loss",
    "NetworkSpec",
    "NormScheme",
    "Optimizer",
    "Plan",
    "Precision",
    "ResamplingSpec",
    "Schedule",
    "TrainSpec",
    "atomic_write_json",
]

SCHEMA_VERSION = 1
# Closed sets of options: Literal types on the fields, checked by ``check_choices`` in ``__post_init__``.
# ``network.architecture`` is open: any name registered in :mod:`voxflow.architectures`.
NormScheme = Literal["ct", "zscore", "none", "rescale_0_1"]
Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["poly", "cosine"]
Loss = Literal["dice_ce", "dice", "ce"]
#: ``train.precision``: auto (bf16 on CUDA where supported, fp16 + GradScaler on older GPUs, fp32 on the CPU),
#: or one of them explicitly (fp16 needs CUDA).
Precision = Literal["auto", "fp32", "bf16", "fp16"]
NORM_SCHEMES: tuple[str, ...] = _serial.choices(NormScheme)
OPTIMIZERS: tuple[str, ...] = _serial.choices(Optimizer)
SCHEDULES: tuple[str, ...] = _serial.choices(Schedule)
LOSSES: tuple[str, ...] = _serial.choices(Loss)
PRECISIONS: tuple[str, ...] = _serial.choices(Precision)


def _int_tuple(value: Any, name: str, length: int | None = None) -> tuple[int, ...]:
    return _serial.number_tuple(value, name, cast=int, length=length, minimum=1)


@dataclass(frozen=True, kw_only=True)
class ChannelNormalization:
    """How one input channel is normalised (see :mod:`voxflow.plan.planner` for the rules).

    ``ct``: clip to [lower, upper] (foreground 0.5/99.5 percentiles) then (x - mean) / std with the
    dataset's foreground statistics. ``zscore``: per image, (x - mean) / std, computed within the
    nonzero mask when ``use_mask`` is set (voxels outside stay 0). ``rescale_0_1``: per image
    min-max to [0, 1]. ``none``: cast to float32 only.
    """

    scheme: NormScheme
    use_mask: bool = False
    mean: float | None = None
    std: float | None = None
    lower: float | None = None
    upper: float | None = None

    def __post_init__(self) -> None:
        _serial.check_choices(self)
        if self.scheme == "ct":
            for name in ("mean", "std", "lower", "upper"):
                if getattr(self, name) is None:
                    raise PlanError(f"{name} is required for the 'ct' scheme")
            if not (self.std and self.std > 0):
                raise PlanError(f"std must be > 0 for the 'ct' scheme; got {self.std!r}")
            if self.lower is not None and self.upper is not None and self.lower > self.upper:
                raise PlanError(f"lower must be <= upper; got {self.lower!r} > {self.upper!r}")


@dataclass(frozen=True, kw_only=True)
class ResamplingSpec:
    """Spline orders used to resample to the target spacing.

    ``label_order`` 1 means linear interpolation of the one-hot encoding then argmax; 0 nearest.
    With ``separate_z`` the axis ``separate_axis`` (the coarse one) is resampled on its own with
    ``separate_order`` (0, nnU-Net's rule for anisotropic data), the in-plane axes with the orders above.
    """

    image_order: int = 3
    label_order: int = 1
    separate_z: bool = False
    separate_axis: int | None = None
    separate_order: int = 0

    def __post_init__(self) -> None:
        for name in ("image_order", "label_order", "separate_order"):
            if getattr(self, name) not in (0, 1, 2, 3):
                raise PlanError(f"{name} must be a spline order 0..3; got {getattr(self, name)!r}")
        if self.separate_z and self.separate_axis not in (0, 1, 2):
            raise PlanError(f"separate_axis must be 0, 1 or 2 when separate_z is set; got {self.separate_axis!r}")


@dataclass(frozen=True, kw_only=True)
class NetworkSpec:
    """U-Net topology. Per-stage tuples have length ``n_stages``; kernels/strides have
    ``spatial_dims`` entries each ((z, y, x) in 3D, (y, x) in 2D); stage 0's stride is all ones."""

    architecture: str = "unet"
    spatial_dims: int = 3
    n_stages: int
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_blocks_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    deep_supervision: bool = True

    def __post_init__(self) -> None:
        check_architecture(self.architecture)
        if self.spatial_dims not in (2, 3):
            raise PlanError(f"spatial_dims must be 2 or 3; got {self.spatial_dims!r}")
        n = self.n_stages
        if not isinstance(n, int) or n < 1:
            raise PlanError(f"n_stages must be a positive integer; got {n!r}")
        set_field(self, "features_per_stage", _int_tuple(self.features_per_stage, "features_per_stage", n))
        set_field(
            self,
            "kernel_sizes",
            tuple(_int_tuple(k, f"kernel_sizes[{i}]", self.spatial_dims) for i, k in enumerate(self.kernel_sizes)),
        )
        set_field(
            self,
            "strides",
            tuple(_int_tuple(s, f"strides[{i}]", self.spatial_dims) for i, s in enumerate(self.strides)),
        )
        set_field(self, "n_blocks_per_stage", _int_tuple(self.n_blocks_per_stage, "n_blocks_per_stage", n))
        set_field(
            self,
            "n_conv_per_stage_decoder",
            _int_tuple(self.n_conv_per_stage_decoder, "n_conv_per_stage_decoder", max(n - 1, 0)),
        )
        if len(self.kernel_sizes) != n or len(self.strides) != n:
            raise PlanError(
                f"kernel_sizes and strides must have n_stages={n} entries; got "
                f"{len(self.kernel_sizes)} and {len(self.strides)}"
            )
        if any(k % 2 == 0 for ks in self.kernel_sizes for k in ks):
            raise PlanError(f"kernel_sizes must be odd; got {self.kernel_sizes!r}")
        if any(s != 1 for s in self.strides[0]):
            raise PlanError(f"strides[0] must be all ones (the first stage does not pool); got {self.strides[0]!r}")

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of the strides per axis: every patch axis must be divisible by it."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(self.spatial_dims))

    @property
    def output_stages(self) -> tuple[int, ...]:
        """Decoder stages that carry a segmentation head, full resolution (stage 0) first.

        Without deep supervision only stage 0. With it, nnU-Net supervises every decoder stage but
        gives the lowest-resolution one a loss weight of 0; a head that carries no loss receives no
        gradient (and breaks DDP), so that head is not built at all: stages ``0 .. n_stages - 3``
        (just stage 0 for networks of up to 3 stages).
        """
        n_decoder = max(self.n_stages - 1, 1)
        if not self.deep_supervision or n_decoder == 1:
            return (0,)
        return tuple(range(n_decoder - 1))


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """Training schedule and loss (nnU-Net defaults; alternatives selectable by name)."""

    epochs: int = 1000
    iters_per_epoch: int = 250
    val_iters: int = 50
    optimizer: Optimizer = "sgd"
    lr: float = 1e-2
    momentum: float = 0.99
    weight_decay: float = 3e-5
    schedule: Schedule = "poly"
    poly_exponent: float = 0.9
    warmup_epochs: int = 0
    grad_clip: float = 12.0
    loss: Loss = "dice_ce"
    class_weighted_ce: bool = False
    early_stopping_patience: int | None = None
    oversample_foreground: float = 1.0 / 3.0
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    checkpoint_every: int = 50
    amp: bool = True
    precision: Precision = "auto"
    compile: bool = False
    seed: int = 12345

    def __post_init__(self) -> None:
        for name in ("epochs", "iters_per_epoch", "val_iters", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PlanError(f"{name} must be a positive integer; got {v!r}")
        _serial.check_choices(self)
        if not (self.lr > 0):
            raise PlanError(f"lr must be > 0; got {self.lr!r}")
        if not (0.0 <= self.oversample_foreground <= 1.0):
            raise PlanError(f"oversample_foreground must be in [0, 1]; got {self.oversample_foreground!r}")
        set_field(self, "mirror_axes", tuple(int(a) for a in self.mirror_axes))
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise PlanError(f"mirror_axes must hold spatial axes 0 (z), 1 (y), 2 (x); got {self.mirror_axes!r}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise PlanError(f"early_stopping_patience must be >= 1 or null; got {self.early_stopping_patience!r}")


@dataclass(frozen=True, kw_only=True)
class Configuration:
    """One trainable configuration (``2d``, ``3d_fullres``, ``3d_lowres``, ...)."""

    name: str
    spacing_zyx: tuple[float, float, float]
    median_shape_vox: tuple[int, int, int]
    patch_size_vox: tuple[int, int, int]
    batch_size: int
    normalization: tuple[ChannelNormalization, ...]
    resampling: ResamplingSpec
    network: NetworkSpec
    train: TrainSpec = field(default_factory=TrainSpec)
    previous_stage: str | None = None
    next_stage: str | None = None
    estimated_memory_gb: float = 0.0

    def __post_init__(self) -> None:
        set_field(
            self,
            "spacing_zyx",
            _serial.number_tuple(
                self.spacing_zyx, "spacing_zyx", cast=float, length=3, positive=True, axes="(z, y, x)"
            ),
        )
        for name in ("median_shape_vox", "patch_size_vox"):
            set_field(
                self, name, _serial.number_tuple(getattr(self, name), name, length=3, minimum=1, axes="(z, y, x)")
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PlanError(f"batch_size must be a positive integer; got {self.batch_size!r}")
        norm = tuple(
            _serial.coerce(ChannelNormalization, n, f"normalization[{i}]") for i, n in enumerate(self.normalization)
        )
        set_field(self, "normalization", norm)
        if not norm:
            raise PlanError("normalization must have one entry per channel; got none")
        set_field(self, "resampling", _serial.coerce(ResamplingSpec, self.resampling, "resampling"))
        set_field(self, "network", _serial.coerce(NetworkSpec, self.network, "network"))
        set_field(self, "train", _serial.coerce(TrainSpec, self.train, "train"))
        net = self.network
        spatial_patch = self.patch_size_vox[-net.spatial_dims :]
        if net.spatial_dims == 2 and self.patch_size_vox[0] != 1:
            raise PlanError(f"patch_size_vox of a 2D configuration must be (1, Y, X); got {self.patch_size_vox!r}")
        bad = [(p, t) for p, t in zip(spatial_patch, net.total_stride, strict=True) if p % t]
        if bad:
            raise PlanError(
                f"patch_size_vox {self.patch_size_vox!r} must be divisible per axis by the network's total "
                f"stride {net.total_stride!r}. Re-run `voxflow plan` or edit plans.json."
            )

    @property
    def is_2d(self) -> bool:
        return self.network.spatial_dims == 2

    @property
    def n_channels(self) -> int:
        return len(self.normalization)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """All configurations planned for one dataset, plus the dataset facts they depend on."""

    schema_version: int = SCHEMA_VERSION
    dataset_name: str = ""
    channel_names: tuple[str, ...]
    labels: dict[str, Any]
    regions_class_order: tuple[int, ...] | None = None
    preset: str = "default"
    gpu_memory_gb: float = 8.0
    configurations: dict[str, Configuration]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise PlanError(f"schema_version must be {SCHEMA_VERSION}; got {self.schema_version!r}")
        set_field(self, "channel_names", tuple(self.channel_names))
        if self.regions_class_order is not None:
            set_field(self, "regions_class_order", tuple(int(v) for v in self.regions_class_order))
        cfgs = {}
        for name, c in dict(self.configurations).items():
            cfg = _serial.coerce(Configuration, c, f"configurations.{name}")
            if cfg.name != name:
                raise PlanError(f"configurations.{name}.name must equal its key {name!r}; got {cfg.name!r}")
            if cfg.n_channels != len(self.channel_names):
                raise PlanError(
                    f"configurations.{name}.normalization must have one entry per channel "
                    f"({len(self.channel_names)}); got {cfg.n_channels}"
                )
            cfgs[name] = cfg
        if not cfgs:
            raise PlanError("configurations must not be empty")
        set_field(self, "configurations", cfgs)

    def configuration(self, name: str) -> Configuration:
        try:
            return self.configurations[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self.configurations), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise PlanError(
                f"configuration {name!r} is not in this plan; it has {sorted(self.configurations)}.{hint}"
            ) from None

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return _serial.to_jsonable(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return _serial.from_dict(cls, data)

    def save(self, path: PathLikeStr) -> None:
        _serial.atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLikeStr) -> Plan:
        return _serial.load_json_file(path, cls.from_dict, what="plan", command="voxflow plan")

    # ------------------------------------------------------------------ overrides
    def with_overrides(self, overrides: Mapping[str, Any], *, configuration: str | None = None) -> Plan:
        """Apply dotted overrides (``"3d_fullres.train.epochs": "50"``; with ``configuration``
        given, keys are relative to it: ``"train.epochs"``). String values are parsed as JSON
        when possible (``"[1, 2]"``, ``"true"``), else kept as strings."""
        data = self.to_dict()
        for key, raw in overrides.items():
            path = key.split(".")
            if configuration is not None:
                path = ["configurations", configuration, *path]
            elif path[0] in data["configurations"]:
                path = ["configurations", *path]
            node: Any = data
            for part in path[:-1]:
                if not isinstance(node, dict) or part not in node:
                    raise PlanError(f"--set {key}: no field {part!r} at this level")
                node = node[part]
            if not isinstance(node, dict) or path[-1] not in node:
                options = sorted(node) if isinstance(node, dict) else []
                close = difflib.get_close_matches(path[-1], options, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise PlanError(f"--set {key}: unknown field {path[-1]!r}.{hint}")
            value = raw
            if isinstance(raw, str):
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError:
                    value = raw
            node[path[-1]] = value
        return Plan.from_dict(data)
