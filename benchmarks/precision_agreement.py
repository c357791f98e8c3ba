"""Benchmark: bf16 autocast vs fp32 on a trained model, by exact emulation (prints JSON).

bf16 is only fast on processors with AVX512-BF16/AMX (and GPUs); elsewhere torch's bf16 convolution
is a slow reference path. :class:`voxflow.precision.EmulatedBf16` computes what bf16 autocast
computes at float32 speed (bf16 rounding of the convolutions' inputs, weights and outputs, float32
sums; every other op as autocast runs it), so a model's bf16 agreement can be measured anywhere.

1. ``emulation_vs_autocast``: the emulation against the real CPU autocast, (a) layer by layer (each
   convolution given the input it got under real autocast: fraction of outputs that differ, and by
   how many bf16 units in the last place) and (b) end to end (argmax agreement of fp32, emulation
   and real bf16, pairwise), for a small random U-Net and for the trained network on one tile of a
   validation case (``--tile``; the real bf16 forward is slow without native bf16). Bias rounding
   "reference" reproduces this machine's fallback kernels (its transposed convolution adds the bias
   after rounding); "fused" is oneDNN's (native-bf16 CPUs), which then differs from the fallback by
   one bf16 unit in ~30% of the transposed convolutions' outputs.
2. ``agreement``: the trained fold predicts its validation cases through ``voxflow.infer.predict``
   (preprocessing, sliding window, TTA, undo -- the real path) in fp32 and with the emulated bf16
   network (policy ``cpu``: CPU autocast's op lists; ``cuda``: CUDA's, which keep norms in float32);
   label-map voxel agreement and Dice against the reference labels of both.

Measured (hippocampus-dev fold 0, CPU-preset model, 30 epochs, TTA, 5 cases, 328,500 voxels): oneDNN
rules 30 voxels differ (99.991%), any case's Dice within 0.0011; CUDA rules 48 voxels (99.985%), Dice
within 0.0009; real CPU autocast vs the emulation on one tile: identical label map. Figures: README.

Train a fold first, e.g.::

    voxflow run ../shared/data/hippocampus-dev --work /tmp/hippo --preset cpu -c 3d_fullres --folds 0 \\
        --set train.epochs=15 --set train.iters_per_epoch=25
    PYTHONPATH=. python benchmarks/precision_agreement.py --work /tmp/hippo --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voxflow.infer import predict
from voxflow.models import load_model
from voxflow.nets import build_network
from voxflow.plan.schema import NetworkSpec
from voxflow.precision import EmulatedBf16, emulate_bf16_autocast
from voxflow.store import Store

_LOWER = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _bf16_ulp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place (8 significant bits) at the larger of ``|a|``, ``|b|``."""
    _, exp = torch.frexp(torch.maximum(a.float().abs(), b.float().abs()).clamp_min(2.0**-100))
    return torch.pow(2.0, (exp - 8).float())


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (list, tuple)) else out


