"""voxflow.precision: native-bf16 detection from CPU flags, and the bf16 autocast emulation against
the real CPU autocast (small tensors: torch's bf16 kernels are slow fallbacks without AVX512-BF16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from voxflow.errors import ConfigError
from voxflow.nets import build_network
from voxflow.plan.schema import NetworkSpec
from voxflow.precision import (
    EmulatedBf16,
    cpu_has_native_bf16,
    cpuinfo_has_native_bf16,
    emulate_bf16_autocast,
)

BF16 = torch.bfloat16

_CPUINFO = """processor\t: {i}
vendor_id\t: GenuineIntel
model name\t: Some Xeon
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512vl {extra}
bugs\t\t: spectre_v1

"""


def _cpuinfo(extra: str, n: int = 2) -> str:
    return "".join(_CPUINFO.format(i=i, extra=extra) for i in range(n))


@pytest.mark.parametrize(
    ("extra", "native"),
    [("avx512_bf16", True), ("amx_tile amx_bf16 amx_int8", True), ("avx512_vnni", False), ("", False)],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, extra: str, native: bool) -> None:
    assert cpuinfo_has_native_bf16(_cpuinfo(extra)) is native
    path = tmp_path / "cpuinfo"
    path.write_text(_cpuinfo(extra))
    assert cpu_has_native_bf16(path) is native


def test_native_bf16_flags_count_only_on_the_flags_line(tmp_path: Path) -> None:
    # the flag named in another field (or an ARM "Features" line) is not a CPU flag
    text = "processor\t: 0\nmodel name\t: avx512_bf16 lookalike\nFeatures\t: fp asimd bf16\nflags\t\t: avx2\n"
    assert not cpuinfo_has_native_bf16(text)
    # without a flags line (macOS, Windows, ARM), torch's CPUID probe answers
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    probe = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert cpu_has_native_bf16(path) is probe
    assert cpu_has_native_bf16(tmp_path / "missing") is probe


def _conv_args(transposed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, 6, generator=g)
    shape = (8, 6, 2, 2, 2) if transposed else (6, 8, 3, 3, 3)
    return x, torch.randn(shape, generator=g) * 0.2, torch.randn(6, generator=g)


def _conv(transposed: bool, *a: torch.Tensor) -> torch.Tensor:
    return F.conv_transpose3d(*a, stride=2) if transposed else F.conv3d(*a, padding=1)


def _differing(transposed: bool, bias: str) -> float:
    """Fraction of a bf16 convolution's outputs where the emulation differs from the real CPU autocast."""
    x, w, b = _conv_args(transposed)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=BF16):
            real = _conv(transposed, x, w, b)
        with emulate_bf16_autocast("cpu", bias=bias):
            return (_conv(transposed, x, w, b) != real).float().mean().item()


@pytest.fixture(scope="module")
def bias_here() -> str:
    """This machine's bias rounding: "reference" where torch's fallback kernels run (CPUs without
    AVX512: the transposed convolution adds its bias after rounding), "fused" where oneDNN runs."""
    return min(("reference", "fused"), key=lambda bias: _differing(True, bias))


@pytest.mark.parametrize("transposed", [False, True])
def test_emulated_convolution_rounds_where_cpu_autocast_rounds(transposed: bool, bias_here: str) -> None:
    x, w, b = _conv_args(transposed)

    def conv(*a: torch.Tensor) -> torch.Tensor:
        return _conv(transposed, *a)

    with torch.inference_mode():
        with torch.autocast("cpu", dtype=BF16):
            real = conv(x, w, b)
        with emulate_bf16_autocast("cpu", bias=bias_here):
            emu = conv(x, w, b)
        fp32 = conv(x, w, b)
    assert real.dtype == emu.dtype == BF16
    differ = (emu != real).float().mean().item()
    assert differ < 1e-3  # float32 summation order flips a rounding now and then, nothing more
    assert (fp32.to(BF16) != real).float().mean().item() > 0.2  # rounding the inputs matters: a real check
    rel = (emu.float() - real.float()).abs() / real.float().abs().clamp_min(1e-3)
    assert rel.max().item() <= 2.0**-7


def test_bias_rounding_fused_and_separate() -> None:
    x, w, b = _conv_args(False)
    r = [t.to(BF16).float() for t in (x, w, b)]
    with torch.inference_mode():
        with emulate_bf16_autocast("cpu", bias="fused"):
            fused = F.conv3d(x, w, b, padding=1)
        with emulate_bf16_autocast("cpu", bias="separate"):
            separate = F.conv3d(x, w, b, padding=1)
        once = F.conv3d(*r, padding=1).to(BF16)
        twice = (F.conv3d(r[0], r[1], None, padding=1).to(BF16).float() + r[2].reshape(1, -1, 1, 1, 1)).to(BF16)
    assert torch.equal(fused, once)
    assert torch.equal(separate, twice)
    assert not torch.equal(once, twice)


