"""Load an nnU-Net v2 trained-model folder: plans, dataset, folds' checkpoints -> networks + voxflow plan.

Folder layout (``RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG``): ``plans.json``, ``dataset.json``,
``dataset_fingerprint.json`` (optional here), ``fold_<k>/checkpoint_final.pth`` (or
``checkpoint_best.pth``). A cascade folder (``..._3d_cascade_fullres``) comes with its previous
stage's folder (``TRAINER__PLANS__3d_lowres`` beside it, or given), loaded with the same folds. The network is built with ``dynamic_network_architectures`` (the
package nnU-Net itself builds it with; optional extra ``voxflow[nnunet]``) from the plans'
``architecture`` entry, and the checkpoint's ``network_weights`` load into it strictly.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from voxflow.nnunet._translate import NnunetModelError, NnunetSpec, dataset_meta, translate_configuration
from voxflow.store import DatasetMeta
from voxflow.workspace import ConfigurationDir

__all__ = ["NnunetModel", "build_network", "instance_norm_as_group_norm", "load_nnunet_model", "previous_stage_folder"]

log = logging.getLogger(__name__)
_NETWORK_PREFIX = "dynamic_network_architectures."
_OP_PREFIX = "torch.nn."
_DEFAULT_TRAINER = "nnUNetTrainer"


@dataclass
class NnunetModel:
    """An nnU-Net model folder ready for voxflow: the translated spec, dataset metadata and one
    network per fold (eval mode, weights from the checkpoints)."""

    folder: Path
    spec: NnunetSpec
    dataset: DatasetMeta
    networks: list[Any]
    fold_names: list[str]
    trainer_name: str
    previous: NnunetModel | None = None
    """The previous stage's model of a cascade (its ``spec.configuration.name`` is ``spec.previous_stage``)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise NnunetModelError(
            f"{path.name} must exist in the nnU-Net model folder {str(path.parent)!r}; it "
            f"does not. Pass RESULTS/DatasetXXX/TRAINER__PLANS__CONFIG."
        ) from None
    except json.JSONDecodeError as e:
        raise NnunetModelError(f"{path} must be valid JSON; got {e}.") from None


def _locate(path: str, prefix: str, what: str) -> Any:
    """Import ``module.Class`` for a dotted path, only below ``prefix`` (no arbitrary imports)."""
    if not path.startswith(prefix) or "." not in path:
        raise NnunetModelError(
            f"{what} {path!r} is not supported: voxflow builds classes from {prefix}* only. "
            f"A custom architecture needs its own loader."
        )
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        if path.startswith(_NETWORK_PREFIX):
            raise NnunetModelError(
                f"{what} {path!r} needs the package dynamic-network-architectures; install "
                f"it with `pip install 'voxflow[nnunet]'` ({e})."
            ) from None
        raise NnunetModelError(f"{what} {path!r} cannot be imported: {e}.") from None
    except AttributeError:
        raise NnunetModelError(
            f"{what} {path!r} does not exist in the installed {module}; check the "
            f"dynamic-network-architectures version nnU-Net trained with."
        ) from None


def build_network(spec: NnunetSpec) -> Any:
    """The plans' network (``architecture.network_class_name`` + ``arch_kwargs``), without deep
    supervision, as nnU-Net's predictor builds it (no weight initialisation: weights are loaded)."""
    cls = _locate(spec.network_class, _NETWORK_PREFIX, "network class")
    kwargs = dict(spec.arch_kwargs)
    for key in spec.requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(str(kwargs[key]), _OP_PREFIX, f"arch_kwargs[{key!r}]")
    try:
        return cls(
            input_channels=spec.network_input_channels, num_classes=spec.num_outputs, deep_supervision=False, **kwargs
        )
    except TypeError as e:
        raise NnunetModelError(f"network class {spec.network_class!r} rejects the plans' arch_kwargs: {e}.") from None


