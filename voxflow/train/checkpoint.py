"""Checkpoints: atomic ``torch.save`` (temporary file + fsync + ``os.replace``), RNG capture, model loading.

A checkpoint is a dict ``{"format": "voxflow-checkpoint-1", "network": state_dict,
"configuration": Configuration dict, "dataset": DatasetMeta dict, "in_channels", "num_outputs",
"epoch", ...}``; training checkpoints add the optimiser, grad-scaler and RNG states and the
trainer's bookkeeping so ``--resume`` continues exactly.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voxflow._serial import atomic_write
from voxflow._types import PathLikeStr
from voxflow.errors import IncompleteStoreError
from voxflow.nets import build_network
from voxflow.plan.schema import Configuration
from voxflow.store import DatasetMeta

__all__ = ["FORMAT", "capture_rng", "fit_state_dict", "load_checkpoint", "load_model", "restore_rng",
           "save_checkpoint", "strip_state_dict"]

FORMAT = "voxflow-checkpoint-1"


def save_checkpoint(path: PathLikeStr, payload: dict[str, Any]) -> None:
    """``torch.save`` through :func:`voxflow._serial.atomic_write` (temporary file in the same folder,
    fsync, ``os.replace``, fsync of the folder): a kill at any moment leaves either the old or the
    new checkpoint, never a truncated one."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f), binary=True)


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
                k = k[len(prefix):]
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


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model(path: PathLikeStr, device: str | torch.device = "cpu") -> tuple[nn.Module, Configuration, DatasetMeta]:
    """Rebuild the network of a checkpoint, load its weights, and return it in eval mode together
    with its configuration and dataset metadata."""
    ckpt = load_checkpoint(path, map_location=device)
    config = Configuration(**ckpt["configuration"])
    meta = DatasetMeta.from_dict(ckpt["dataset"])
    net = build_network(config.network, int(ckpt["in_channels"]), int(ckpt["num_outputs"]))
    net.load_state_dict(fit_state_dict(ckpt["network"], net)[0])
    return net.to(device).eval(), config, meta
