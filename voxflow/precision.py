"""Floating-point precision of training and inference: one setting, resolved per device.

``fp32``, ``bf16`` (autocast; CUDA, and CPUs with AVX512-BF16/AMX where it is fast) or ``fp16``
(CUDA autocast; training adds a GradScaler). ``auto`` picks per device (:func:`resolve_precision`).
Accumulators (losses, tile sums) stay float32 in every case.

:class:`EmulatedBf16` runs a network as bf16 autocast would, in float32 arithmetic, to measure a
model's bf16 agreement on processors where bf16 is slow (``benchmarks/precision_agreement.py``).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from voxflow.errors import ConfigError

__all__ = [
    "BIAS_ROUNDINGS",
    "EMULATION_POLICIES",
    "PRECISIONS",
    "NATIVE_BF16_FLAGS",
    "EmulatedBf16",
    "amp_dtype_for",
    "autocast_for",
    "cpu_has_native_bf16",
    "cpuinfo_has_native_bf16",
    "emulate_bf16_autocast",
    "resolve_precision",
]

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the values of ``--precision`` (``auto`` resolves to one of the others)
PRECISIONS = ("auto", *_DTYPES)


#: /proc/cpuinfo flags of native bf16 arithmetic: AVX512-BF16 (vdpbf16ps) and AMX-BF16 tiles
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpuinfo_has_native_bf16(cpuinfo: str) -> bool:
    r"""Whether the ``flags`` lines of /proc/cpuinfo text list avx512_bf16 or amx_bf16 (x86 Linux).

    >>> cpuinfo_has_native_bf16("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16")
    True
    >>> cpuinfo_has_native_bf16("flags : fpu sse2 avx2 avx512f avx512bw")
    False
    """
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags" and NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


def cpu_has_native_bf16(cpuinfo_path: str | Path = "/proc/cpuinfo") -> bool:
    """True when the processor computes bf16 natively (AVX512-BF16 or AMX-BF16), where a bf16
    autocast is faster than fp32; elsewhere torch's bf16 kernels are slow fallbacks.

    Reads the kernel's CPU flags (:func:`cpuinfo_has_native_bf16`) where ``cpuinfo_path`` has
    them, else asks torch's CPUID probe. (``torch.backends.cpu.get_cpu_capability()`` says
    ``AVX512`` also for AVX512 processors without bf16, so it is not used.)
    """
    try:
        text = Path(cpuinfo_path).read_text(errors="replace")
    except OSError:
        text = ""
    if any(line.partition(":")[0].strip() == "flags" for line in text.splitlines()):
        return cpuinfo_has_native_bf16(text)
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


@functools.cache
def _native_bf16_here() -> bool:
    return cpu_has_native_bf16()


def resolve_precision(
    precision: str,
    device: torch.device | str,
    *,
    amp: bool = True,
    setting: str = "precision",
    for_training: bool = False,
) -> str:
    """The precision a run uses: ``fp32``, ``bf16`` or ``fp16``.

    ``auto``: bf16 on CUDA devices that support it, fp16 on older ones. On the CPU: for inference
    bf16 where the processor computes it natively (:func:`cpu_has_native_bf16`; bf16 agreed with
    fp32 on >= 99.9% of voxels, Dice within 0.002, on trained models: README), fp32 elsewhere (bf16
    is a slow fallback there); for training (``for_training``) fp32 on every CPU (bf16 training
    accuracy is unmeasured). ``amp=False`` (the older ``train.amp`` / ``PredictOptions.amp``
    switch) turns ``auto`` into fp32. fp16 on the CPU is refused. ``setting`` names the option in
    error messages.
    """
    dev = torch.device(device)
    if precision == "auto":
        if not amp:
            return "fp32"
        if dev.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if dev.type == "cpu" and not for_training and _native_bf16_here() else "fp32"
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


# --- bf16 autocast emulated in fp32 arithmetic -------------------------------------------------

#: torch ops autocast runs in bf16 on both CPU and CUDA (the matmul/convolution part of its "lower
#: precision" lists): the names seen under ``inference_mode`` (``conv3d``, ``linear``) and those seen
#: after autograd's decomposition (``convolution``, ``mm``, ``addmm``)
_CONV_OPS = frozenset(
    {
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "convolution",
        "_convolution",
    }
)
_LOWER_OPS = _CONV_OPS | {"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm"}
#: ops CUDA's autocast runs in float32 whatever their input (the part of its list a U-Net meets;
#: CPU autocast leaves these in their input dtype, so bf16 after a bf16 convolution)
_CUDA_FP32_OPS = frozenset(
    {
        "group_norm",
        "native_group_norm",
        "layer_norm",
        "native_layer_norm",
        "softmax",
        "_softmax",
        "log_softmax",
        "_log_softmax",
    }
)
#: where autocast's rounding happens is fixed by torch's op lists (``policy``); where a convolution's
#: bias is added depends on the kernel (``bias``): "fused" adds it to the float32 sum before the one
#: rounding (oneDNN, used on CPUs with AVX512/AMX); "separate" rounds the convolution, adds the bias in
#: bf16 and rounds again (torch's cuDNN path adds the bias after the convolution); "reference" is
#: "separate" for transposed convolutions only (torch's fallback CPU kernels on CPUs without AVX512)
EMULATION_POLICIES = ("cpu", "cuda")
BIAS_ROUNDINGS = ("fused", "separate", "reference")


def _map_floats(fn: Any, tree: Any) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def _as_fp32_rounded(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bf16 (round to nearest even), held as float32."""
    return t.to(torch.bfloat16).to(torch.float32)


