"""Reading voxflow checkpoints and rebuilding their networks (writing them is training's job,
:mod:`voxflow.train.checkpoint`).

A checkpoint is a dict ``{"format": "voxflow-checkpoint-1", "network": state_dict,
"configuration": Configuration dict, "dataset": DatasetMeta dict, "in_channels", "num_outputs",
"epoch", ...}`` (training adds its own state for ``--resume``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voxflow._types import PathLikeStr
from voxflow.errors import IncompleteStoreError
from voxflow.nets import build_network
from voxflow.plan.schema import Configuration
from voxflow.store import DatasetMeta

__all__ = ["FORMAT", "fit_state_dict", "load_checkpoint", "load_model", "strip_state_dict"]

FORMAT = "voxflow-checkpoint-1"


def load_checkpoint(path: PathLikeStr, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise IncompleteStoreError(f"checkpoint {path} does not exist; train the fold first (`voxflow train`).")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise IncompleteStoreError(f"{path} is not a voxflow checkpoint (format {FORMAT!r} expected).")
    return ckpt


def strip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) key prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


_HEAD_KEY = re.compile(r"^heads\.(\d+)\.")


def fit_state_dict(state: dict[str, torch.Tensor], net: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` (prefixes stripped) without the keys of segmentation heads that ``net`` does not build.

    Checkpoints written before the unsupervised lowest-resolution head was dropped (see
    ``NetworkSpec.output_stages``) hold one head more (or, without deep supervision, several more);
    those weights never received a gradient and are discarded. Every other key must match
    (``load_state_dict`` stays strict). Returns the fitted dict and the dropped keys, in order.
    """
    state = strip_state_dict(state)
    own = net.state_dict()
    dropped = [k for k in state if k not in own and _HEAD_KEY.match(k)]
    return {k: v for k, v in state.items() if k not in dropped}, dropped


def load_model(path: PathLikeStr, device: str | torch.device = "cpu") -> tuple[nn.Module, Configuration, DatasetMeta]:
    """Rebuild the network of a checkpoint, load its weights, and return it in eval mode together
    with its configuration and dataset metadata."""
    ckpt = load_checkpoint(path, map_location=device)
    config = Configuration(**ckpt["configuration"])
    meta = DatasetMeta.from_dict(ckpt["dataset"])
    net = build_network(config.network, int(ckpt["in_channels"]), int(ckpt["num_outputs"]))
    net.load_state_dict(fit_state_dict(ckpt["network"], net)[0])
    return net.to(device).eval(), config, meta
