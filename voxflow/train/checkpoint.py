"""Checkpoints: atomic ``torch.save`` (temporary file + fsync + ``os.replace``) and RNG capture.

The checkpoint format and its reading (``load_checkpoint``, ``fit_state_dict``, ``load_model``) live
in :mod:`voxflow.models`, since prediction needs them without training; they are re-exported here.
Training checkpoints add the optimiser, grad-scaler and RNG states and the trainer's bookkeeping to
the model's entries, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from voxflow._serial import atomic_write
from voxflow._types import PathLikeStr
from voxflow.models import FORMAT, fit_state_dict, load_checkpoint, load_model, strip_state_dict

__all__ = [
    "FORMAT",
    "capture_rng",
    "fit_state_dict",
    "load_checkpoint",
    "load_model",
    "restore_rng",
    "save_checkpoint",
    "strip_state_dict",
]


def save_checkpoint(path: PathLikeStr, payload: dict[str, Any]) -> None:
    """``torch.save`` through :func:`voxflow._serial.atomic_write` (temporary file in the same folder,
    fsync, ``os.replace``, fsync of the folder): a kill at any moment leaves either the old or the
    new checkpoint, never a truncated one."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **payload}, f), binary=True)


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