def layer_by_layer(net: nn.Module, x: torch.Tensor, *, bias: str) -> dict[str, Any]:
    """Each convolution/linear layer run by the emulation (bias rounding ``bias``) on the input it saw
    under real CPU autocast, against its real autocast output."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, _LOWER)]
    hooks = [
        m.register_forward_hook(lambda _m, i, o, n=n: seen.__setitem__(n, (i[0].clone(), o.clone()))) for n, m in layers
    ]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    for h in hooks:
        h.remove()
    fracs, ulps, rels, dtypes_match = [], [], [], True
    with torch.inference_mode():
        for n, m in layers:
            if n not in seen:  # not called in eval mode (lower deep-supervision heads)
                continue
            inp, real = seen[n]
            with emulate_bf16_autocast("cpu", bias=bias):
                emu = m(inp)
            dtypes_match &= emu.dtype == real.dtype
            diff = (emu.float() - real.float()).abs()
            fracs.append(float((diff > 0).float().mean()))
            ulps.append(float((diff / _bf16_ulp(real, emu)).max()))
            rels.append(float(diff.max() / real.float().abs().max().clamp_min(1e-30)))
    return {
        "bias_rounding": bias,
        "layers": len(fracs),
        "output_dtypes_match": bool(dtypes_match),
        "max_fraction_of_outputs_differing": max(fracs),
        "mean_fraction_of_outputs_differing": float(np.mean(fracs)),
        "max_difference_bf16_ulp": max(ulps),
        "max_difference_relative_to_layer_max": max(rels),
    }


def end_to_end(net: nn.Module, x: torch.Tensor, *, bias: str) -> dict[str, Any]:
    """fp32, emulated bf16 (bias rounding ``bias``) and real CPU bf16 autocast on the same input:
    argmax agreement pairwise, largest softmax difference, seconds."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        fp32 = torch.softmax(_first(net(x)).float(), 1)
        t1 = time.perf_counter()
        emu = torch.softmax(_first(EmulatedBf16(net, bias=bias)(x)).float(), 1)
        t2 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            real = torch.softmax(_first(net(x)).float(), 1)
        t3 = time.perf_counter()

    def agree(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.argmax(1) == b.argmax(1)).float().mean())

    return {
        "bias_rounding": bias,
        "input_shape": list(x.shape),
        "argmax_agreement": {
            "fp32_vs_real_bf16": agree(fp32, real),
            "fp32_vs_emulated": agree(fp32, emu),
            "emulated_vs_real_bf16": agree(emu, real),
        },  # fmt: skip
        "max_softmax_diff": {
            "fp32_vs_real_bf16": float((fp32 - real).abs().max()),
            "emulated_vs_real_bf16": float((emu - real).abs().max()),
        },  # fmt: skip
        "seconds": {"fp32": t1 - t0, "emulated": t2 - t1, "real_bf16": t3 - t2},
    }


def _tiny_unet() -> nn.Module:
    n = 3
    spec = NetworkSpec(
        n_stages=n,
        features_per_stage=(8, 16, 32),
        kernel_sizes=((3, 3, 3),) * n,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        n_blocks_per_stage=(2,) * n,
        n_conv_per_stage_decoder=(2,) * (n - 1),
        deep_supervision=False,
    )
    torch.manual_seed(0)
    return build_network(spec, in_channels=1, num_outputs=3).eval()


