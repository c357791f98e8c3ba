"""Floating-point precision of training and inference: one setting, resolved per device.

``fp32``, ``bf16`` (autocast; CUDA, and CPUs with AVX512-BF16/AMX where it is fast) or ``fp16``
(CUDA autocast; training adds a GradScaler). ``auto`` picks per device (:func:`resolve_precision`).
Accumulators (losses, tile sums) stay float32 in every case.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from voxflow.errors import ConfigError

__all__ = ["PRECISIONS", "amp_dtype_for", "autocast_for", "cpu_has_native_bf16", "resolve_precision"]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the values of ``--precision`` (``auto`` resolves to one of the others)
PRECISIONS = ("auto", *_DTYPES)


def cpu_has_native_bf16() -> bool:
    """True when the processor computes bf16 natively (AVX512-BF16 or AMX), where a bf16 autocast
    is faster than fp32; elsewhere bf16 on the CPU is emulated and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: read the flags
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(
    precision: str, device: torch.device | str, *, amp: bool = True, setting: str = "precision"
) -> str:
    """The precision a run uses: ``fp32``, ``bf16`` or ``fp16``.

    ``auto``: bf16 on CUDA devices that support it, fp16 on older ones; on the CPU fp32 (a bf16
    autocast is emulated, hence slower, on processors without AVX512-BF16/AMX; on those that have
    it, fp32 stays the default until its accuracy is measured there, see the README). ``amp=False``
    (the older ``train.amp`` / ``PredictOptions.amp`` switch) turns ``auto`` into fp32. fp16 on the
    CPU is refused. ``setting`` names the option in error messages.
    """
    dev = torch.device(device)
    if precision == "auto":
        if not amp or dev.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in _DTYPES:
        raise ConfigError(f"{setting} must be one of {list(PRECISIONS)}; got {precision!r}. Set one with --precision.")
    if precision == "fp16" and dev.type != "cuda":
        raise ConfigError(
            f"{setting} fp16 needs a CUDA device; got device {str(dev)!r}. Use a GPU "
            f"(--device cuda) or use --precision bf16 or fp32 on the CPU."
        )
    return precision


def amp_dtype_for(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (``None``: plain fp32)."""
    return _DTYPES[precision]


def autocast_for(device: torch.device, precision: str) -> Any:
    """A context manager running the forward pass in the resolved ``precision`` on ``device``."""
    dtype = amp_dtype_for(precision)
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