def _bias_separate(name: str, args: tuple[Any, ...], bias: str) -> bool:
    """Whether this convolution call adds its bias after rounding (see :data:`BIAS_ROUNDINGS`)."""
    if name not in _CONV_OPS or len(args) < 3 or args[2] is None or bias == "fused":
        return False
    transposed = name.startswith("conv_transpose") or (name.endswith("convolution") and bool(args[6]))
    return bias == "separate" or transposed


def _lower(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], separate: bool) -> Any:
    """``func`` on bf16-rounded inputs in float32, its output rounded to bf16 (the bias added after
    that rounding, in bf16, when ``separate``)."""
    args, kwargs = _map_floats(_as_fp32_rounded, args), _map_floats(_as_fp32_rounded, kwargs)
    if not separate:
        return _map_floats(lambda t: t.to(torch.bfloat16), func(*args, **kwargs))
    out = func(args[0], args[1], None, *args[3:], **kwargs).to(torch.bfloat16)
    shape = [1, -1] + [1] * (out.ndim - 2)
    return (out.float() + args[2].reshape(shape)).to(torch.bfloat16)


def _bf16_mode(policy: str, bias: str) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class _EmulatedLowerPrecision(TorchDispatchMode):
        """Rounds inputs and outputs of the lower-precision ops to bf16, computes them in float32."""

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if name in _LOWER_OPS:
                return _lower(func, args, kwargs, _bias_separate(name, args, bias))
            if policy == "cuda" and name in _CUDA_FP32_OPS:
                return func(*_map_floats(lambda t: t.float(), args), **_map_floats(lambda t: t.float(), kwargs))
            return func(*args, **kwargs)

    return _EmulatedLowerPrecision()


def _check_emulation(policy: str, bias: str | None) -> str:
    if policy not in EMULATION_POLICIES:
        raise ConfigError(f"the bf16 emulation policy must be one of {list(EMULATION_POLICIES)}; got {policy!r}.")
    bias = bias or ("fused" if policy == "cpu" else "separate")
    if bias not in BIAS_ROUNDINGS:
        raise ConfigError(f"the bf16 emulation bias rounding must be one of {list(BIAS_ROUNDINGS)}; got {bias!r}.")
    return bias


def emulate_bf16_autocast(policy: str = "cpu", *, bias: str | None = None) -> Any:
    """A context manager computing what bf16 autocast computes, at float32 speed on any processor.

    Convolutions and matrix products (autocast's lower-precision ops) get their inputs, weights and
    biases rounded to bf16, run in float32 (products of bf16 values are exact in float32; the sum is
    float32 as in oneDNN's and cuDNN's bf16 kernels) and their outputs rounded to bf16. Every other
    op runs as autocast runs it: ``policy="cpu"`` inside a real ``torch.autocast("cpu", bfloat16)``
    (its own op lists; group norm, LeakyReLU and additions then see bf16 tensors), ``"cuda"`` with
    CUDA's float32 list (norms, softmax in float32) applied by hand on the CPU. ``bias``: where a
    convolution's bias is added (:data:`BIAS_ROUNDINGS`; default "fused" for ``cpu``, "separate" for
    ``cuda``). The results differ from a real bf16 kernel's where float32 summation order flips a
    bf16 rounding (``benchmarks/precision_agreement.py`` measures it).
    """
    from contextlib import ExitStack

    bias = _check_emulation(policy, bias)
    stack = ExitStack()
    if policy == "cpu":
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    stack.enter_context(_bf16_mode(policy, bias))
    return stack


class EmulatedBf16(torch.nn.Module):
    """``net`` as bf16 autocast runs it on a CPU (``policy="cpu"``) or a GPU (``"cuda"``), in float32
    arithmetic (:func:`emulate_bf16_autocast`): to measure a model's bf16 agreement where bf16 is slow.
    Outputs are bf16 tensors, as under autocast. Use it in place of ``net`` in a predictor running fp32."""

    def __init__(self, net: torch.nn.Module, *, policy: str = "cpu", bias: str | None = None) -> None:
        super().__init__()
        self.bias = _check_emulation(policy, bias)
        self.net = net
        self.policy = policy

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with emulate_bf16_autocast(self.policy, bias=self.bias):
            return self.net(*args, **kwargs)