def instance_norm_as_group_norm(net: Any) -> Any:
    """Replace every affine-or-not ``InstanceNorm1d/2d/3d`` without running stats in ``net`` by the
    same normalisation as ``GroupNorm(C, C)`` (one group per channel), in place; the parameters
    (``weight``, ``bias``) are the same tensors, so the state dict keys and values are unchanged.

    Same math, faster CPU kernel: ``torch.instance_norm`` took ~25% of nnU-Net's PlainConvUNet
    forward time on the CPU (``benchmarks/tta_batching.py`` measures both). Returns ``net``.
    """
    from torch import nn

    for name, child in list(net.named_children()):
        if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
            group = nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=child.affine)
            if child.affine:
                group.weight, group.bias = child.weight, child.bias
            group.train(child.training)
            setattr(net, name, group)
        else:
            instance_norm_as_group_norm(child)
    return net


def _fold_dirs(folder: Path, folds: Sequence[int | str] | None, checkpoint: str) -> list[Path]:
    cdir = ConfigurationDir(folder)  # nnU-Net's model folder has voxflow's fold_<k> layout
    if folds:
        dirs = [cdir.fold(f).path for f in folds]
    else:
        dirs = [f.path for f in cdir.folds() if (f.path / checkpoint).exists()]
    missing = [str(d / checkpoint) for d in dirs if not (d / checkpoint).exists()]
    if missing or not dirs:
        raise NnunetModelError(
            f"every selected fold must hold {checkpoint}; missing {missing or 'all folds'} in "
            f"{str(folder)!r}. Choose folds with -f or --nnunet-checkpoint checkpoint_best.pth."
        )
    return dirs


def _load_checkpoint(path: Path) -> Mapping[str, Any]:
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # nnU-Net pickles numpy values in 'logging'; its own predictor loads with weights_only=False
        log.info("%s holds more than tensors; loading it with weights_only=False (trusted checkpoints only)", path)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, Mapping) or "network_weights" not in ckpt:
        raise NnunetModelError(
            f"{path} must be an nnU-Net checkpoint with 'network_weights'; got "
            f"{sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__}."
        )
    return ckpt


def _load_folder(folder: Path, folds: Sequence[int | str] | None, checkpoint: str, device: str) -> NnunetModel:
    """One model folder: plans, dataset, the folds' networks (weights loaded strictly)."""
    plans, dataset = _read_json(folder / "plans.json"), _read_json(folder / "dataset.json")
    dirs = _fold_dirs(folder, folds, checkpoint)
    ckpts = [_load_checkpoint(d / checkpoint) for d in dirs]
    config_name = str(ckpts[0].get("init_args", {}).get("configuration") or folder.name.rsplit("__", 1)[-1])
    mirrors = {tuple(c.get("inference_allowed_mirroring_axes") or ()) for c in ckpts}
    if len(mirrors) > 1:
        raise NnunetModelError(
            f"the folds of {str(folder)!r} must share inference_allowed_mirroring_axes; got {sorted(mirrors)}."
        )
    spec = translate_configuration(plans, dataset, config_name, mirror_axes_net=mirrors.pop())
    trainer = str(ckpts[0].get("trainer_name", _DEFAULT_TRAINER))
    networks = []
    for d, ck in zip(dirs, ckpts, strict=True):
        net = build_network(spec)
        try:
            net.load_state_dict(ck["network_weights"], strict=True)
        except RuntimeError as e:
            raise NnunetModelError(
                f"the weights of {d / checkpoint} must fit the plans' network {spec.network_class!r}; they do not "
                f"(trainer {trainer!r} probably builds its own architecture, which voxflow does not know). "
                f"Details: {str(e).splitlines()[0]}"
            ) from None
        networks.append(instance_norm_as_group_norm(net).to(device).eval())
    if trainer != _DEFAULT_TRAINER:
        log.warning(
            "trainer %r is not nnU-Net's default; its weights loaded strictly into %s, so the architecture matches",
            trainer,
            spec.network_class,
        )
    return NnunetModel(folder, spec, dataset_meta(dataset, plans), networks, [d.name for d in dirs], trainer)


