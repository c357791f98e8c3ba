"""Benchmark: mirrored TTA as one batched forward pass vs one pass per flip; InstanceNorm vs GroupNorm;
channels-last vs contiguous weights and inputs.

For the CPU-preset network the planner gives the hippocampus dev data (8-64 features, patch
40x48x32) and nnU-Net's 4-stage 32-256 network at 40x56x40 (voxflow's U-Net of that topology;
with ``dynamic_network_architectures`` installed -- run it with ``.venv-nnunet`` -- also nnU-Net's
own PlainConvUNet with InstanceNorm3d and with :func:`voxflow.nnunet.instance_norm_as_group_norm`),
it times :class:`voxflow.infer.TilePredictor` on one tile with 8 mirrorings, all 8 flips in one
pass (``batched``) vs one flip per pass (``per_flip``, the earlier loop), and the batched pass with
channels-last (the CPU default) vs contiguous (``batched_contiguous``) layout, interleaved, after a
warm-up; medians in seconds of wall time and (``cpu_s``) of process CPU time, steadier on a shared
machine. ``max_abs_diff`` compares the two outputs. Seeded random weights
(speed does not depend on training). Prints JSON::

    PYTHONPATH=. .venv-nnunet/bin/python benchmarks/tta_batching.py --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from typing import Any

import numpy as np
import torch

from voxflow.infer import TilePredictor
from voxflow.nets import build_network
from voxflow.plan.schema import NetworkSpec

CPU_PRESET = NetworkSpec(
    n_stages=4,
    features_per_stage=(8, 16, 32, 64),
    kernel_sizes=((3, 3, 3),) * 4,
    strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
    n_blocks_per_stage=(2,) * 4,
    n_conv_per_stage_decoder=(2,) * 3,
    deep_supervision=False,
)
NNUNET_32_256 = dataclasses.replace(CPU_PRESET, features_per_stage=(32, 64, 128, 256))


def _plain_conv_unet(group_norm: bool) -> Any:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from torch import nn

    from voxflow.nnunet import instance_norm_as_group_norm

    torch.manual_seed(0)
    net = PlainConvUNet(
        1,
        4,
        [32, 64, 128, 256],
        nn.Conv3d,
        3,
        [1, 2, 2, 2],
        [2, 2, 2, 2],
        3,
        [2, 2, 2],
        False,
        nn.InstanceNorm3d,
        {"eps": 1e-5, "affine": True},
        None,
        None,
        nn.LeakyReLU,
        {"inplace": True},
        deep_supervision=False,
    ).eval()
    return instance_norm_as_group_norm(net) if group_norm else net


def _time(pred: TilePredictor, x: np.ndarray) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    pred(x)
    return time.perf_counter() - t, time.process_time() - c


def compare(variants: dict[str, TilePredictor], x: np.ndarray, repeats: int) -> dict[str, Any]:
    """Median wall and CPU seconds of each variant (interleaved, one warm-up each) and their largest
    output difference."""
    outs = {k: p(x).numpy() for k, p in variants.items()}  # warm-up
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, p in variants.items():
            times[k].append(_time(p, x))
    first = next(iter(outs.values()))
    res: dict[str, Any] = {f"{k}_s": round(statistics.median(t[0] for t in v), 4) for k, v in times.items()}
    res.update({f"{k}_cpu_s": round(statistics.median(t[1] for t in v), 4) for k, v in times.items()})
    res["max_abs_diff"] = float(max(np.abs(o - first).max() for o in outs.values()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {"threads": args.threads, "repeats": args.repeats, "mirrorings": 8}
    for name, spec, patch in (
        ("cpu_preset_8_64", CPU_PRESET, (40, 48, 32)),
        ("unet_32_256", NNUNET_32_256, (40, 56, 40)),
    ):
        torch.manual_seed(0)
        net = build_network(spec, 1, 3).eval()
        x = rng.normal(size=(1, 1, *patch)).astype(np.float32)
        variants = {
            "batched": TilePredictor(net, mirror_axes=(0, 1, 2)),
            "per_flip": TilePredictor(net, mirror_axes=(0, 1, 2), max_tiles_per_forward=1),
            # its own copy: a predictor lays out its networks in place
            "batched_contiguous": TilePredictor(copy.deepcopy(net), mirror_axes=(0, 1, 2), memory_format="contiguous"),
        }
        r = compare(variants, x, args.repeats)
        r["speedup"] = round(r["per_flip_s"] / r["batched_s"], 2)
        r["channels_last_speedup"] = round(r["batched_contiguous_s"] / r["batched_s"], 2)
        r["channels_last_cpu_speedup"] = round(r["batched_contiguous_cpu_s"] / r["batched_cpu_s"], 2)
        report[name] = r
    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError:
        report["plainconvunet"] = "dynamic_network_architectures not installed (run with .venv-nnunet)"
    else:
        x = rng.normal(size=(1, 1, 40, 56, 40)).astype(np.float32)
        inorm, gnorm = _plain_conv_unet(False), _plain_conv_unet(True)
        variants = {
            f"{norm}_{mode}": TilePredictor(
                net, mirror_axes=(0, 1, 2), activation=None, max_tiles_per_forward=None if mode == "batched" else 1
            )
            for norm, net in (("instnorm", inorm), ("groupnorm", gnorm))
            for mode in ("batched", "per_flip")
        }
        variants["groupnorm_batched_contiguous"] = TilePredictor(
            copy.deepcopy(gnorm), mirror_axes=(0, 1, 2), activation=None, memory_format="contiguous"
        )
        r = compare(variants, x, args.repeats)
        r["channels_last_speedup"] = round(r["groupnorm_batched_contiguous_s"] / r["groupnorm_batched_s"], 2)
        r["channels_last_cpu_speedup"] = round(
            r["groupnorm_batched_contiguous_cpu_s"] / r["groupnorm_batched_cpu_s"], 2
        )
        report["plainconvunet_32_256"] = r
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