def _case_tile(work: Path, configuration: str, case_id: str, patch: tuple[int, ...]) -> torch.Tensor:
    """A patch-sized tile from the centre of a preprocessed case (zero-padded where smaller), (1, C, Z, Y, X)."""
    image = np.asarray(Store.open(work / "preprocessed" / f"{configuration}.zarr").image(case_id).compute())
    out = np.zeros((image.shape[0], *patch), np.float32)
    src, dst = [slice(None)], [slice(None)]
    for n, p in zip(image.shape[1:], patch, strict=True):
        a, b = max(0, (n - p) // 2), max(0, (p - n) // 2)
        m = min(n, p)
        src.append(slice(a, a + m))
        dst.append(slice(b, b + m))
    out[tuple(dst)] = image[tuple(src)]
    return torch.from_numpy(out[None])


def _dice(pred: np.ndarray, ref: np.ndarray, label: int) -> float:
    p, r = pred == label, ref == label
    denom = int(p.sum()) + int(r.sum())
    return float("nan") if denom == 0 else 2.0 * int((p & r).sum()) / denom


def _predict_labels(
    src: Store, net: nn.Module, cfg: Any, meta: Any, cases: list[str], tta: bool
) -> tuple[dict[str, np.ndarray], float]:
    with tempfile.TemporaryDirectory(prefix="voxflow-precision-") as tmp:
        t0 = time.perf_counter()
        out = predict(src, tmp, models=[(net, cfg, meta)], case_ids=cases, postprocessing=None, tta=tta,
                      precision="fp32", progress=False, export=False)  # fmt: skip
        seconds = time.perf_counter() - t0
        return {c: np.asarray(out.array(c, "label").compute()) for c in cases}, seconds


#: emulated bf16 variants: (policy, bias rounding) -- the kernels of a CPU with AVX512-BF16/AMX
#: (oneDNN), of torch's fallback CPU kernels (what ``--precision bf16`` runs here) and of CUDA
VARIANTS = {"cpu_onednn": ("cpu", "fused"), "cpu_fallback": ("cpu", "reference"), "cuda": ("cuda", "separate")}


def agreement(work: Path, configuration: str, fold: int, variants: list[str], tta: bool) -> dict[str, Any]:
    """fp32 vs emulated bf16 through the real predict path, on the fold's validation cases."""
    run = work / "runs" / configuration / f"fold_{fold}"
    ckpt = run / "checkpoint_final.pt"
    net, cfg, meta = load_model(ckpt if ckpt.is_file() else run / "checkpoint_best.pt")
    cases = json.loads((work / "splits.json").read_text())[fold]["val"]
    src = Store.open(work / "dataset.zarr")
    refs = {c: np.asarray(src.label(c).compute()) for c in cases}  # type: ignore[union-attr]
    labels = [v for v in meta.label_values if v != 0]
    ref_labels, fp32_s = _predict_labels(src, net, cfg, meta, cases, tta)
    result: dict[str, Any] = {"cases": cases, "tta": tta, "fp32_seconds": fp32_s, "variants": {}}
    for variant in variants:
        policy, bias = VARIANTS[variant]
        emu_labels, emu_s = _predict_labels(src, EmulatedBf16(net, policy=policy, bias=bias), cfg, meta, cases, tta)
        same = sum(int((ref_labels[c] == emu_labels[c]).sum()) for c in cases)
        total = sum(ref_labels[c].size for c in cases)
        d32 = np.array([[_dice(ref_labels[c], refs[c], v) for v in labels] for c in cases])
        d16 = np.array([[_dice(emu_labels[c], refs[c], v) for v in labels] for c in cases])
        result["variants"][variant] = {
            "policy": policy,
            "bias_rounding": bias,
            "seconds": emu_s,
            "voxel_agreement": same / total,
            "min_case_voxel_agreement": min(float((ref_labels[c] == emu_labels[c]).mean()) for c in cases),
            "voxels_differing": total - same,
            "voxels": total,
            "dice_fp32_mean_per_label": dict(zip(map(str, labels), np.nanmean(d32, 0).tolist(), strict=True)),
            "dice_bf16_mean_per_label": dict(zip(map(str, labels), np.nanmean(d16, 0).tolist(), strict=True)),
            "max_abs_dice_diff_case_label": float(np.nanmax(np.abs(d16 - d32))),
            "abs_mean_dice_diff": float(abs(np.nanmean(d16) - np.nanmean(d32))),
        }
    return result


def _vs_autocast(net: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The emulation against this machine's real CPU autocast: with its kernels' bias rounding
    ("reference": exact but for float32 summation order) and with oneDNN's ("fused")."""
    return {
        "layer_by_layer": [layer_by_layer(net, x, bias=b) for b in ("reference", "fused")],
        "end_to_end": [end_to_end(net, x, bias=b) for b in ("reference", "fused")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="workspace with a trained fold and splits.json")
    ap.add_argument("-c", "--configuration", default="3d_fullres")
    ap.add_argument("-f", "--fold", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--no-tta", action="store_true")
    ap.add_argument("--tile", action="store_true", help="also the real bf16 forward of the trained network on one tile")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    tiny = _tiny_unet()
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "emulation_vs_autocast": {"tiny_unet_random_weights": _vs_autocast(tiny, x)},
    }
    if args.tile:
        run = args.work / "runs" / args.configuration / f"fold_{args.fold}"
        ckpt = run / "checkpoint_final.pt"
        net, cfg, _ = load_model(ckpt if ckpt.is_file() else run / "checkpoint_best.pt")
        case = json.loads((args.work / "splits.json").read_text())[args.fold]["val"][0]
        tile = _case_tile(args.work, args.configuration, case, cfg.patch_size_vox)
        report["emulation_vs_autocast"]["trained_network_one_tile"] = {
            "case": case, **_vs_autocast(net, tile),
        }  # fmt: skip
    report["agreement"] = agreement(args.work, args.configuration, args.fold, args.variants, not args.no_tta)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