def previous_stage_folder(folder: str | Path, previous_stage: str) -> Path:
    """Where nnU-Net puts a cascade's previous stage: ``TRAINER__PLANS__<previous_stage>`` beside
    ``folder`` (``TRAINER__PLANS__3d_cascade_fullres``)."""
    folder = Path(folder)
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise NnunetModelError(
            f"the cascade model folder {str(folder)!r} must be named TRAINER__PLANS__CONFIG to "
            f"find its {previous_stage!r} folder beside it; pass --nnunet-previous-model."
        )
    return folder.parent / f"{parts[0]}__{parts[1]}__{previous_stage}"


def _check_pair(model: NnunetModel, previous: NnunetModel) -> None:
    """The previous stage must be the configuration the cascade names, with the same channels and labels."""
    want, got = model.spec.previous_stage, previous.spec.configuration.name
    where = f"{str(previous.folder)!r} (previous stage of {str(model.folder)!r})"
    if got != want:
        raise NnunetModelError(
            f"the previous-stage model folder must hold configuration {want!r} (the cascade's "
            f"previous_stage); {where} holds {got!r}. Pass the {want} folder."
        )
    for what, a, b in (
        ("labels", model.dataset.labels, previous.dataset.labels),
        ("channel_names", model.dataset.channel_names, previous.dataset.channel_names),
    ):
        if a != b:
            raise NnunetModelError(
                f"the dataset.json {what} of both stages must be the same; the cascade has "
                f"{a!r}, {where} has {b!r}. Both folders must come from one nnU-Net dataset."
            )


def load_nnunet_model(
    folder: str | Path,
    *,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "checkpoint_final.pth",
    device: str = "cpu",
    previous_model: str | Path | None = None,
) -> NnunetModel:
    """Read an nnU-Net v2 model folder and build one network per fold with its weights loaded strictly.

    A cascade configuration (``previous_stage`` in its plans, e.g. ``3d_cascade_fullres``) also loads
    its previous stage from ``previous_model`` (default: :func:`previous_stage_folder`), with the
    same folds and checkpoint name. Raises :class:`NnunetModelError` for a missing file, an
    unsupported configuration (normalisation, reader, resampling function), a network whose state
    dict does not match the checkpoint (a custom trainer's architecture: the message names trainer
    and network class), or a previous stage that is missing, lacks a fold or has other labels.
    """
    model = _load_folder(Path(folder), folds, checkpoint, device)
    stage = model.spec.previous_stage
    if stage is None:
        if previous_model is not None:
            raise NnunetModelError(
                f"--nnunet-previous-model is for cascade models only; {str(folder)!r} holds "
                f"{model.spec.configuration.name!r}, which has no previous stage."
            )
        return model
    prev_dir = Path(previous_model) if previous_model is not None else previous_stage_folder(folder, stage)
    if not (prev_dir / "plans.json").is_file():
        raise NnunetModelError(
            f"the cascade {str(folder)!r} needs its previous stage {stage!r}: expected an nnU-Net "
            f"model folder at {str(prev_dir)!r} (with plans.json); train {stage} (nnUNetv2_train "
            f"... {stage} FOLD) or pass its folder with --nnunet-previous-model."
        )
    missing = [f for f in model.fold_names if not (prev_dir / f / checkpoint).is_file()]
    if missing:
        raise NnunetModelError(
            f"the previous stage {str(prev_dir)!r} must hold the cascade's folds with "
            f"{checkpoint}; missing {missing}. Choose folds both stages have with -f."
        )
    previous = load_nnunet_model(
        prev_dir, folds=[f.removeprefix("fold_") for f in model.fold_names], checkpoint=checkpoint, device=device
    )
    _check_pair(model, previous)
    return replace(model, previous=previous)