def _tiny_unet() -> nn.Module:
    spec = NetworkSpec(
        n_stages=2,
        features_per_stage=(4, 8),
        kernel_sizes=((3, 3, 3),) * 2,
        strides=((1, 1, 1), (2, 2, 2)),
        n_blocks_per_stage=(1, 1),
        n_conv_per_stage_decoder=(1,),
        deep_supervision=False,
    )
    torch.manual_seed(0)
    return build_network(spec, in_channels=1, num_outputs=3).eval()


def test_emulated_network_matches_cpu_autocast_layer_by_layer(bias_here: str) -> None:
    """Every module of a U-Net gets the input it saw under real autocast (in-place LeakyReLU: taken
    before the call); its emulated output has the
    real output's dtype and values (but for rare float32-order flips in the convolutions)."""
    net = _tiny_unet()
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    leaves = [(n, m) for n, m in net.named_modules() if not list(m.children())]
    hooks = [m.register_forward_pre_hook(lambda _m, i, n=n: inputs.__setitem__(n, i[0].clone())) for n, m in leaves]
    hooks += [m.register_forward_hook(lambda _m, i, o, n=n: outputs.__setitem__(n, o.clone())) for n, m in leaves]
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        real_out = net(x)
    for h in hooks:
        h.remove()
    kinds = set()
    with torch.inference_mode():
        for name, module in leaves:
            inp, real = inputs[name], outputs[name]
            with emulate_bf16_autocast("cpu", bias=bias_here):
                emu = module(inp)
            assert emu.dtype == real.dtype, name
            assert (emu != real).float().mean().item() < 1e-2, name
            kinds.add((type(module).__name__, str(real.dtype)))
        emu_out = EmulatedBf16(net, bias=bias_here)(x)
    # norms and activations run on bf16 tensors under CPU autocast, as in the emulation
    assert {("GroupNorm", "torch.bfloat16"), ("LeakyReLU", "torch.bfloat16")} <= kinds
    assert emu_out.dtype == real_out.dtype == BF16
    assert (emu_out.argmax(1) == real_out.argmax(1)).float().mean().item() > 0.99


def test_cuda_policy_keeps_norms_in_float32_without_cpu_autocast() -> None:
    x, w, b = _conv_args(False)
    with torch.inference_mode(), emulate_bf16_autocast("cuda"):
        assert not torch.is_autocast_enabled("cpu")
        y = F.conv3d(x, w, b, padding=1)
        z = F.group_norm(y, 6)
        s = torch.softmax(y, 1)
        a = F.leaky_relu(y, 0.01)
    assert (y.dtype, a.dtype) == (BF16, BF16)
    assert (z.dtype, s.dtype) == (torch.float32, torch.float32)
    r = [t.to(BF16).float() for t in (x, w, b)]
    twice = (F.conv3d(r[0], r[1], None, padding=1).to(BF16).float() + r[2].reshape(1, -1, 1, 1, 1)).to(BF16)
    assert torch.equal(y, twice)  # torch adds the bias after cuDNN's convolution


def test_bad_emulation_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="policy must be one of"):
        emulate_bf16_autocast("tpu")
    with pytest.raises(ConfigError, match="bias rounding must be one of"):
        EmulatedBf16(nn.Identity(), bias="late")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_for_cpu_inference_only_with_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    import voxflow.precision as P
    from voxflow.infer import TilePredictor
    from voxflow.train._steps import resolve_precision as resolve_for_training

    monkeypatch.setattr(P, "_native_bf16_here", lambda: native)
    cpu = torch.device("cpu")
    assert P.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert P.resolve_precision("auto", cpu, amp=False) == "fp32"
    assert P.resolve_precision("auto", cpu, for_training=True) == "fp32"
    assert resolve_for_training("auto", cpu) == "fp32"
    assert P.resolve_precision("fp32", cpu) == "fp32"
    assert TilePredictor(nn.Conv3d(1, 2, 1)).precision == ("bf16" if native else "fp32")


def test_emulated_network_in_the_tile_predictor_matches_real_bf16(bias_here: str) -> None:
    """The wrapper slots into the fp32 predictor (mirroring TTA, float32 sums) and gives the scores of
    the predictor running real bf16 autocast, up to the rare flips."""
    from voxflow.infer import TilePredictor

    net = _tiny_unet()
    x = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2)).numpy()
    real = TilePredictor(net, mirror_axes=(2,), precision="bf16")(x)
    emu = TilePredictor(EmulatedBf16(net, bias=bias_here), mirror_axes=(2,), precision="fp32")(x)
    fp32 = TilePredictor(net, mirror_axes=(2,), precision="fp32")(x)
    assert emu.dtype == real.dtype == torch.float32
    assert (emu - real).abs().max().item() < 0.5 * (fp32 - real).abs().max().item()
    assert (emu.argmax(1) == real.argmax(1)).float().mean().item() > 0.99
